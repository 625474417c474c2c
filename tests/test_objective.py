"""AutoencoderObjective against SD's formula written out, gradient routing, perceptual modes."""

import copy
import math

import pytest
import torch

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, Reconstruction
from hetvae.discriminator import NLayerDiscriminator
from hetvae.loss import HeteroscedasticNLL
from hetvae.objective import AutoencoderObjective
from hetvae.perceptual import LPIPS

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)


@pytest.fixture(scope="module")
def lpips():
    with pytest.warns(UserWarning, match="NOT a perceptual loss"):
        return LPIPS(weights="random")


def _model(pixel=False, seed=0):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(**TINY, log_scale="pixel" if pixel else None)
    model = AutoencoderKL(cfg)
    if pixel:  # move the head off its zero init so the map varies
        with torch.no_grad():
            model.decoder.log_scale_head.weight.normal_(0, 0.05)
    return model


def _images(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _objective(lpips, granularity="global", **kw):
    torch.manual_seed(3)
    kw.setdefault("discriminator", NLayerDiscriminator(channels=8, n_layers=2))
    nll_kw = kw.pop("nll_kw", {})
    return AutoencoderObjective(nll=HeteroscedasticNLL(granularity, **nll_kw), perceptual=lpips, **kw)


@pytest.mark.parametrize("step", [99, 100, 250])
@pytest.mark.parametrize("use_weights", [False, True])
def test_generator_loss_is_stable_diffusions_formula(lpips, step, use_weights):
    logvar_init, pw, kl_w, disc_w, disc_start = 0.4, 0.8, 1e-3, 0.5, 100
    model, x = _model(), _images()
    obj = _objective(
        lpips, nll_kw=dict(init=logvar_init), perceptual_weight=pw, perceptual_mode="sd",
        kl_weight=kl_w, disc_start=disc_start, disc_weight=disc_w,
    )
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) if use_weights else None
    rec, post = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
    loss, logs = obj.generator_loss(x, rec, post, step, last_layer=model.last_layer, weights=weights)

    # ---- ldm LPIPSWithDiscriminator, optimizer_idx=0, written out ----
    xr = rec.mean
    logvar = torch.tensor(logvar_init)
    rec_loss = torch.abs(x - xr) + pw * lpips(x, xr)
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    weighted = weights * nll_loss if weights is not None else nll_loss
    weighted = torch.sum(weighted) / weighted.shape[0]
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = torch.sum(post.kl()) / post.kl().shape[0]
    g_loss = -torch.mean(obj.discriminator(xr))
    nll_grads = torch.autograd.grad(nll_loss, model.last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * disc_w
    disc_factor = 1.0 if step >= disc_start else 0.0
    expected = weighted + kl_w * kl_loss + d_weight * disc_factor * g_loss

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert logs["disc_factor"] == disc_factor
    if step >= disc_start:
        assert logs["d_weight"] == pytest.approx(d_weight.item(), rel=1e-5)
        assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    assert logs["kl"] == pytest.approx(kl_loss.item(), rel=1e-5)
    assert logs["rec"] == pytest.approx((x - xr).abs().mean().item(), rel=1e-6)


def test_logs_have_every_key(lpips):
    model, x = _model(), _images()
    obj = _objective(lpips, "channel", perceptual_weight=1.0, disc_start=0)
    rec, post = model(x)
    _, logs = obj.generator_loss(x, rec, post, 0, last_layer=model.last_layer)
    for key in ("total", "nll", "rec", "nll_per_dim", "bpd", "kl", "g_loss", "d_weight", "disc_factor",
                "log_scale_mean", "log_scale_std", "log_scale_min", "log_scale_max",
                "log_scale_c0", "log_scale_c1", "log_scale_c2", "perceptual"):
        assert key in logs and math.isfinite(logs[key]), key
    _, dlogs = obj.discriminator_loss(x, rec, 0)
    assert set(dlogs) == {"d_loss", "logits_real", "logits_fake", "disc_factor"}
    assert 0 < logs["bpd"] < 16
    # at log-scale 0 (b = 1) without LPIPS, the NLL per dimension is mean |r| + log 2
    plain = _objective(lpips, discriminator=None)
    _, logs = plain.generator_loss(x, rec, post, 0)
    assert logs["nll_per_dim"] == pytest.approx(logs["rec"] + math.log(2), rel=1e-6)
    assert logs["log_scale_mean"] == 0.0 and logs["log_scale_std"] == 0.0


def test_details_off_skips_only_the_diagnostics(lpips):
    model, x = _model(pixel=True), _images()
    obj = _objective(lpips, "pixel", perceptual_weight=1.0, disc_start=0)
    rec, post = model(x)
    full_loss, full = obj.generator_loss(x, rec, post, 0, last_layer=model.last_layer)
    loss, brief = obj.generator_loss(x, rec, post, 0, last_layer=model.last_layer, details=False)
    assert torch.equal(loss, full_loss)
    assert set(full) - set(brief) == {"nll_per_dim", "bpd", "log_scale_mean", "log_scale_std", "log_scale_min", "log_scale_max"}
    assert all(brief[k] == full[k] for k in brief)  # the same values, read in one transfer
    assert brief["total"] == full_loss.item() and brief["nll"] > 0


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("granularity", ["channel", "pixel"])
def test_generator_and_discriminator_gradients_are_disjoint(lpips, granularity):
    pixel = granularity == "pixel"
    model, x = _model(pixel=pixel), _images()
    obj = _objective(lpips, granularity, perceptual_weight=1.0, disc_start=0)
    rec, post = model(x, sample_posterior=True)
    loss, _ = obj.generator_loss(x, rec, post, 0, last_layer=model.last_layer)
    loss.backward()
    grads = _grads(model)
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    if pixel:
        assert grads["decoder.log_scale_head.weight"].abs().sum() > 0
        assert obj.trainable_parameters() == []
    else:
        (free,) = obj.trainable_parameters()
        assert free is obj.nll.head.free and free.grad.abs().sum() > 0
    assert all(g is None for g in _grads(obj.discriminator).values())
    assert all(p.grad is None for p in obj.perceptual.parameters())

    model.zero_grad(set_to_none=True)
    d_loss, _ = obj.discriminator_loss(x, rec, 0)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(obj.discriminator).values())
    assert sum(g.abs().sum() for g in _grads(obj.discriminator).values()) > 0


