"""Post-hoc calibration: synthetic data where the right correction is known, the recalibrated CDF
against closed forms, storage."""

from __future__ import annotations

import math

import pytest
import torch

from hetvae import metrics as M
from hetvae.calibration import Calibration, CalibrationError, calibrated_metrics, fit_calibration
from hetvae.functional import discretized_nll, quantize_8bit


def _scale_mixture(p_low: float, low: float, high: float, seed: int, shape=(4, 3, 96, 96)) -> torch.Tensor:
    """A true log-scale that is ``low`` with probability ``p_low`` and ``high`` elsewhere: errors
    heavier-tailed than one Laplace under a constant predicted scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < p_low, low, high).double()


def _laplace_data(true_log_scale: torch.Tensor, seed: int = 0, family: str = "laplace"):
    """8-bit targets drawn around a smooth mean with the given per-pixel log-scale."""
    g = torch.Generator().manual_seed(seed)
    shape = true_log_scale.shape
    mean = 0.5 * torch.sin(torch.linspace(0, 20, shape[-1])).expand(shape).clone()
    if family == "laplace":
        u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
        noise = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
    target = quantize_8bit((mean + noise * true_log_scale.exp()).clamp(-1, 1))
    return target, mean


def _pixel_log_scale(shape, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-3.0 + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-4.5, -1.5)


def test_affine_recovers_a_known_offset_and_slope():
    shape = (4, 3, 64, 64)
    s_true = _pixel_log_scale(shape)
    target, mean = _laplace_data(s_true)
    # the model predicts s with s_true = 0.8 * s + 0.3 * c_ch ...: a known affine distortion per channel
    a_true = torch.tensor([0.8, 1.0, 1.25], dtype=torch.float64)
    c_true = torch.tensor([-0.7, 0.4, 0.9], dtype=torch.float64)
    s_pred = (s_true - c_true.view(3, 1, 1)) / a_true.view(3, 1, 1)
    cal = fit_calibration(target, mean, s_pred, "laplace", "affine")
    torch.testing.assert_close(cal.slope, a_true, atol=0.05, rtol=0)
    torch.testing.assert_close(cal.offset, c_true, atol=0.15, rtol=0)
    assert cal.bpd_after < cal.bpd_before
    fixed = cal.apply(s_pred)
    assert (fixed - s_true).abs().mean() < 0.05


def test_a_map_that_barely_varies_gets_its_large_slope():
    """A head after a few steps: its map varies by 1e-5 around its init, in the right order. The
    affine fit must find the slope of ~1e5 that spreads it (the unstandardised fit overshot to an
    infinite slope and refused its own result)."""
    shape = (4, 3, 56, 56)
    s_true = _pixel_log_scale(shape)
    target, mean = _laplace_data(s_true)
    faint = (s_true + 3.0) * 1e-5
    cal = fit_calibration(target, mean, faint, "laplace", "affine")
    torch.testing.assert_close(cal.slope, torch.full((3,), 1e5, dtype=torch.float64), rtol=0.1, atol=0)
    assert (cal.apply(faint) - s_true).abs().mean() < 0.1 and cal.bpd_after < cal.bpd_before


def test_a_map_that_ranks_the_errors_backwards_is_flattened_not_refused():
    """A map that is large exactly where the errors are small: the best slope that keeps the map's
    order is 0, a constant level. The fit ends near it on a valid calibration that improves bits/dim."""
    shape = (4, 3, 56, 56)
    s_true = _pixel_log_scale(shape)
    target, mean = _laplace_data(s_true)
    backwards = -(s_true + 3.0) - 3.0
    cal = fit_calibration(target, mean, backwards, "laplace", "affine")
    assert (cal.slope > 0).all() and (cal.slope < 1e-2).all()
    assert cal.bpd_after < cal.bpd_before


@pytest.mark.parametrize("family", ["laplace", "gaussian"])
def test_scales_off_by_a_known_factor_are_corrected_to_it(family):
    shape = (8, 3, 64, 64)
    s_true = _pixel_log_scale(shape)
    target, mean = _laplace_data(s_true, family=family)
    factor = 2.5  # the model is over-confident by this factor in every pixel
    cal = fit_calibration(target, mean, s_true - math.log(factor), family, "affine")
    torch.testing.assert_close(cal.slope, torch.ones(3, dtype=torch.float64), atol=0.03, rtol=0)
    # over the predicted range, the corrected scale is the predicted one times the factor
    s_pred = s_true - math.log(factor)
    gained = (cal.apply(s_pred) - s_pred).exp()
    torch.testing.assert_close(gained.mean(dim=(0, 2, 3)), torch.full((3,), factor, dtype=torch.float64), rtol=0.03, atol=0)
    assert gained.std() / gained.mean() < 0.03
    before = M.calibration_error(target, mean, s_true - math.log(factor), family)
    after = calibrated_metrics(target, mean, s_true - math.log(factor), cal)["calibration_error"]
    assert before > 0.2 and after < 0.01


def test_a_constant_scale_gets_only_an_offset():
    shape = (2, 3, 128, 128)
    s_true = torch.full(shape, -3.0, dtype=torch.float64)
    target, mean = _laplace_data(s_true)
    cal = fit_calibration(target, mean, torch.tensor(-2.0), "laplace", "affine")
    assert cal.slope.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(cal.offset, torch.full((3,), -1.0, dtype=torch.float64), atol=0.03, rtol=0)


def test_isotonic_fixes_a_shape_the_affine_cannot():
    """Errors from a scale mixture (heavier-tailed than one Laplace) under a constant predicted
    scale: no offset calibrates every level; the CDF recalibration does, on fresh samples too."""
    hidden = _scale_mixture(0.7, -4.0, -2.2, seed=3)
    target, mean = _laplace_data(hidden, seed=4)
    s = torch.full((1, 3, 1, 1), -3.0, dtype=torch.float64)
    affine = fit_calibration(target, mean, s, "laplace", "affine")
    iso = fit_calibration(target, mean, s, "laplace", "isotonic")
    t2, m2 = _laplace_data(hidden, seed=5)
    aff = calibrated_metrics(t2, m2, s, affine)
    rec = calibrated_metrics(t2, m2, s, iso)
    assert aff["calibration_error"] > 0.03
    assert rec["calibration_error"] < 0.01
    assert abs(rec["coverage_90"] - 0.9) < 0.01
    assert rec["nll_bpd"] < aff["nll_bpd"] - 0.05
    assert iso.bpd_after < affine.bpd_after


def test_identity_recalibration_is_the_family_itself():
    """With R the identity (knots evenly spaced) the recalibrated discretized NLL is the
    family's discretized NLL, and that equals differences of torch.distributions CDFs."""
    shape = (2, 3, 16, 16)
    s = _pixel_log_scale(shape)
    target, mean = _laplace_data(s)
    k = torch.linspace(0, 1, 11, dtype=torch.float64).expand(3, 11).clone()
    ident = Calibration("isotonic", "laplace", torch.ones(3), torch.zeros(3), knots=k)
    got = ident.discretized_nll(target, mean, s)
    torch.testing.assert_close(got, discretized_nll(target, mean, s, "laplace").double(), rtol=1e-9, atol=1e-9)
    d = torch.distributions.Laplace(mean, s.exp())
    lo = torch.where(target <= -1 + 1e-9, torch.tensor(0.0, dtype=torch.float64), d.cdf(target - 1 / 255))
    hi = torch.where(target >= 1 - 1e-9, torch.tensor(1.0, dtype=torch.float64), d.cdf(target + 1 / 255))
    torch.testing.assert_close(got, -(hi - lo).log(), rtol=1e-6, atol=1e-9)


