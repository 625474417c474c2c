"""The NLL formulas against torch.distributions, finite differences and closed forms."""

import math

import pytest
import torch
from torch.distributions import Laplace, Normal

from hetvae import functional as F

DIST = {"laplace": Laplace, "gaussian": Normal}


def _data(shape=(2, 3, 5, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    mu = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    return x, mu, g


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("scale_shape", [(), (3,), (2, 3, 5, 4), (2, 1, 5, 4), (1, 3, 1, 1)])
def test_nll_with_constant_is_minus_log_prob(family, scale_shape):
    x, mu, g = _data()
    s = torch.randn(scale_shape, generator=g, dtype=torch.float64)
    s_b = s.view(1, 3, 1, 1) if scale_shape == (3,) else s
    expected = -DIST[family](mu, torch.exp(s_b)).log_prob(x)
    fn = F.laplace_nll if family == "laplace" else F.gaussian_nll
    torch.testing.assert_close(fn(x, mu, s), expected, rtol=1e-12, atol=1e-12)
    # without the constant it differs by exactly log 2 / 0.5 log 2 pi
    torch.testing.assert_close(fn(x, mu, s, include_constant=False), expected - F.log_normalizer(family))


@pytest.mark.parametrize("family", F.FAMILIES)
def test_nll_gradcheck(family):
    x, mu, g = _data(shape=(2, 3, 3, 2))
    s = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64)
    mu.requires_grad_(True)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, ls: F.nll(x, m, ls, family), (mu, s))


@pytest.mark.parametrize(
    "bad_shape",
    [(4,), (2, 3), (3, 5, 4), (2, 2, 5, 4), (2, 3, 5, 3), (1, 1, 1, 1, 1)],
)
def test_bad_log_scale_shape_names_both_shapes(bad_shape):
    x, mu, _ = _data()
    with pytest.raises(ValueError, match=r"log_scale of shape \(.*\) does not fit target of shape \(2, 3, 5, 4\)"):
        F.laplace_nll(x, mu, torch.zeros(bad_shape, dtype=x.dtype))


def test_mismatched_mean_and_bad_family():
    x, mu, _ = _data()
    with pytest.raises(ValueError, match=r"mean of shape \(2, 3, 5\) must have the shape of target \(2, 3, 5, 4\)"):
        F.gaussian_nll(x, mu[..., 0], torch.tensor(0.0))
    with pytest.raises(ValueError, match="family must be one of"):
        F.nll(x, mu, torch.tensor(0.0), "cauchy")


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(family, dtype):
    x = torch.full((1, 3, 2, 2), 1e4, dtype=dtype)
    mu = torch.zeros_like(x)
    out = F.nll(x, mu, torch.tensor(-7.0, dtype=dtype), family)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # 0.5 * 1e8 * e^14 overflows float16 but not float32
    assert out.max() > 6e4


def test_beta_weight_values_and_no_grad():
    s = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    torch.testing.assert_close(F.beta_weight(s, 0.0, "laplace"), torch.ones(3))
    torch.testing.assert_close(F.beta_weight(s, 0.5, "laplace"), torch.exp(0.5 * s.detach()))
    torch.testing.assert_close(F.beta_weight(s, 0.5, "gaussian"), torch.exp(s.detach()))
    assert not F.beta_weight(s, 1.0, "gaussian").requires_grad
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        F.beta_weight(s, 1.5, "laplace")


