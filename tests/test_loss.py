"""HeteroscedasticNLL and its heads: SD parity, reference densities, gradients, toy fits, errors."""

import pytest
import torch
from torch.distributions import Laplace, Normal
from torch.func import functional_call

from hetvae.functional import FAMILIES, optimal_log_scale
from hetvae.heads import _HEADS, GRANULARITIES, ChannelLogScale, GlobalLogScale, PixelLogScale, create_head
from hetvae.loss import HeteroscedasticNLL

DIST = {"laplace": Laplace, "gaussian": Normal}
SHAPE = (2, 3, 4, 5)


def _data(shape=SHAPE, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    mu = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    return x, mu, g


def _crit(granularity, **kw):
    return HeteroscedasticNLL(granularity, **kw).double()


def _map_for(granularity, g, shape=SHAPE, shared=False):
    if granularity != "pixel":
        return None
    c = 1 if shared else shape[1]
    return torch.randn((shape[0], c) + shape[2:], generator=g, dtype=torch.float64)


@pytest.mark.parametrize("init", [0.0, 0.7, -2.3])
@pytest.mark.parametrize("use_weights", [False, True])
def test_global_laplace_reproduces_stable_diffusion(init, use_weights):
    # SD (ldm LPIPSWithDiscriminator): nll = rec / exp(logvar) + logvar; weights*nll; sum / B
    x, mu, g = _data(dtype=torch.float32)
    p_loss = torch.rand(SHAPE[0], 1, 1, 1, generator=g)  # LPIPS per image
    weights = torch.rand(SHAPE, generator=g) if use_weights else None
    logvar = torch.full((), init)
    rec = (x - mu).abs() + 0.5 * p_loss
    sd = rec / torch.exp(logvar) + logvar
    if weights is not None:
        sd = weights * sd
    sd = torch.sum(sd) / sd.shape[0]

    crit = HeteroscedasticNLL("global", family="laplace", init=init, include_constant=False)
    out = crit(x, mu, weights=weights, extra_distance=0.5 * p_loss)
    torch.testing.assert_close(out.loss, sd, rtol=1e-6, atol=0)
    assert out.log_scale.shape == () and out.log_scale == torch.tensor(init)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "granularity,shared", [("global", False), ("channel", False), ("pixel", False), ("pixel", True)]
)
def test_include_constant_matches_torch_distributions(family, granularity, shared):
    x, mu, g = _data()
    crit = _crit(granularity, family=family, include_constant=True, init=0.3)
    if granularity != "pixel":  # move the learned values away from init so channels differ
        with torch.no_grad():
            crit.head.free.copy_(torch.randn(crit.head.free.shape, generator=g, dtype=torch.float64))
    out = crit(x, mu, log_scale=_map_for(granularity, g, shared=shared))
    expected = -DIST[family](mu, torch.exp(out.log_scale)).log_prob(x)
    torch.testing.assert_close(out.nll, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.sum() / SHAPE[0], rtol=1e-12, atol=1e-12)
    expected_shape = {"global": (), "channel": (1, 3, 1, 1), "pixel": (2, 1 if shared else 3, 4, 5)}
    assert tuple(out.log_scale.shape) == expected_shape[granularity]


