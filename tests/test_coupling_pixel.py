"""Per-pixel colour coupling (``channel_coupling="pixel"``): the bound, the loss against the functions,
torch.distributions and gradcheck, the decoder head's extra maps, and the config key wired into the
training loss with ``none`` changing nothing."""

import pytest
import torch
from torch.distributions import Laplace, MultivariateNormal

from hetvae import functional as F
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.config import Config, ConfigError, LogScaleConfig
from hetvae.loss import HeteroscedasticNLL

SHAPE = (2, 3, 4, 5)
MAPS = (2, 3, 4, 5)  # three coefficient maps per pixel
TINY = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}


@pytest.fixture(params=["eager", "0"], ids=["fused", "reference"])
def fused_mode(request, monkeypatch):
    monkeypatch.setenv("HETVAE_FUSED", request.param)
    return request.param


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    mu = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    s = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 - 1
    raw = torch.randn(MAPS, generator=g, dtype=torch.float64) * 1.5
    return x, mu, s, raw


def _crit(**kw):
    return HeteroscedasticNLL("pixel", bounds=(-9.0, 5.0), channel_coupling="pixel", **kw).double()


def test_bound_is_tanh_scaled_and_exact_at_zero():
    raw = torch.tensor([-100.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 100.0], dtype=torch.float64)
    a = F.bound_coupling(raw)
    torch.testing.assert_close(a, F.COUPLING_LIMIT * torch.tanh(raw / F.COUPLING_LIMIT), rtol=0, atol=0)
    assert a.abs().max() <= F.COUPLING_LIMIT and a[3] == 0 and torch.equal(F.bound_coupling(torch.zeros(3)), torch.zeros(3))
    # slope 1 at zero: small coefficients are learned as if unbounded
    torch.testing.assert_close(a[4] / raw[4], torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert F.bound_coupling(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    with pytest.raises(ValueError, match="coupling has dtype torch.int64"):
        F.bound_coupling(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("order", [None, (2, 0, 1)])
def test_pixel_coupling_is_the_coupled_nll_of_the_bounded_maps(family, order, fused_mode):
    x, mu, s, raw = _data()
    crit = _crit(family=family, coupling_order=order, include_constant=True)
    out = crit(x, mu, log_scale=s, coupling=raw)
    a = F.bound_coupling(raw)
    want = F.coupled_nll(x, mu, s, a, family, order=order)
    torch.testing.assert_close(out.nll, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.loss, want.sum() / 2, rtol=1e-13, atol=1e-12)
    assert torch.equal(out.coupling, a) and out.coupling.shape == MAPS
    # exact 8-bit bits of the loss: the coupled discretized likelihood of the same maps
    torch.testing.assert_close(
        crit.discretized_nll(x, mu, s, coupling=raw), F.coupled_discretized_nll(x, mu, s, a, family, order=order),
        rtol=0, atol=0,
    )


def test_gaussian_pixel_coupling_is_the_multivariate_normal_of_each_pixel():
    """sum_k nll_k at a pixel = -log N(x; mu, Sigma) with Sigma = L D L^T, L^{-1} = I - A (A the
    pixel's strictly lower coefficients, D the conditional variances)."""
    x, mu, s, raw = _data(seed=3)
    out = _crit(family="gaussian", include_constant=True)(x, mu, log_scale=s, coupling=raw)
    a = F.bound_coupling(raw)
    got = out.nll.sum(1)
    for b in range(SHAPE[0]):
        for i in range(SHAPE[2]):
            for j in range(SHAPE[3]):
                A = torch.zeros(3, 3, dtype=torch.float64)
                A[1, 0], A[2, 0], A[2, 1] = a[b, :, i, j]
                L = torch.linalg.inv(torch.eye(3, dtype=torch.float64) - A)
                cov = L @ torch.diag(torch.exp(2 * s[b, :, i, j])) @ L.T
                want = -MultivariateNormal(mu[b, :, i, j], covariance_matrix=cov).log_prob(x[b, :, i, j])
                torch.testing.assert_close(got[b, i, j], want, rtol=1e-10, atol=1e-10)


def test_laplace_pixel_coupling_is_the_product_of_laplace_conditionals():
    x, mu, s, raw = _data(seed=4)
    out = _crit(family="laplace", include_constant=True)(x, mu, log_scale=s, coupling=raw)
    a = F.bound_coupling(raw)
    r = x - mu
    centre = torch.stack([mu[:, 0], mu[:, 1] + a[:, 0] * r[:, 0], mu[:, 2] + a[:, 1] * r[:, 0] + a[:, 2] * r[:, 1]], 1)
    torch.testing.assert_close(out.nll, -Laplace(centre, s.exp()).log_prob(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_gradcheck_through_the_loss(family, monkeypatch):
    """The fused path's gradients of the map and coefficient maps against finite differences (the
    mean's is the uncoupled NLL's, not the value's: test_gradients_equal_autograd_of_the_functions)."""
    monkeypatch.setenv("HETVAE_FUSED", "eager")
    x, mu, s, raw = _data(seed=5)
    crit = _crit(family=family)
    w = torch.rand(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5

    def f(ls, c):
        return crit(x, mu, log_scale=ls, coupling=c, weights=w).loss

    assert torch.autograd.gradcheck(f, (s.requires_grad_(), raw.requires_grad_()))


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("faithful", [False, True])
def test_gradients_equal_autograd_of_the_functions(family, faithful, fused_mode):
    x, mu, s, raw = _data(seed=7)
    crit = _crit(family=family, faithful=faithful)
    m, ls, c = (t.clone().requires_grad_(True) for t in (mu, s, raw))
    got = torch.autograd.grad(crit(x, m, log_scale=ls, coupling=c).loss, [ls, c])
    ls2, c2 = s.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    # faithful: the maps are fitted around the stopped mean (here mu is a leaf, so that is mu itself)
    ref = F.coupled_nll(x, mu, ls2, F.bound_coupling(c2), family, include_constant=False).sum() / 2
    want = torch.autograd.grad(ref, [ls2, c2])
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    m2 = mu.clone().requires_grad_(True)
    (g_mu,) = torch.autograd.grad(crit(x, m2, log_scale=s, coupling=raw).loss, m2)
    # the coupling only shapes the likelihood: the mean's gradient is the uncoupled NLL's, as without
    # coupling (faithful: under its branch's one scale; else under the map itself)
    plain = HeteroscedasticNLL("pixel", bounds=(-9.0, 5.0), family=family, faithful=faithful).double()
    m3 = mu.clone().requires_grad_(True)
    (want_mu,) = torch.autograd.grad(plain(x, m3, log_scale=s).loss, m3)
    assert torch.equal(g_mu, want_mu)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_zero_maps_are_none_bit_for_bit(family, fused_mode):
    x, mu, s, _ = _data()
    none = HeteroscedasticNLL("pixel", bounds=(-9.0, 5.0), family=family, faithful=True).double()
    coupled = _crit(family=family, faithful=True)
    a, b = none(x, mu, log_scale=s), coupled(x, mu, log_scale=s, coupling=torch.zeros(MAPS, dtype=torch.float64))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.nll, b.nll) and torch.equal(a.mean_nll, b.mean_nll)
    assert list(coupled.state_dict()) == list(none.state_dict())  # no parameter: the head holds the coupling


def test_maps_are_required_and_refused_where_they_belong():
    x, mu, s, raw = _data()
    with pytest.raises(ValueError, match=r"channel_coupling='pixel' needs the head's coefficient maps"):
        _crit()(x, mu, log_scale=s)
    with pytest.raises(ValueError, match="channel_coupling is 'none'"):
        HeteroscedasticNLL("pixel").double()(x, mu, log_scale=s, coupling=raw)
    with pytest.raises(ValueError, match="this loss learns one set"):
        HeteroscedasticNLL("pixel", channel_coupling="global").double()(x, mu, log_scale=s, coupling=raw)
    with pytest.raises(ValueError, match=r"coefficients of shape \(2, 2, 4, 5\) do not fit target of shape \(2, 3, 4, 5\)"):
        _crit()(x, mu, log_scale=s, coupling=raw[:, :2])
    with pytest.raises(ValueError, match="coupling has dtype torch.int64"):
        _crit()(x, mu, log_scale=s, coupling=raw.long())


# --- the decoder's head ---------------------------------------------------------------------------


def _model(**kw):
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel", log_scale_init=-2.0, **kw)).eval()


def test_the_head_predicts_zero_coefficient_maps_after_its_log_scales():
    plain, coupled = _model(), _model(log_scale_coupling=True)
    assert coupled.decoder.log_scale_head.out_channels == 6 and coupled.config.coupling_maps == 3
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        (r0, _), (r1, _) = plain(x), coupled(x)
    # a fresh head: the same mean and map as the uncoupled model, and coefficient maps of zeros
    assert torch.equal(r0.mean, r1.mean) and torch.equal(r0.log_scale, r1.log_scale)
    assert r0.coupling is None and r1.coupling.shape == (2, 3, 32, 32) and torch.equal(r1.coupling, torch.zeros_like(r1.coupling))
    # a trained head: the coefficient maps are the output conv's last three maps
    with torch.no_grad():
        coupled.decoder.log_scale_head.bias[3:] = torch.tensor([0.1, 0.2, 0.3])
        r2, _ = coupled(x[..., :30, :31])  # padded and cropped back, the maps too
    assert r2.coupling.shape == (2, 3, 30, 31) and r2.log_scale.shape == (2, 3, 30, 31)
    torch.testing.assert_close(r2.coupling[:, :, 0, 0], torch.tensor([[0.1, 0.2, 0.3]] * 2))
    assert torch.equal(r2.log_scale, torch.full_like(r2.log_scale, -2.0))


def test_the_head_config_is_checked():
    with pytest.raises(ValueError, match="log_scale_coupling needs a per-pixel head"):
        AutoencoderConfig(**TINY, log_scale_coupling=True)
    with pytest.raises(ValueError, match="log_scale_coupling needs a per-pixel head"):
        AutoencoderConfig(**TINY, log_scale="pixel", log_scale_channels=1, log_scale_coupling=True)
    with pytest.raises(ValueError, match="log_scale_coupling must be true or false"):
        AutoencoderConfig(**TINY, log_scale="pixel", log_scale_coupling=1)


# --- the config key ----------------------------------------------------------------------------


def test_config_keys_and_their_errors():
    assert LogScaleConfig().channel_coupling == "none" and LogScaleConfig().coupling_order is None
    with pytest.raises(ConfigError, match="channel_coupling: 'pixel' has the decoder's per-pixel head predict"):
        LogScaleConfig(granularity="global", channel_coupling="pixel")
    with pytest.raises(ConfigError, match="channel_coupling: 'pixel' needs one log-scale map per channel"):
        LogScaleConfig(granularity="pixel", shared=True, channel_coupling="pixel")
    with pytest.raises(ConfigError, match=r"coupling_order: orders the coupled channels; got \[2, 1, 0\]"):
        LogScaleConfig(coupling_order=(2, 1, 0))
    with pytest.raises(ConfigError, match=r"coupling_order: must name each channel once.*got \[0, 0, 1\]"):
        LogScaleConfig(channel_coupling="global", coupling_order=(0, 0, 1))
    with pytest.raises(ConfigError, match=r"log_scale.coupling_order: must name each of the model.out_channels=3"):
        Config(log_scale=LogScaleConfig(channel_coupling="global", coupling_order=(1, 0)))


@pytest.mark.parametrize("granularity", ["global", "channel", "pixel"])
@pytest.mark.parametrize("family", F.FAMILIES)
def test_the_training_loss_follows_the_config_and_none_is_todays(granularity, family):
    from hetvae.build import build_model, build_nll
    from hetvae.likelihood import nll_from_config

    base = {"granularity": granularity, "family": family, "faithful": granularity != "global", "head_sees_mean": True}
    cfg = Config(log_scale=LogScaleConfig(**base))
    torch.manual_seed(0)
    model = build_model(cfg)
    nll = build_nll(cfg, model)
    assert nll.channel_coupling == "none" and nll.coupling is None and not model.config.log_scale_coupling
    assert "log_scale_coupling" not in {k for k in model.state_dict() if "coupling" in k}
    # 'none' builds the very loss it built before the key existed: same repr, same state, same values
    explicit = nll_from_config(LogScaleConfig(**base, channel_coupling="none"), 3, init=nll.head.init)
    assert repr(explicit) == repr(nll) and list(explicit.state_dict()) == list(nll.state_dict())
    for coupling in ("global", "pixel") if granularity == "pixel" else ("global",):
        ccfg = Config(log_scale=LogScaleConfig(**base, channel_coupling=coupling, coupling_order=(1, 0, 2)))
        torch.manual_seed(0)
        cmodel = build_model(ccfg)
        cnll = build_nll(ccfg, cmodel)
        assert cnll.channel_coupling == coupling and cnll.coupling_order == (1, 0, 2)
        assert cmodel.config.log_scale_coupling == (coupling == "pixel")
        assert (cnll.coupling is not None) == (coupling == "global")
        if coupling == "pixel":  # a head and a loss that disagree about the maps are refused, both ways
            with pytest.raises(ValueError, match="the model's head does not predict colour-coupling maps"):
                build_nll(ccfg, model)
            with pytest.raises(ValueError, match="the model's head predicts colour-coupling maps"):
                build_nll(cfg, cmodel)


def test_a_pixel_coupled_model_trains_through_the_objective():
    """One optimiser step of the objective moves the coefficient maps away from zero, and the logs
    carry the coefficients' means."""
    from hetvae.build import build_model, build_objective

    cfg = Config(log_scale=LogScaleConfig(granularity="pixel", faithful=True, channel_coupling="pixel"))
    torch.manual_seed(0)
    model = build_model(cfg)
    obj = build_objective(cfg, model)
    g = torch.Generator().manual_seed(2)
    grey = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    x = (grey + 0.05 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)  # channels that move together
    rec, post = model(x)
    loss, logs = obj.generator_loss(x, rec, post, 0, details=True)
    loss.backward()
    head = model.decoder.log_scale_head
    assert head.bias.grad[3:].abs().min() > 0 and head.weight.grad[3:].abs().sum() > 0
    assert cfg.log_scale.coupling_order == (0, 1, 2)  # a per-pixel head's measured default: R -> G -> B
    assert {"coupling_c1_c0", "coupling_c2_c0", "coupling_c2_c1"} <= set(logs)  # a later channel on an earlier one
    assert logs["coupling_c1_c0"] == 0.0  # a fresh head: zero maps