def test_discriminator_is_off_before_disc_start(lpips):
    model, x = _model(), _images()
    obj = _objective(lpips, disc_start=10)
    rec, post = model(x)
    d_loss, logs = obj.discriminator_loss(x, rec, 9)
    assert obj.gan_factor(9) == 0.0 and obj.gan_factor(10) == 1.0
    assert d_loss.item() == 0.0 and d_loss.requires_grad and logs["disc_factor"] == 0.0  # SD's: backpropagable
    no_disc = _objective(lpips, discriminator=None, disc_start=0)
    assert no_disc.gan_factor(10**6) == 0.0


def test_lpips_sends_gradient_to_the_reconstruction(lpips):
    x = _images()
    mean = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    obj = _objective(lpips, perceptual_weight=1.0, perceptual_mode="separate", discriminator=None)
    post = _model().encode(x)
    loss_p, _ = obj.generator_loss(x, Reconstruction(mean), post, 0)
    (g_p,) = torch.autograd.grad(loss_p, mean)
    obj.perceptual_weight = 0.0
    loss_0, _ = obj.generator_loss(x, Reconstruction(mean), post, 0)
    (g_0,) = torch.autograd.grad(loss_0, mean)
    assert (g_p - g_0).abs().sum() > 0


def test_perceptual_modes_differ_as_documented(lpips):
    """With a per-pixel log-scale s, LPIPS's share of the loss is p/e^s ('sd'), map/e^s ('spatial'),
    and p undivided ('separate')."""
    # float64 throughout: the shares are small differences of large sums
    lpips64 = copy.deepcopy(lpips).double()
    x = _images().double()
    mean = x + 0.2 * torch.randn_like(x)
    s = torch.full((2, 3, 32, 32), 2.0, dtype=torch.float64)  # top of the identity band
    post = _model().double().encode(x)
    rec = Reconstruction(mean, s)
    p = lpips64(mean, x).double()
    p_map = lpips64(mean, x, spatial=True).double()

    def share(mode):
        obj = _objective(
            lpips64, "pixel", perceptual_weight=1.0, perceptual_mode=mode, discriminator=None, kl_weight=0
        )
        with torch.no_grad():
            with_p, _ = obj.generator_loss(x, rec, post, 0)
            obj.perceptual_weight = 0.0
            without, _ = obj.generator_loss(x, rec, post, 0)
        return (with_p - without).item()

    b = math.exp(2.0)
    per_image = p.flatten() * 3 * 32 * 32  # broadcast over the image's elements, summed
    assert share("separate") == pytest.approx(per_image.sum().item() / 2, rel=1e-6)
    assert share("sd") == pytest.approx(per_image.sum().item() / 2 / b, rel=1e-6)
    assert share("spatial") == pytest.approx((p_map.sum() * 3).item() / 2 / b, rel=1e-6)
    # the large scale discounts LPIPS by e^2 ~ 7.4 inside the NLL; outside it does not
    assert share("separate") > 7 * share("sd")


def test_adaptive_weight_finite_under_bf16_autocast(lpips):
    model, x = _model(pixel=True), _images()
    obj = _objective(lpips, "pixel", perceptual_weight=1.0, disc_start=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, post = model(x, sample_posterior=True)
        loss, logs = obj.generator_loss(x, rec, post, 0, last_layer=model.last_layer)
    assert rec.mean.dtype == torch.bfloat16
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert math.isfinite(logs["d_weight"]) and 0 < logs["d_weight"] <= 1e4 * obj.disc_weight
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adaptive_weight_is_zero_when_not_finite(lpips):
    obj = _objective(lpips, discriminator=None)
    w = torch.ones(3, requires_grad=True)
    inf_loss = (w * torch.tensor([float("inf"), 1.0, 1.0])).sum()
    weight = obj.adaptive_weight((w * 2).sum(), inf_loss, w)
    assert weight.item() == 0.0


def test_errors(lpips):
    nll = HeteroscedasticNLL("global")
    with pytest.raises(ValueError, match="perceptual_weight=1.0 needs an LPIPS module"):
        AutoencoderObjective(nll=nll, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="perceptual_mode must be one of"):
        AutoencoderObjective(nll=nll, perceptual_mode="inside")
    with pytest.raises(ValueError, match="unknown discriminator loss 'wgan'"):
        AutoencoderObjective(nll=nll, disc_loss="wgan")
    model, x = _model(), _images()
    obj = _objective(lpips, disc_start=0)
    rec, post = model(x)
    with pytest.raises(ValueError, match="needs last_layer=model.last_layer"):
        obj.generator_loss(x, rec, post, 0)
    with pytest.raises(ValueError, match="granularity 'pixel' needs the decoder's predicted map"):
        _objective(lpips, "pixel", discriminator=None).generator_loss(x, rec, post, 0)