def test_mean_reduction_and_weights():
    x, mu, g = _data()
    w = torch.rand(SHAPE, generator=g, dtype=torch.float64)
    out = _crit("channel", reduction="mean")(x, mu, weights=w)
    torch.testing.assert_close(out.loss, (w * out.nll).mean())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck(family, granularity, beta):
    x, mu, g = _data(shape=(2, 3, 3, 2))
    crit = _crit(granularity, family=family, beta=beta)
    if granularity == "pixel":
        scale = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64)

        def fn(m, s):
            return crit(x, m, log_scale=s).loss
    else:
        scale = torch.randn(crit.head.free.shape, generator=g, dtype=torch.float64) * 0.5

        def fn(m, s):
            return functional_call(crit, {"head.free": s}, (x, m)).loss

    mu.requires_grad_(True)
    scale.requires_grad_(True)
    if beta == 0.0:
        assert torch.autograd.gradcheck(fn, (mu, scale))
    else:
        # beta's weight is a stop-gradient: finite differences see it move with s, autograd must not,
        # so check the mean by finite differences and the scale against the closed form.
        assert torch.autograd.gradcheck(lambda m: fn(m, scale.detach()), (mu,))
        (grad_s,) = torch.autograd.grad(fn(mu.detach(), scale), scale)
        s = crit(x, mu.detach(), log_scale=scale.detach() if granularity == "pixel" else None).log_scale
        if granularity != "pixel":
            s = crit.head.bound(crit.head.init + scale.detach())
            s = s if granularity == "global" else s.view(1, 3, 1, 1)
        k = 1.0 if family == "laplace" else 2.0
        d = (x - mu.detach()).abs() if family == "laplace" else 0.5 * (x - mu.detach()) ** 2
        dnll_ds = -k * d * torch.exp(-k * s) + 1.0  # identity band of the soft clamp: ds/dfree = 1
        per_elem = torch.exp(k * beta * s) * dnll_ds / x.shape[0]
        expected = per_elem.sum() if granularity == "global" else per_elem
        if granularity == "channel":
            expected = per_elem.sum(dim=(0, 2, 3))
        torch.testing.assert_close(grad_s, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_one_gives_the_mean_the_plain_gradient(family):
    x, mu, g = _data()
    mu.requires_grad_(True)
    s = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64) * 2
    out = _crit("pixel", family=family, beta=1.0)(x, mu, log_scale=s)
    (grad,) = torch.autograd.grad(out.loss, mu)
    plain = (x - mu).abs() if family == "laplace" else 0.5 * (x - mu) ** 2
    (expected,) = torch.autograd.grad(plain.sum() / x.shape[0], mu)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # and beta=0 does not (the scale divides it)
    (grad0,) = torch.autograd.grad(_crit("pixel", family=family)(x, mu, log_scale=s).loss, mu)
    assert not torch.allclose(grad0, expected)


def _fit(params, loss_fn, steps, lr):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


