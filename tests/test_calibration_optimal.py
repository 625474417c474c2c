"""The affine calibration of a scale that is constant over each image (a learned global / channel
scale, or the per-image best constant of ``log_scale.fit: optimal`` and foreign VAEs) fits only the
offset: its slope would multiply one number per image, a regression on as many points as there are
fitting images (docs/math.md, "Post-hoc calibration"). A map that varies within images keeps its
fitted slope."""

from __future__ import annotations

import math

import pytest
import torch

from hetvae import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import fit_calibration, pooled
from hetvae.predictor import Prediction, calibrate, load_predictor

TINY = {"block_out_channels": (16, 32), "norm_num_groups": 8, "layers_per_block": 1, "latent_channels": 4}


def images_with_levels(levels, size: int = 48, seed: int = 0):
    """Images whose residuals are Laplace with one scale per image ``exp(level)``: ``(target, mean)``."""
    g = torch.Generator().manual_seed(seed)
    b = torch.tensor(levels, dtype=torch.float64).exp().view(-1, 1, 1, 1)
    mean = (torch.rand(len(levels), 3, size, size, generator=g, dtype=torch.float64) - 0.5)
    e = torch.distributions.Laplace(0.0, 1.0)
    r = e.sample((len(levels), 3, size, size)).double() * b
    target = (mean + r).clamp(-1, 1)
    return target.float(), mean.float()


LEVELS = [-4.0, -3.4, -2.9, -2.5, -2.1, -1.8]


def test_a_per_image_constant_scale_gets_the_offset_only():
    target, mean = images_with_levels(LEVELS)
    # a per-image constant twice as spread as the errors: a slope of ~0.5 would fit it
    s = (2 * torch.tensor(LEVELS) + 1.0).view(-1, 1, 1, 1)
    cal = fit_calibration(target, mean, s)
    torch.testing.assert_close(cal.slope, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)
    assert cal.bpd_after < cal.bpd_before
    forced = fit_calibration(target, mean, s, slope=True)  # the slope, when asked for, is fitted
    assert (forced.slope < 0.7).all()


def test_pooled_predictions_of_a_per_image_constant_scale_get_the_offset_only():
    """The predictor's path: predictions of different sizes pooled to (1, C, N, 1)."""
    preds = []
    for k, level in enumerate(LEVELS):
        t, m = images_with_levels([level], size=40 + 8 * k, seed=k)
        preds.append(Prediction(t, m, torch.full_like(t, 2 * level + 1.0)))
    target, mean, s = pooled(preds)
    cal = fit_calibration(target, mean, s)
    torch.testing.assert_close(cal.slope, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_a_map_that_varies_within_images_keeps_its_slope():
    g = torch.Generator().manual_seed(3)
    levels = torch.empty(5, 3, 48, 48).uniform_(-4.0, -1.5, generator=g)
    mean = torch.rand(5, 3, 48, 48, generator=g) - 0.5
    r = torch.distributions.Laplace(0.0, 1.0).sample(levels.shape) * levels.exp()
    target = (mean + r).clamp(-1, 1)
    cal = fit_calibration(target, mean, 2 * levels + 1.0)
    assert ((cal.slope - 0.5).abs() < 0.08).all(), cal.slope
    off = fit_calibration(target, mean, 2 * levels + 1.0, slope=False)
    torch.testing.assert_close(off.slope, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_calibrating_a_model_scored_with_the_per_image_best_constant(tmp_path):
    """A VAE without a head or a recorded likelihood is scored with each image's best constant
    scale (fit: optimal); its calibration is an offset."""
    torch.manual_seed(0)
    AutoencoderKL(AutoencoderConfig(**TINY)).save_pretrained(tmp_path / "foreign")
    predictor = load_predictor(tmp_path / "foreign")
    assert getattr(predictor.nll.head, "fit", None) == "optimal"
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    images = []
    for k in range(4):
        base = torch.stack([torch.sin(6 * xx + k), torch.cos(5 * yy - k), torch.sin(4 * (xx + yy))]) * 0.5
        images.append((base + (k + 1) * 0.05 * torch.randn(3, 64, 64, generator=g)).clamp(-1, 1))
    cal = calibrate(predictor, images)
    torch.testing.assert_close(cal.slope, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)
    assert math.isfinite(cal.bpd_after) and cal.bpd_after <= cal.bpd_before


def test_slope_must_be_a_bool_or_none():
    target, mean = images_with_levels(LEVELS[:2])
    with pytest.raises(ValueError, match="slope"):
        fit_calibration(target, mean, torch.zeros(()), slope="yes")