def test_recalibrated_bin_masses_sum_to_one():
    k = torch.tensor([[0.0, 0.2, 0.35, 0.9, 1.0]], dtype=torch.float64)
    cal = Calibration("isotonic", "laplace", torch.ones(1), torch.zeros(1), knots=k)
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    target = levels.view(1, 1, 1, 256)
    for mu, s in ((0.1, -3.0), (-0.97, -2.0), (0.5, -6.0)):
        mean = torch.full_like(target, mu)
        mass = torch.exp(-cal.discretized_nll(target, mean, torch.full_like(target, s))).sum()
        assert abs(mass.item() - 1.0) < 1e-9


def test_too_few_pixels_is_refused():
    target = torch.zeros(1, 3, 8, 8)
    with pytest.raises(CalibrationError, match="at least"):
        fit_calibration(target, target, torch.tensor(-3.0), "laplace", "affine")


def test_interval_factor_makes_the_returned_scale_cover_90_percent():
    hidden = _scale_mixture(0.6, -4.0, -2.0, seed=7)
    target, mean = _laplace_data(hidden, seed=8)
    s = torch.full((1, 3, 1, 1), -3.0, dtype=torch.float64)
    iso = fit_calibration(target, mean, s, "laplace", "isotonic")
    returned = iso.apply(s)
    assert abs(M.coverage(target, mean, returned, 0.9, "laplace") - 0.9) < 0.01


def test_storage_round_trip(tmp_path):
    k = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
    cal = Calibration("isotonic", "gaussian", torch.tensor([1.1, 0.9]), torch.tensor([0.2, -0.1]), knots=k,
                      n_pixels=12345, bpd_before=5.0, bpd_after=4.9)
    path = cal.save(tmp_path / "c.safetensors")
    back = Calibration.load(path)
    assert back.method == "isotonic" and back.family == "gaussian" and back.n_pixels == 12345
    torch.testing.assert_close(back.knots, k)
    torch.testing.assert_close(back.slope, cal.slope)
    s = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(back.apply(s), cal.apply(s))
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "none.safetensors"))
    with pytest.raises(CalibrationError, match="holds no calibration"):
        Calibration.load(tmp_path / "none.safetensors")


def test_invalid_calibrations_name_the_problem(tmp_path):
    with pytest.raises(CalibrationError, match="method"):
        Calibration("spline", "laplace", torch.ones(3), torch.zeros(3))
    with pytest.raises(CalibrationError, match="slope"):
        Calibration("affine", "laplace", -torch.ones(3), torch.zeros(3))
    with pytest.raises(CalibrationError, match="knots"):
        Calibration("isotonic", "laplace", torch.ones(1), torch.zeros(1), knots=torch.tensor([[0.0, 0.6, 0.5, 1.0]]))
    cal = Calibration("affine", "laplace", torch.ones(3), torch.zeros(3))
    with pytest.raises(CalibrationError, match="channels"):
        cal.apply(torch.zeros(1, 2, 4, 4))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CalibrationError, match="bad.safetensors"):
        Calibration.load(bad)