@pytest.mark.parametrize("family", FAMILIES)
def test_toy_fit_recovers_known_channel_scales(family):
    torch.manual_seed(0)
    true = torch.tensor([0.05, 0.2, 0.8])
    noise = DIST[family](torch.zeros(3), true).sample((4000, 16)).permute(0, 2, 1).reshape(4000, 3, 4, 4)
    crit = HeteroscedasticNLL("channel", family=family, reduction="mean")
    _fit(crit.parameters(), lambda: crit(noise, torch.zeros_like(noise)).loss, steps=600, lr=0.05)
    fitted = crit.log_scale(noise, torch.zeros_like(noise)).exp().flatten()
    torch.testing.assert_close(fitted, true, rtol=0.05, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_toy_fit_recovers_known_pixel_scales(family):
    torch.manual_seed(0)
    n, shape = 10000, (1, 3, 6, 6)
    true = torch.exp(torch.linspace(-3.0, 0.0, 108)).view(shape)  # a known, spatially varying map
    noise = DIST[family](torch.zeros(shape), true).sample((n,)).squeeze(1)
    predicted = torch.zeros(shape, requires_grad=True)  # a free map standing in for the decoder's head
    crit = HeteroscedasticNLL("pixel", family=family, reduction="mean")
    zeros = torch.zeros_like(noise)
    _fit([predicted], lambda: crit(noise, zeros, log_scale=predicted.expand_as(noise)).loss, steps=400, lr=0.05)
    fitted = crit.log_scale(noise[:1], zeros[:1], predicted).exp()
    torch.testing.assert_close(fitted, true, rtol=0.05, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["global", "channel"])
def test_closed_form_equals_the_optimised_minimiser(family, granularity):
    x, mu, _ = _data(shape=(4, 3, 8, 8))
    learned = _crit(granularity, family=family)
    opt = torch.optim.LBFGS(
        learned.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = learned(x, mu).loss
        loss.backward()
        return loss

    opt.step(closure)
    s_learned = learned(x, mu).log_scale
    s_closed = optimal_log_scale(x, mu, granularity, family)
    torch.testing.assert_close(s_learned.flatten(), s_closed.flatten(), rtol=0, atol=1e-6)
    optimal = _crit(granularity, family=family, fit="optimal")
    assert not list(optimal.parameters())
    torch.testing.assert_close(optimal(x, mu).loss, learned(x, mu).loss, rtol=1e-10, atol=0)


def _extreme_loss(family, granularity, dtype, push):
    """Residuals of up to ~3e4 with log-scales pushed far past the bounds; returns loss, log-scale, grads."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=g) * 1e4).to(dtype)
    mu = torch.zeros(SHAPE, dtype=dtype, requires_grad=True)
    crit = HeteroscedasticNLL(granularity, family=family, beta=0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if granularity == "pixel":
        s = torch.full(SHAPE, push, dtype=dtype, requires_grad=True)
        out = crit(x, mu, log_scale=s)
        params = [mu, s]
    else:
        with torch.no_grad():
            crit.head.free.fill_(push)  # far past the bounds: the soft clamp holds it there
        out = crit(x, mu)
        params = [mu, crit.head.free]
    return crit, out, torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("push", [-1e4, 1e4])
def test_half_precision_extremes_stay_finite(family, granularity, dtype, push):
    crit, out, grads = _extreme_loss(family, granularity, dtype, push)
    lo, hi = crit.head.bounds
    assert lo <= out.log_scale.min() and out.log_scale.max() <= hi
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and torch.isfinite(out.nll).all()
    # The exact gradient, in float64, tells which values a half tensor can hold at all: the Gaussian
    # at the lower bound has d/dmu = r e^{14} / B ~ 1e10, beyond float16's 65504 (bfloat16 holds it).
    _, ref, ref_grads = _extreme_loss(family, granularity, torch.float64, push)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-2, atol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        representable = ref_grad.abs() < torch.finfo(grad.dtype).max
        if dtype == torch.bfloat16 or family == "laplace":
            assert representable.all()
        assert torch.isfinite(grad[representable]).all()


def test_log_scale_parameters_train_and_head_names():
    assert set(_HEADS) == {"global", "channel", "pixel"}
    assert isinstance(create_head("global"), GlobalLogScale)
    assert isinstance(create_head("channel", channels=4), ChannelLogScale)
    assert isinstance(create_head("pixel"), PixelLogScale)
    assert [n for n, _ in HeteroscedasticNLL("global").named_parameters()] == ["head.free"]
    assert list(HeteroscedasticNLL("pixel").parameters()) == []


def test_errors_say_what_to_pass():
    x, mu, _ = _data()
    with pytest.raises(ValueError, match="unknown granularity 'voxel'; valid names: global, channel, pixel"):
        HeteroscedasticNLL("voxel")
    with pytest.raises(ValueError, match="granularity 'pixel' needs the decoder's predicted map: pass log_scale="):
        _crit("pixel")(x, mu)
    for g in ("global", "channel"):
        with pytest.raises(ValueError, match=f"granularity '{g}' takes no predicted log_scale map"):
            _crit(g)(x, mu, log_scale=torch.zeros(2, 3, 4, 5, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"predicted log_scale map of shape \(2, 2, 4, 5\) does not fit target"):
        _crit("pixel")(x, mu, log_scale=torch.zeros(2, 2, 4, 5, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"predicted log_scale map of shape \(2, 3, 4, 4\) does not fit target"):
        _crit("pixel")(x, mu, log_scale=torch.zeros(2, 3, 4, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="ChannelLogScale has 4 channels but target"):
        _crit("channel", channels=4)(x, mu)
    with pytest.raises(ValueError, match="PixelLogScale has 4 channels but target"):
        _crit("pixel", channels=4)(x, mu, log_scale=torch.zeros(2, 1, 4, 5, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"mean of shape \(2, 3, 4\) must have the shape of target"):
        _crit("global")(x, mu[..., 0])
    with pytest.raises(ValueError, match="family must be one of"):
        HeteroscedasticNLL("global", family="student")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got -0.1"):
        HeteroscedasticNLL("global", beta=-0.1)
    with pytest.raises(ValueError, match="reduction must be 'batch' or 'mean'"):
        HeteroscedasticNLL("global", reduction="sum")
    with pytest.raises(ValueError, match=r"init=5.0 must lie inside bounds \(-7.0, 3.0\)"):
        HeteroscedasticNLL("global", init=5.0)
    with pytest.raises(ValueError, match="need high - low > 2 \\* margin > 0"):
        HeteroscedasticNLL("global", bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="fit='optimal' exists for 'global' and 'channel' granularity only"):
        HeteroscedasticNLL("pixel", fit="optimal")


# --- faithful heteroscedastic training -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_faithful_splits_the_gradients(family):
    """Value: the per-pixel NLL. Mean: the gradient of the NLL under one scale exp(s_bar),
    s_bar = log mean exp(s) (what a global scale gives it). Map: the per-pixel NLL around the
    stopped mean, written out with torch.distributions."""
    x, mu, g = _data()
    s = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 0.5 - 1.0)
    mu.requires_grad_(True)
    s.requires_grad_(True)
    out = _crit("pixel", family=family, faithful=True, include_constant=True, bounds=(-9.0, 5.0))(x, mu, log_scale=s)
    reference = -DIST[family](mu.detach(), s.exp()).log_prob(x)
    torch.testing.assert_close(out.loss, reference.sum() / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.nll, reference.detach(), rtol=1e-12, atol=1e-12)
    g_mu, g_s = torch.autograd.grad(out.loss, [mu, s])
    s_bar = torch.logsumexp(s.detach().flatten(), 0) - torch.log(torch.tensor(float(s.numel()), dtype=torch.float64))
    shared = -DIST[family](mu, s_bar.exp()).log_prob(x)
    (expected_mu,) = torch.autograd.grad(shared.sum() / 2, mu)
    (expected_s,) = torch.autograd.grad(reference.sum() / 2, s)
    torch.testing.assert_close(g_mu, expected_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_s, expected_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean_nll, shared.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_faithful_channel_scale_splits_the_gradients(family):
    """Per-channel scales: the value is the per-channel NLL, the mean gets the gradient of one scale
    s_bar = log mean_c exp(s_c) (a global scale's), the channel scales the NLL around the stopped mean."""
    x, mu, _ = _data()
    crit = _crit("channel", family=family, faithful=True, include_constant=True, bounds=(-9.0, 5.0))
    with torch.no_grad():
        crit.head.free.copy_(torch.tensor([-1.5, -0.4, 0.3], dtype=torch.float64))
    mu.requires_grad_(True)
    out = crit(x, mu)
    s = crit.head(x, mu.detach(), None)  # the bounded channel log-scales, (1, 3, 1, 1), still a function of free
    reference = -DIST[family](mu.detach(), s.exp().expand(SHAPE)).log_prob(x)
    torch.testing.assert_close(out.loss, reference.sum() / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.nll, reference.detach(), rtol=1e-12, atol=1e-12)
    g_mu, g_free = torch.autograd.grad(out.loss, [mu, crit.head.free])
    s_bar = torch.logsumexp(s.detach().flatten(), 0) - torch.log(torch.tensor(3.0, dtype=torch.float64))
    shared = -DIST[family](mu, s_bar.exp()).log_prob(x)
    (expected_mu,) = torch.autograd.grad(shared.sum() / 2, mu)
    (expected_free,) = torch.autograd.grad(reference.sum() / 2, crit.head.free)
    torch.testing.assert_close(g_mu, expected_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_free, expected_free, rtol=1e-12, atol=1e-12)
    # without faithful the mean's gradient is each channel's own, 1 / b_c times the global one's
    (plain_mu,) = torch.autograd.grad(_crit("channel", family=family, bounds=(-9.0, 5.0)).double()(x, mu).loss, mu)
    assert not torch.allclose(plain_mu, expected_mu)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_faithful_mean_scale_global_gives_the_mean_a_global_models_gradients(family, granularity):
    """mean_scale='global': the value is still the map's (the channel scales') NLL, but the mean and
    the loss's own global log-scale get exactly the gradients of HeteroscedasticNLL('global') with
    that scale, written out here with torch.distributions."""
    x, mu, g = _data()
    log_scale = _map_for(granularity, g)
    crit = _crit(granularity, family=family, faithful=True, mean_scale="global", init=-0.5, bounds=(-9.0, 5.0),
                 include_constant=True)
    assert "mean_scale='global'" in repr(crit)
    with torch.no_grad():
        crit.mean_head.free.fill_(-0.7)
    mu.requires_grad_(True)
    out = crit(x, mu, log_scale=log_scale)
    s_map = crit.head(x, mu.detach(), log_scale).detach()
    reference = -DIST[family](mu.detach(), s_map.exp().expand(SHAPE)).log_prob(x)
    torch.testing.assert_close(out.loss, reference.sum() / 2, rtol=1e-12, atol=1e-12)
    g_mu, g_free = torch.autograd.grad(out.loss, [mu, crit.mean_head.free])
    # the global model: its scale at init -0.5 + free -0.7, the same bounded value
    s_global = torch.tensor(-1.2, dtype=torch.float64, requires_grad=True)
    shared = -DIST[family](mu, s_global.exp()).log_prob(x)
    expected_mu, expected_s = torch.autograd.grad(shared.sum() / 2, [mu, s_global])
    torch.testing.assert_close(g_mu, expected_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_free, expected_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean_nll, shared.detach(), rtol=1e-12, atol=1e-12)
    # and the global granularity itself, same init and value: the same two gradients
    global_crit = _crit("global", family=family, init=-0.5, bounds=(-9.0, 5.0), include_constant=True)
    with torch.no_grad():
        global_crit.head.free.fill_(-0.7)
    g_mu2, g_free2 = torch.autograd.grad(global_crit(x, mu).loss, [mu, global_crit.head.free])
    torch.testing.assert_close(g_mu, g_mu2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_free, g_free2, rtol=1e-12, atol=1e-12)


def test_mean_scale_global_needs_faithful():
    with pytest.raises(ValueError, match="mean_scale='global' needs faithful=True"):
        HeteroscedasticNLL("pixel", mean_scale="global")
    with pytest.raises(ValueError, match="mean_scale must be 'map' or 'global', got 'pixelwise'"):
        HeteroscedasticNLL("pixel", faithful=True, mean_scale="pixelwise")
    assert HeteroscedasticNLL("pixel", faithful=True).mean_head is None


def test_faithful_stops_the_extra_distance_in_the_map_branch():
    x, mu, g = _data()
    s = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    extra = torch.rand(SHAPE, generator=g, dtype=torch.float64).requires_grad_(True)
    out = _crit("pixel", faithful=True, bounds=(-9.0, 5.0))(x, mu, log_scale=s, extra_distance=extra)
    (g_extra,) = torch.autograd.grad(out.loss, extra)
    # only the shared-scale branch reaches extra: its gradient is exp(-s_bar) / B everywhere
    s_bar = torch.logsumexp(s.detach().expand(SHAPE).flatten(), 0) - torch.log(torch.tensor(float(x.numel()), dtype=torch.float64))
    torch.testing.assert_close(g_extra, torch.full_like(extra, float(torch.exp(-s_bar)) / 2))


def test_faithful_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="faithful=True needs granularity 'pixel' or 'channel' and beta 0"):
        HeteroscedasticNLL("global", faithful=True)
    with pytest.raises(ValueError, match="beta=0.5"):
        HeteroscedasticNLL("channel", faithful=True, beta=0.5)
    with pytest.raises(ValueError, match="beta=0.5"):
        HeteroscedasticNLL("pixel", faithful=True, beta=0.5)
    assert "faithful=True" in repr(HeteroscedasticNLL("pixel", faithful=True))