def test_soft_clamp_identity_band_bounds_and_smoothness():
    x = torch.linspace(-60, 60, 20001, dtype=torch.float64)
    y = F.soft_clamp(x, -7.0, 3.0, 1.0)
    band = (x >= -6) & (x <= 2)
    assert torch.equal(y[band], x[band])
    assert (y >= -7).all() and (y <= 3).all()
    moderate = x.abs() < 30  # beyond that exp() underflows and the value rounds onto the bound
    assert (y[moderate] > -7).all() and (y[moderate] < 3).all()
    assert (torch.diff(y) >= 0).all() and (torch.diff(y)[x[1:].abs() < 30] > 0).all()
    # gradient continuous at the joins and finite everywhere, including huge inputs
    xx = torch.tensor([-6.0 - 1e-9, -6.0 + 1e-9, 2.0 - 1e-9, 2.0 + 1e-9, -1e30, 1e30], dtype=torch.float64)
    xx.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.soft_clamp(xx, -7.0, 3.0).sum(), xx)
    torch.testing.assert_close(grad[:4], torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.isfinite(grad).all()
    xs = (torch.randn(50, dtype=torch.float64) * 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: F.soft_clamp(t, -7.0, 3.0), (xs,))
    with pytest.raises(ValueError, match="high - low > 2 \\* margin"):
        F.soft_clamp(x, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu,s", [(0.3, -3.0), (0.0, -9.0), (1.0, -6.0), (-1.7, 2.0), (0.5, -20.0), (0.1, 4.0)])
def test_discretized_likelihood_sums_to_one(family, dtype, mu, s):
    values = (-1 + torch.arange(256, dtype=dtype) * F.BIN_WIDTH).view(256, 1, 1, 1)
    lp = F.discretized_log_likelihood(values, torch.full_like(values, mu), torch.tensor(s, dtype=dtype), family)
    assert torch.isfinite(lp).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(lp.exp().sum().item() - 1.0) < tol


@pytest.mark.parametrize("family", F.FAMILIES)
def test_discretized_matches_cdf_differences_and_density_limit(family):
    x, mu, g = _data(dtype=torch.float64)
    x = F.quantize_8bit(x)
    s = torch.randn(x.shape, generator=g, dtype=torch.float64) - 2
    lp = F.discretized_log_likelihood(x, mu, s, family)
    d = DIST[family](mu, torch.exp(s))
    hi = torch.where(x >= 1 - 1e-9, torch.ones_like(x), d.cdf(x + F.BIN_WIDTH / 2))
    lo = torch.where(x <= -1 + 1e-9, torch.zeros_like(x), d.cdf(x - F.BIN_WIDTH / 2))
    torch.testing.assert_close(lp.exp(), hi - lo, rtol=1e-9, atol=1e-12)
    # a scale much wider than a bin: mass ~ density * bin width, away from the open edge bins
    # and from the bin holding the mean (the Laplace density has a kink there)
    inner = (x.abs() < 0.9) & ((x - mu).abs() < 0.5) & ((x - mu).abs() > F.BIN_WIDTH)
    wide = torch.full_like(x, 0.0)
    lp_wide = F.discretized_log_likelihood(x, mu, wide, family)
    approx = -F.nll(x, mu, wide, family) + math.log(F.BIN_WIDTH)
    torch.testing.assert_close(lp_wide[inner], approx[inner], rtol=0, atol=1e-4)


def test_bits_per_dim_of_uniform_is_eight():
    x = (-1 + torch.arange(256, dtype=torch.float64) * F.BIN_WIDTH).view(1, 1, 16, 16)
    nats = torch.full_like(x, math.log(256.0))
    assert F.bits_per_dim(nats).item() == pytest.approx(8.0, abs=1e-12)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_discretized_gradients_are_finite_in_extremes(family):
    x = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 3)
    mu = torch.tensor([5.0, -5.0, -5.0, 5.0, 0.0, 0.9]).view(1, 1, 2, 3).requires_grad_(True)
    s = torch.tensor([-7.0, 3.0, -7.0, 3.0, -7.0, -7.0]).view(1, 1, 2, 3).requires_grad_(True)
    lp = F.discretized_log_likelihood(x, mu, s, family)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(mu.grad).all() and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("granularity", ["global", "channel"])
def test_optimal_log_scale_closed_form(family, granularity):
    x, mu, g = _data(shape=(4, 3, 6, 6))
    r = x - mu
    dims = (0, 1, 2, 3) if granularity == "global" else (0, 2, 3)
    if family == "laplace":
        expected = torch.log(r.abs().mean(dims))
    else:
        expected = 0.5 * torch.log((r * r).mean(dims))
    torch.testing.assert_close(F.optimal_log_scale(x, mu, granularity, family), expected)
    # weights give the weighted mean; integer weights equal repeating the elements
    w = torch.randint(0, 3, (4, 1, 1, 1), generator=g).to(x.dtype)
    w[0] = 1
    rep = w.flatten().long()
    xr, mr = x.repeat_interleave(rep, 0), mu.repeat_interleave(rep, 0)
    torch.testing.assert_close(
        F.optimal_log_scale(x, mu, granularity, family, weights=w), F.optimal_log_scale(xr, mr, granularity, family)
    )
    with pytest.raises(ValueError, match="closed-form scale exists for 'global' and 'channel'"):
        F.optimal_log_scale(x, mu, "pixel", family)
