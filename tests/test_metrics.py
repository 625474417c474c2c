"""Metrics on hand-made cases with known answers."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch.distributions import Laplace, Normal

from hetvae import metrics as M
from hetvae.functional import BIN_WIDTH

DIST = {"laplace": Laplace, "gaussian": Normal}


def test_psnr_known_mse():
    target = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = M.psnr(target + 0.1, target)  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(out, torch.full((2,), 20.0, dtype=torch.float64))
    assert M.psnr(target, target).isinf().all()
    assert M.psnr(target * 255 + 2.55, target * 255, data_range=255.0)[0].item() == pytest.approx(40.0)


def test_nll_bpd_hand_computed():
    # every value exactly at its bin centre, mean there too: Laplace mass of [-w/2, w/2] is 1 - exp(-w/(2b))
    x = (-1 + BIN_WIDTH * torch.randint(1, 255, (1, 3, 4, 4))).double()
    s = -6.0
    p = 1 - math.exp(-(BIN_WIDTH / 2) / math.exp(s))
    assert M.nll_bpd(x, x, torch.tensor(s), "laplace") == pytest.approx(-math.log2(p), rel=1e-9)
    # a huge scale spreads the mass: ~ density * bin width = w / (2b) per value -> log2(2b / w) bits
    big = 2.0
    assert M.nll_bpd(x * 0, x * 0, torch.tensor(big), "laplace") == pytest.approx(
        math.log2(2 * math.exp(big) / BIN_WIDTH), rel=1e-4
    )


@pytest.mark.parametrize("family", ["laplace", "gaussian"])
def test_coverage_of_exact_samples_is_p(family):
    torch.manual_seed(0)
    scale = torch.exp(torch.randn(1, 3, 32, 32))  # a spatially varying true scale
    mean = torch.randn(1, 3, 32, 32)
    x = DIST[family](mean, scale).sample((64,)).squeeze(1)
    mean, log_scale = mean.expand_as(x), scale.log().expand_as(x)
    n = x.numel()
    for p in (0.5, 0.9):
        # 5 standard errors of a binomial proportion
        assert M.coverage(x, mean, log_scale, p, family) == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))
    assert M.calibration_error(x, mean, log_scale, family) < 0.005


def test_calibration_error_of_an_overconfident_scale():
    # true b = 1, predicted b = 1/2: P(|r| <= w_p / 2) = 1 - exp(-w_p / 2) = 1 - sqrt(1 - p)
    torch.manual_seed(1)
    x = Laplace(0.0, 1.0).sample((400000,)).view(1, 1, -1, 1)
    mean = torch.zeros_like(x)
    predicted = torch.tensor(math.log(0.5))
    expected = [1 - math.sqrt(1 - p) for p in M.CALIBRATION_LEVELS]
    observed = M.coverage_curve(x, mean, predicted, "laplace")
    assert observed == pytest.approx(expected, abs=0.004)
    gap = sum(abs(e - p) for e, p in zip(expected, M.CALIBRATION_LEVELS)) / 9
    assert M.calibration_error(x, mean, predicted) == pytest.approx(gap, abs=0.004)


def test_interval_half_width():
    assert M.interval_half_width(0.5, "laplace") == pytest.approx(math.log(2))
    assert M.interval_half_width(0.9, "gaussian") == pytest.approx(1.6448536269514722)
    with pytest.raises(ValueError, match=r"coverage level p must be in \(0, 1\), got 1.0"):
        M.interval_half_width(1.0, "laplace")


def test_spearman_against_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (500,), generator=g).double()  # many ties
    b = a + torch.randn(500, generator=g, dtype=torch.float64) * 2
    assert M.spearman_correlation(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert M.spearman_correlation(b, b.exp()) == pytest.approx(1.0)
    assert M.spearman_correlation(b, -b) == pytest.approx(-1.0)
    assert math.isnan(M.spearman_correlation(torch.ones(10), b[:10]))


def test_spearman_of_scale_and_error():
    target = torch.zeros(1, 1, 2, 3)
    mean = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, 0.6]).view(1, 1, 2, 3)
    assert M.spearman(target, mean, torch.log(mean.abs())) == pytest.approx(1.0)
    assert M.spearman(target, mean, -torch.log(mean.abs())) == pytest.approx(-1.0)
    assert math.isnan(M.spearman(target, mean, torch.tensor(0.0)))  # a global scale ranks nothing


def test_ause_hand_example():
    target = torch.zeros(1, 1, 1, 4)
    mean = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 1, 4)
    # scale ordered exactly like the error: 0
    assert M.ause(target, mean, torch.log(mean), steps=4) == pytest.approx(0.0, abs=1e-12)
    # scale ordered backwards: remove the smallest errors first.
    # remaining means by scale [2.5, 3, 3.5, 4], oracle [2.5, 2, 1.5, 1], divided by 2.5: mean gap 0.6
    fractions, by_scale, oracle = M.sparsification_curves(target, mean, -torch.log(mean), steps=4)
    torch.testing.assert_close(fractions, torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(by_scale, torch.tensor([2.5, 3.0, 3.5, 4.0], dtype=torch.float64) / 2.5)
    torch.testing.assert_close(oracle, torch.tensor([2.5, 2.0, 1.5, 1.0], dtype=torch.float64) / 2.5)
    assert M.ause(target, mean, -torch.log(mean), steps=4) == pytest.approx(0.6)


def test_ause_constant_scale_is_flat_in_expectation():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 3, 8, 8)
    mean = torch.rand(1, 3, 8, 8, generator=g)
    _, by_scale, oracle = M.sparsification_curves(target, mean, torch.tensor(0.0))
    torch.testing.assert_close(by_scale, torch.ones(100, dtype=torch.float64))  # ties removed "on average"
    assert M.ause(target, mean, torch.tensor(0.0)) == pytest.approx((1 - oracle).mean().item())
    with pytest.raises(ValueError, match="undefined for a perfect reconstruction"):
        M.ause(target, target, torch.tensor(0.0))


def test_chroma_against_pillows_luma():
    """Chroma = mean |channel - BT.601 luma|; Pillow's RGB -> L conversion uses the same weights."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)  # rounded to whole levels
    expected = np.abs(rgb.astype(np.float64) - luma[..., None]).mean() / 255
    ours = M.chroma(torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255)
    assert ours.item() == pytest.approx(expected, abs=0.5 / 255)
    hand = torch.tensor([0.8, 0.2, 0.4], dtype=torch.float64).view(1, 3, 1, 1)  # luma 0.4022
    assert M.chroma(hand).item() == pytest.approx((0.3978 + 0.2022 + 0.0022) / 3)


def test_chroma_kept_closed_forms():
    target = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    luma = (target * torch.tensor(M.LUMA_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    target[2] = luma[2]  # a grey image: nothing to keep
    for factor in (0.0, 0.5, 1.0, 1.7):  # grey, washed out, faithful, over-saturated
        kept = M.chroma_kept(luma + factor * (target - luma), target)
        torch.testing.assert_close(kept[:2], torch.full((2,), factor, dtype=torch.float64))
        assert kept[2].isnan()
    with pytest.raises(ValueError, match=r"differ in shape"):
        M.chroma_kept(target[:1], target)
    with pytest.raises(ValueError, match=r"RGB images \(B, 3, H, W\), got shape \(1, 1, 8, 8\)"):
        M.chroma(target[:1, :1])
