"""Coupled colour channels: the functions against torch.distributions (a multivariate normal, products
of Laplace conditionals, CDF differences, numerical integration), gradients, zero coefficients bit
for bit, and HeteroscedasticNLL(channel_coupling=...) on the fused and the reference path."""

import pytest
import torch
from torch.distributions import Laplace, MultivariateNormal, Normal

from hetvae import functional as F
from hetvae.loss import CHANNEL_COUPLINGS, HeteroscedasticNLL

DIST = {"laplace": Laplace, "gaussian": Normal}
SHAPE = (2, 3, 4, 5)
ORDERS = [None, (2, 0, 1)]


def _data(shape=SHAPE, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    mu = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    return x, mu, g


def _coefficients(kind, g, shape=SHAPE, dtype=torch.float64):
    size = shape[1] * (shape[1] - 1) // 2
    if kind == "vector":
        return (torch.randn(size, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    return (torch.randn((shape[0], size) + shape[2:], generator=g, dtype=torch.float64) * 0.8).to(dtype)


def _per_pixel(a, shape=SHAPE):
    """Coefficients as a full map (B, P, H, W), for writing the math out pixel by pixel."""
    size = shape[1] * (shape[1] - 1) // 2
    return (a.view(1, size, 1, 1) if a.ndim == 1 else a).expand((shape[0], size) + shape[2:])


def _centre_by_hand(x, mu, a, order):
    """m_k = mu_k + sum_{j before k} a_kj (x_j - mu_j), written out channel by channel."""
    order = (0, 1, 2) if order is None else order
    a = _per_pixel(a, x.shape)
    m = mu.clone()
    r = x - mu
    (c0, c1, c2) = order
    m[:, c1] = mu[:, c1] + a[:, 0] * r[:, c0]
    m[:, c2] = mu[:, c2] + a[:, 1] * r[:, c0] + a[:, 2] * r[:, c1]
    return m


def test_pairs_sizes_and_orders():
    assert [F.coupling_size(c) for c in (1, 2, 3, 4)] == [0, 1, 3, 6]
    assert F.coupling_pairs(3) == ((1, 0), (2, 0), (2, 1))
    assert F.coupling_pairs(3, (2, 0, 1)) == ((0, 2), (1, 2), (1, 0))
    assert F.coupling_pairs(4) == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
    assert F.check_channel_order(None, 3) == (0, 1, 2)
    for bad in [(0, 1), (0, 1, 1), (0, 1, 3), "012", (0.0, 1.0, 2.0), (True, False, 2)]:
        with pytest.raises(ValueError, match="order"):
            F.check_channel_order(bad, 3)


@pytest.mark.parametrize("kind", ["vector", "map"])
@pytest.mark.parametrize("order", ORDERS)
def test_coupled_mean_by_hand(kind, order):
    x, mu, g = _data()
    a = _coefficients(kind, g)
    got = F.coupled_mean(x, mu, a, order)
    torch.testing.assert_close(got, _centre_by_hand(x, mu, a, order), rtol=1e-15, atol=1e-15)
    first = 0 if order is None else order[0]
    assert torch.equal(got[:, first], mu[:, first])  # the first channel is not shifted at all
    # a map broadcast along the batch and the spatial dimensions
    shared = a.view(1, 3, 1, 1) if kind == "vector" else a[:1, :, :1, :]
    torch.testing.assert_close(F.coupled_mean(x, mu, shared, order), _centre_by_hand(x, mu, shared.expand(2, 3, 4, 5), order))


@pytest.mark.parametrize("kind", ["vector", "map"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("scale_shape", [(), (3,), (2, 3, 4, 5), (2, 1, 4, 5)])
def test_gaussian_is_the_multivariate_normal_of_the_implied_covariance(kind, order, scale_shape):
    """r = x - mu, e = A r with A unit lower-triangular (-a_kj below the diagonal, in the order),
    e_k ~ N(0, b_k^2) independent: r ~ N(0, A^-1 diag(b^2) A^-T). The channels' coupled NLLs add up
    to that multivariate normal's NLL, pixel by pixel."""
    x, mu, g = _data()
    a = _coefficients(kind, g)
    s = torch.randn(scale_shape, generator=g, dtype=torch.float64) * 0.5 - 1.0
    got = F.coupled_nll(x, mu, s, a, "gaussian", order=order).sum(1)

    o = list((0, 1, 2) if order is None else order)
    b = torch.broadcast_to(torch.exp(s.view(1, 3, 1, 1) if s.ndim == 1 else s), SHAPE)
    # pixel-major (B, H, W, 3), channels in the coupling order
    xs, ms, bs = (t[:, o].permute(0, 2, 3, 1) for t in (x, mu, b))
    coeff = _per_pixel(a).permute(0, 2, 3, 1)
    A = torch.eye(3, dtype=torch.float64).expand(2, 4, 5, 3, 3).clone()
    A[..., 1, 0], A[..., 2, 0], A[..., 2, 1] = -coeff[..., 0], -coeff[..., 1], -coeff[..., 2]
    A_inv = torch.linalg.inv(A)
    cov = A_inv @ torch.diag_embed(bs**2) @ A_inv.transpose(-1, -2)
    want = -MultivariateNormal(ms, covariance_matrix=cov).log_prob(xs)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    # without the constant: 0.5 log(2 pi) per channel less
    got_nc = F.coupled_nll(x, mu, s, a, "gaussian", include_constant=False, order=order).sum(1)
    torch.testing.assert_close(got_nc, want - 3 * F.HALF_LOG_2PI, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", ["vector", "map"])
@pytest.mark.parametrize("order", ORDERS)
def test_laplace_is_the_product_of_laplace_conditionals(kind, order):
    x, mu, g = _data()
    a = _coefficients(kind, g)
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 - 1.0
    got = F.coupled_nll(x, mu, s, a, "laplace", order=order)
    o = (0, 1, 2) if order is None else order
    A = _per_pixel(a)
    r = x - mu
    want = torch.empty_like(x)
    centres = {
        o[0]: mu[:, o[0]],
        o[1]: mu[:, o[1]] + A[:, 0] * r[:, o[0]],
        o[2]: mu[:, o[2]] + A[:, 1] * r[:, o[0]] + A[:, 2] * r[:, o[1]],
    }
    for c, m in centres.items():
        want[:, c] = -Laplace(m, s[:, c].exp()).log_prob(x[:, c])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _edge_masses(family, centre, b, x):
    """F(x + 1/255) - F(x - 1/255) with torch.distributions' cdf, the edge bins open."""
    d = DIST[family](centre, b)
    hi = torch.where(x >= 1 - 1e-9, torch.ones_like(x), d.cdf(x + F.BIN_WIDTH / 2))
    lo = torch.where(x <= -1 + 1e-9, torch.zeros_like(x), d.cdf(x - F.BIN_WIDTH / 2))
    return hi - lo


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("kind", ["vector", "map"])
@pytest.mark.parametrize("order", ORDERS)
def test_discretized_is_the_cdf_difference_around_the_shifted_centre(family, kind, order):
    x, mu, g = _data()
    x = F.quantize_8bit(x)
    x[0, :, 0, 0], x[0, :, 0, 1] = -1.0, 1.0  # the open edge bins, in every channel
    a = _coefficients(kind, g)
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) - 3.0
    lp = F.coupled_discretized_log_likelihood(x, mu, s, a, family, order=order)
    centre = _centre_by_hand(x, mu, a, order)
    torch.testing.assert_close(lp.exp(), _edge_masses(family, centre, s.exp(), x), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(F.coupled_discretized_nll(x, mu, s, a, family, order=order), -lp, rtol=0, atol=0)
    # off-level values are rounded first, and the rounded earlier channels are what is conditioned on
    jitter = (torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5) * 0.9 * F.BIN_WIDTH
    torch.testing.assert_close(
        F.coupled_discretized_log_likelihood((x + jitter).clamp(-1, 1), mu, s, a, family, order=order), lp,
        rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("family", F.FAMILIES)
def test_discretized_matches_numerical_integration(family):
    """Interior bins: the mass is the integral of the conditional density over [x - 1/255, x + 1/255]."""
    x, mu, g = _data(shape=(1, 3, 2, 3))
    x = F.quantize_8bit(x * 0.9)
    mu = x + (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5) * 0.05
    a = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    s = torch.empty(x.shape, dtype=torch.float64).uniform_(-5.5, -3.5, generator=g)
    lp = F.coupled_discretized_log_likelihood(x, mu, s, a, family)
    centre = _centre_by_hand(x, mu, a, None)
    t = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64) * F.BIN_WIDTH
    grid = x.unsqueeze(-1) + t  # (..., 20001) points across each bin
    density = DIST[family](centre.unsqueeze(-1), s.exp().unsqueeze(-1)).log_prob(grid).exp()
    mass = torch.trapezoid(density, grid, dim=-1)
    torch.testing.assert_close(lp.exp(), mass, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("s", [-6.0, -3.0, 0.5])
def test_bin_masses_of_a_channel_sum_to_one_given_the_earlier_ones(family, dtype, tol, s):
    """Fix the earlier channels (random 8-bit values, strong coefficients), run channel k over all
    256 levels: its masses sum to 1, and they do not depend on the later channels."""
    g = torch.Generator().manual_seed(3)
    levels = -1 + torch.arange(256, dtype=torch.float64) * F.BIN_WIDTH
    a = torch.tensor([1.5, -2.0, 0.8], dtype=torch.float64).to(dtype)
    for order in ORDERS:
        o = (0, 1, 2) if order is None else order
        for p, k in enumerate(o):
            x = F.quantize_8bit(torch.rand(1, 3, 1, 1, generator=g, dtype=torch.float64) * 2 - 1).repeat(256, 1, 1, 1)
            x[:, k, 0, 0] = levels
            mu = (torch.rand(1, 3, 1, 1, generator=g, dtype=torch.float64) * 2.4 - 1.2).expand(256, 3, 1, 1)
            lp = F.coupled_discretized_log_likelihood(x.to(dtype), mu.to(dtype), torch.tensor(s, dtype=dtype), a, family, order=order)
            assert torch.isfinite(lp).all()
            assert abs(lp[:, k].double().exp().sum().item() - 1.0) < tol
            later = list(o[p + 1 :])
            if later:  # the later channels' values change nothing of channel k's masses
                y = x.clone()
                y[:, later] = F.quantize_8bit(torch.rand(256, len(later), 1, 1, generator=g, dtype=torch.float64) * 2 - 1)
                lp2 = F.coupled_discretized_log_likelihood(y.to(dtype), mu.to(dtype), torch.tensor(s, dtype=dtype), a, family, order=order)
                assert torch.equal(lp2[:, k], lp[:, k])


@pytest.mark.parametrize("family", F.FAMILIES)
def test_joint_masses_of_two_channels_sum_to_one(family):
    """Two channels, all 256 x 256 pairs of 8-bit values: the joint probabilities sum to 1."""
    levels = -1 + torch.arange(256, dtype=torch.float64) * F.BIN_WIDTH
    pairs = torch.cartesian_prod(levels, levels).view(-1, 2, 1, 1)
    mu = torch.tensor([0.2, -0.3], dtype=torch.float64).view(1, 2, 1, 1).expand_as(pairs)
    for a, s in [(0.9, [-3.0, -4.0]), (-2.5, [-1.0, -6.0]), (0.0, [0.5, -2.0])]:
        lp = F.coupled_discretized_log_likelihood(
            pairs, mu, torch.tensor(s, dtype=torch.float64), torch.tensor([a], dtype=torch.float64), family
        )
        assert abs(lp.sum(1).exp().sum().item() - 1.0) < 1e-11


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("kind", ["vector", "map"])
def test_gradcheck(family, kind):
    x, mu, g = _data(shape=(2, 3, 2, 2))
    a = _coefficients(kind, g, shape=(2, 3, 2, 2))
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) * 0.5 - 1.5
    leaves = [t.clone().requires_grad_(True) for t in (mu, s, a)]
    assert torch.autograd.gradcheck(lambda m, ls, c: F.coupled_nll(x, m, ls, c, family), leaves)
    assert torch.autograd.gradcheck(lambda m, ls, c: F.coupled_nll(x, m, ls, c, family, order=(1, 2, 0)), leaves)
    xq = F.quantize_8bit(x)
    assert torch.autograd.gradcheck(lambda m, ls, c: F.coupled_discretized_nll(xq, m, ls, c, family), leaves)
    # and in the (continuous) target, which the centre depends on
    xt = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: F.coupled_nll(t, mu, s, a, family), (xt,))


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale_shape", [(), (3,), (2, 3, 4, 5), (2, 1, 4, 5), (1, 3, 1, 1)])
def test_zero_coefficients_are_the_uncoupled_functions_bit_for_bit(family, dtype, scale_shape):
    x, mu, g = _data(dtype=dtype)
    s = (torch.randn(scale_shape, generator=g, dtype=torch.float64) - 2).to(dtype)
    xq = F.quantize_8bit(x.double()).to(dtype)
    for zeros in (torch.zeros(3, dtype=dtype), torch.zeros(2, 3, 4, 5, dtype=dtype), torch.zeros(1, 3, 1, 1, dtype=dtype)):
        for order in ORDERS:
            assert torch.equal(F.coupled_mean(x, mu, zeros, order), mu.to(F.compute_dtype(mu)))
            for constant in (True, False):
                got = F.coupled_nll(x, mu, s, zeros, family, constant, order=order)
                assert torch.equal(got, F.nll(x, mu, s, family, constant))
            for target in (x, xq):
                got = F.coupled_discretized_log_likelihood(target, mu, s, zeros, family, order=order)
                assert torch.equal(got, F.discretized_log_likelihood(target, mu, s, family))
                assert torch.equal(
                    F.coupled_discretized_nll(target, mu, s, zeros, family, order=order),
                    F.discretized_nll(target, mu, s, family),
                )


def test_half_precision_is_computed_in_float32():
    x, mu, g = _data(dtype=torch.float16)
    a = _coefficients("vector", g, dtype=torch.float16)
    out = F.coupled_nll(x, mu, torch.tensor(-2.0, dtype=torch.float16), a, "laplace")
    assert out.dtype == torch.float32
    want = F.coupled_nll(x.float(), mu.float(), torch.tensor(-2.0), a.float(), "laplace")
    assert torch.equal(out, want)


def test_bad_coefficients_and_orders_name_what_to_pass():
    x, mu, _ = _data()
    for bad in [(2,), (4,), (3, 1), (2, 2, 4, 5), (2, 3, 4, 4), (3, 3, 4, 5)]:
        with pytest.raises(ValueError, match=r"coefficients of shape \(.*\) do not fit target of shape \(2, 3, 4, 5\)"):
            F.coupled_mean(x, mu, torch.zeros(bad, dtype=torch.float64))
    with pytest.raises(ValueError, match="coefficients has dtype torch.int64"):
        F.coupled_nll(x, mu, torch.tensor(0.0), torch.zeros(3, dtype=torch.long), "laplace")
    with pytest.raises(ValueError, match="not a permutation"):
        F.coupled_nll(x, mu, torch.tensor(0.0), torch.zeros(3, dtype=torch.float64), "laplace", order=(0, 0, 1))
    with pytest.raises(ValueError, match="family must be one of"):
        F.coupled_nll(x, mu, torch.tensor(0.0), torch.zeros(3, dtype=torch.float64), "cauchy")
    with pytest.raises(ValueError, match=r"mean of shape \(2, 3, 4\) must have the shape of target"):
        F.coupled_discretized_nll(x, mu[..., 0], torch.tensor(0.0), torch.zeros(3, dtype=torch.float64), "laplace")
    # one channel: no coefficients, the plain NLL
    one = torch.zeros(0, dtype=torch.float64)
    assert torch.equal(F.coupled_nll(x[:, :1], mu[:, :1], torch.tensor(0.0), one, "gaussian"), F.gaussian_nll(x[:, :1], mu[:, :1], torch.tensor(0.0)))


# --- HeteroscedasticNLL(channel_coupling=...) ----------------------------------------------------


@pytest.fixture(params=["eager", "0"], ids=["fused", "reference"])
def fused_mode(request, monkeypatch):
    monkeypatch.setenv("HETVAE_FUSED", request.param)
    return request.param


def _crit(granularity="pixel", **kw):
    return HeteroscedasticNLL(granularity, bounds=(-9.0, 5.0), **kw).double()


def _grads(crit, x, mu, s, weights=None, extra=None):
    mu = mu.clone().requires_grad_(True)
    s = None if s is None else s.clone().requires_grad_(True)
    out = crit(x, mu, log_scale=s, weights=weights, extra_distance=extra)
    leaves = {"mean": mu, **({} if s is None else {"log_scale": s})}
    leaves.update((n, p) for n, p in crit.named_parameters() if p.requires_grad)
    # the per-element nll is differentiated too (SD's adaptive weight does)
    total = out.loss + (out.nll * torch.linspace(0.5, 1.5, out.nll.numel(), dtype=out.nll.dtype).view(out.nll.shape)).sum()
    return out, dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def test_none_is_the_default_and_changes_nothing(fused_mode):
    assert CHANNEL_COUPLINGS == ("none", "global", "pixel")
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) - 1
    for granularity, kw in [("global", {}), ("channel", {"faithful": True}), ("pixel", {"beta": 0.5})]:
        default, none = _crit(granularity, **kw), _crit(granularity, channel_coupling="none", **kw)
        assert none.coupling is None and none.channel_coupling == "none"
        assert list(none.state_dict()) == list(default.state_dict())
        none.load_state_dict(default.state_dict())  # a checkpoint saved before coupling existed loads as it did
        m = s if granularity == "pixel" else None
        (out_a, g_a), (out_b, g_b) = _grads(default, x, mu, m), _grads(none, x, mu, m)
        assert torch.equal(out_a.loss, out_b.loss) and torch.equal(out_a.nll, out_b.nll) and out_b.coupling is None
        assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[k], g_b[k]) for k in g_a)


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("granularity", ["global", "channel", "pixel"])
def test_zero_initialised_global_coupling_starts_exactly_where_none_is(family, granularity, fused_mode):
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) - 1 if granularity == "pixel" else None
    none, coupled = _crit(granularity, family=family), _crit(granularity, family=family, channel_coupling="global")
    assert torch.equal(coupled.coupling, torch.zeros(3, dtype=torch.float64))
    (out_a, g_a), (out_b, g_b) = _grads(none, x, mu, s), _grads(coupled, x, mu, s)
    assert torch.equal(out_a.loss, out_b.loss) and torch.equal(out_a.nll, out_b.nll)
    assert torch.equal(out_a.log_scale, out_b.log_scale)
    assert set(g_b) == set(g_a) | {"coupling"}
    assert all(torch.equal(g_a[k], g_b[k]) for k in g_a)  # the mean's, the map's, the scales'
    assert g_b["coupling"].abs().sum() > 0  # and the coefficients do get a gradient


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("order", ORDERS)
def test_global_coupling_is_the_coupled_nll_on_both_paths(family, beta, order, monkeypatch):
    """The loss is sum(w sg(b^beta) coupled_nll) / B; the fused path (eager and through the centre)
    gives the reference path's values and gradients for the mean, the map and the coefficients."""
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 - 1
    w = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    extra = torch.rand(2, 1, 1, 1, generator=g, dtype=torch.float64) * 0.1
    results = {}
    for mode in ("eager", "0"):
        monkeypatch.setenv("HETVAE_FUSED", mode)
        crit = _crit("pixel", family=family, beta=beta, channel_coupling="global", coupling_order=order, include_constant=True)
        with torch.no_grad():
            crit.coupling.copy_(torch.tensor([0.6, -0.3, 0.9], dtype=torch.float64))
        results[mode] = _grads(crit, x, mu, s, w, extra)
        out = results[mode][0]
        a = crit.coupling.detach()
        centre = _centre_by_hand(x, mu, a, order)
        b = s.exp()
        dist = DIST[family](centre, b)
        if family == "laplace":
            want = (-dist.log_prob(x)) + extra / b
        else:
            want = (-dist.log_prob(x)) + extra / b**2
        torch.testing.assert_close(out.nll, want, rtol=1e-12, atol=1e-12)
        bw = (b if family == "laplace" else b**2) ** beta
        torch.testing.assert_close(out.loss, (want * w * bw).sum() / 2, rtol=1e-12, atol=1e-12)
        assert torch.equal(out.coupling, a)
    (out_f, g_f), (out_r, g_r) = results["eager"], results["0"]
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-13, atol=0)
    assert set(g_f) == set(g_r) == {"mean", "log_scale", "coupling"}
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_r[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_global_coupling_gradients_against_autograd_of_the_functions(family, fused_mode):
    """Without weights: the loss and d/ds, d/da equal autograd through coupled_nll; d/dmu is the
    uncoupled NLL's (coupled_nll with zero coefficients) under the same scales: the coupling only
    shapes the likelihood, the mean trains as without it."""
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 - 1
    crit = _crit("pixel", family=family, channel_coupling="global")
    with torch.no_grad():
        crit.coupling.copy_(torch.tensor([1.1, 0.2, -0.7], dtype=torch.float64))
    m, ls = mu.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = crit(x, m, log_scale=ls)
    got = torch.autograd.grad(out.loss, [m, ls, crit.coupling])
    a = crit.coupling.detach().clone().requires_grad_(True)
    m2, ls2 = mu.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref = F.coupled_nll(x, m2, ls2, a, family, include_constant=False).sum() / 2
    _, want_s, want_a = torch.autograd.grad(ref, [m2, ls2, a])
    uncoupled = F.coupled_nll(x, m2, s, torch.zeros_like(a), family, include_constant=False).sum() / 2
    (want_mu,) = torch.autograd.grad(uncoupled, [m2])
    torch.testing.assert_close(out.loss, ref, rtol=1e-13, atol=0)
    for p, q in zip(got, [want_mu, want_s, want_a]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("mean_scale", ["map", "global"])
def test_faithful_coupling_is_the_maps_and_the_mean_keeps_one_scale(family, mean_scale, fused_mode):
    """faithful: the value and the map's and coefficients' gradients are the coupled NLL around the
    stopped mean; the mean's gradient is that of the *uncoupled* NLL under one scale, as without coupling."""
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 - 1
    crit = _crit("pixel", family=family, faithful=True, mean_scale=mean_scale, channel_coupling="global", include_constant=True)
    plain = _crit("pixel", family=family, faithful=True, mean_scale=mean_scale, include_constant=True)
    with torch.no_grad():
        crit.coupling.copy_(torch.tensor([0.8, -0.5, 0.4], dtype=torch.float64))
    m, ls = mu.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = crit(x, m, log_scale=ls)
    g_mu, g_s, g_a = torch.autograd.grad(out.loss, [m, ls, crit.coupling])
    a = crit.coupling.detach().clone().requires_grad_(True)
    ls2 = s.clone().requires_grad_(True)
    value = F.coupled_nll(x, mu, ls2, a, family).sum() / 2
    want_s, want_a = torch.autograd.grad(value, [ls2, a])
    torch.testing.assert_close(out.loss, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_s, want_s, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_a, want_a, rtol=1e-12, atol=1e-14)
    # the mean: exactly the uncoupled faithful loss's gradient for the same map
    m2 = mu.clone().requires_grad_(True)
    (want_mu,) = torch.autograd.grad(plain(x, m2, log_scale=s).loss, m2)
    assert torch.equal(g_mu, want_mu)
    torch.testing.assert_close(out.mean_nll, plain(x, mu, log_scale=s).mean_nll, rtol=0, atol=0)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_optimal_scale_is_that_of_the_conditional_residuals(family):
    x, mu, _ = _data()
    crit = _crit("channel", family=family, fit="optimal", channel_coupling="global")
    with torch.no_grad():
        crit.coupling.copy_(torch.tensor([0.5, 0.5, -0.5], dtype=torch.float64))
    centre = F.coupled_mean(x, mu, crit.coupling.detach())
    want = F.optimal_log_scale(x, centre, "channel", family).view(1, 3, 1, 1)
    torch.testing.assert_close(crit(x, mu).log_scale, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(crit.log_scale(x, mu), want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_discretized_nll_of_the_loss(family):
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) - 3
    for coupling in ("none", "global"):
        crit = _crit("pixel", family=family, channel_coupling=coupling)
        if coupling == "global":
            with torch.no_grad():
                crit.coupling.copy_(torch.tensor([0.5, 0.2, -0.5], dtype=torch.float64))
            want = F.coupled_discretized_nll(x, mu, s, crit.coupling.detach(), family)
        else:
            want = F.discretized_nll(x, mu, s, family)
        torch.testing.assert_close(crit.discretized_nll(x, mu, s), want, rtol=0, atol=0)


def test_objective_bits_per_dim_uses_the_coupling():
    from hetvae.distributions import DiagonalGaussian
    from hetvae.objective import AutoencoderObjective

    x, mu, _ = _data()
    crit = _crit("global", channel_coupling="global")
    with torch.no_grad():
        crit.coupling.copy_(torch.tensor([0.9, 0.1, 0.6], dtype=torch.float64))
    obj = AutoencoderObjective(nll=crit)

    class Rec:
        mean, log_scale = mu, None

    post = DiagonalGaussian(torch.zeros(2, 8, 2, 2, dtype=torch.float64))
    _, logs = obj.generator_loss(x, Rec(), post, 0, details=True)
    s = torch.tensor(0.0, dtype=torch.float64)
    want = F.bits_per_dim(F.coupled_discretized_nll(F.quantize_8bit(x), mu, s, crit.coupling.detach(), "laplace"))
    assert logs["bpd"] == pytest.approx(want.item(), rel=1e-12)
    assert (logs["coupling_c1_c0"], logs["coupling_c2_c0"], logs["coupling_c2_c1"]) == pytest.approx((0.9, 0.1, 0.6))


def test_state_dict_holds_the_coefficients():
    crit = HeteroscedasticNLL("channel", channel_coupling="global")
    assert sorted(n for n, _ in crit.named_parameters()) == ["coupling", "head.free"]
    with torch.no_grad():
        crit.coupling.copy_(torch.tensor([0.1, 0.2, 0.3]))
    state = crit.state_dict()
    assert set(state) == {"head.free", "coupling"} and state["coupling"].shape == (3,)
    other = HeteroscedasticNLL("channel", channel_coupling="global")
    other.load_state_dict(state)
    assert torch.equal(other.coupling, crit.coupling)
    # no silent mixing: a coupled state does not load into an uncoupled loss, nor the other way round
    with pytest.raises(RuntimeError, match="coupling"):
        HeteroscedasticNLL("channel").load_state_dict(state)
    with pytest.raises(RuntimeError, match="coupling"):
        other.load_state_dict(HeteroscedasticNLL("channel").state_dict())
    assert "channel_coupling='global'" in repr(crit) and "channel_coupling" not in repr(HeteroscedasticNLL("channel"))


def test_coupling_arguments_are_checked():
    for bad in ("Pixel", "Global", None, 1):
        with pytest.raises(ValueError, match=r"channel_coupling must be one of \('none', 'global', 'pixel'\)"):
            HeteroscedasticNLL("global", channel_coupling=bad)
    for granularity in ("global", "channel"):
        with pytest.raises(ValueError, match="channel_coupling='pixel' takes its coefficients from the decoder's per-pixel head"):
            HeteroscedasticNLL(granularity, channel_coupling="pixel")
    with pytest.raises(ValueError, match="at least 2 channels"):
        HeteroscedasticNLL("global", channels=1, channel_coupling="global")
    with pytest.raises(ValueError, match="coupling_order needs channel_coupling='global' or 'pixel'"):
        HeteroscedasticNLL("global", coupling_order=(2, 1, 0))
    with pytest.raises(ValueError, match="not a permutation"):
        HeteroscedasticNLL("global", channel_coupling="global", coupling_order=(0, 1))
    x, mu, _ = _data()
    with pytest.raises(ValueError, match=r"coefficients of shape \(6,\) do not fit target of shape \(2, 3, 4, 5\)"):
        _crit("global", channels=4, channel_coupling="global")(x, mu)


def test_a_toy_fit_recovers_the_coupling():
    """Gaussian residuals drawn with a known coupling: fitting the loss's scales and coefficients by
    gradient descent recovers them (the ML coefficients are the regression coefficients)."""
    g = torch.Generator().manual_seed(0)
    true_a = torch.tensor([0.8, -0.4, 0.5], dtype=torch.float64)
    true_s = torch.tensor([-2.0, -2.5, -3.0], dtype=torch.float64)
    e = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64) * true_s.exp().view(1, 3, 1, 1)
    r = e.clone()
    r[:, 1] = e[:, 1] + true_a[0] * r[:, 0]
    r[:, 2] = e[:, 2] + true_a[1] * r[:, 0] + true_a[2] * r[:, 1]
    mu = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64) - 0.5
    x = mu + r
    crit = _crit("channel", family="gaussian", channel_coupling="global", reduction="mean")
    opt = torch.optim.Adam(crit.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        crit(x, mu).loss.backward()
        opt.step()
    torch.testing.assert_close(crit.coupling.detach(), true_a, rtol=0, atol=0.05)
    torch.testing.assert_close(crit(x, mu).log_scale.flatten().detach(), true_s, rtol=0, atol=0.05)


@pytest.mark.parametrize("coupling", ["none", "global"])
def test_both_settings_run_on_the_fused_path(coupling, monkeypatch):
    """'none' calls the fused NLL once, with the mean itself; 'global' with the coupled centre for
    the value and the scales, then with the mean for the mean's (uncoupled) gradient."""
    from hetvae import fused

    monkeypatch.setenv("HETVAE_FUSED", "eager")
    calls = []
    original = fused.fused_nll
    monkeypatch.setattr(fused, "fused_nll", lambda target, mean, *rest: calls.append(mean) or original(target, mean, *rest))
    x, mu, g = _data()
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    crit = _crit("pixel", channel_coupling=coupling)
    crit(x, mu, log_scale=s)
    assert len(calls) == (1 if coupling == "none" else 2)
    assert (calls[0] is mu) == (coupling == "none")
    assert calls[-1] is mu
