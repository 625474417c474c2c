"""configs/sd-reference.yaml is Stable Diffusion's VAE objective: its settings, its generator and
discriminator losses written out from CompVis' LPIPSWithDiscriminator, the metric names SD logs with
SD's meaning, the frozen logvar through a real `hetvae train` run, and clear errors for inputs that
are not a decoder output / posterior."""

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from safetensors.torch import load_file

from hetvae.autoencoder import Reconstruction
from hetvae.cli import main as cli_main
from hetvae.build import build_model, build_objective
from hetvae.config import load_config
from hetvae.schema import ConfigError
from hetvae.loss import HeteroscedasticNLL
from hetvae.objective import AutoencoderObjective
from hetvae.perceptual import LPIPS
from hetvae.train import Trainer

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "sd-reference.yaml"
TINY = [
    "model.block_out_channels=[16, 32]", "model.layers_per_block=1", "model.norm_num_groups=8",
    "objective.perceptual_weights=random", "objective.disc_layers=1", "data.resolution=16",
]


@pytest.fixture(scope="module")
def preset():
    """The preset at a tiny size, built once (LPIPS takes seconds to build); tests take copies."""
    with pytest.warns(UserWarning, match="NOT a perceptual loss"):
        cfg = load_config(PRESET, TINY)
        torch.manual_seed(0)
        model = build_model(cfg)
        return cfg, model, build_objective(cfg, model)


def _tiny(preset):
    """Copies of the model and objective; LPIPS (frozen) is shared, not copied."""
    cfg, model, obj = preset
    return cfg, copy.deepcopy(model), copy.deepcopy(obj, memo={id(obj.perceptual): obj.perceptual})


class _Float32LPIPS(nn.Module):
    """LPIPS on float32 copies of its inputs: a float64 VGG16 trunk is ten times slower on a CPU, and
    both sides of a comparison share this one function anyway."""

    def __init__(self, lpips: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips

    def forward(self, a, b, *, spatial=False):
        return self.lpips(a.float(), b.float(), spatial=spatial)


def _images(n=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_preset_has_sds_settings():
    cfg = load_config(PRESET)
    ls, obj, t, m = cfg.log_scale, cfg.objective, cfg.train, cfg.model
    # LPIPSWithDiscriminator(disc_start=50001, kl_weight=1e-6, disc_weight=0.5), logvar_init 0, never optimised
    assert (ls.granularity, ls.family, ls.init, ls.include_constant, ls.beta, ls.trainable) == (
        "global", "laplace", 0.0, False, 0.0, False
    )
    assert (obj.perceptual_weight, obj.perceptual_mode, obj.kl_weight) == (1.0, "sd", 1e-6)
    assert (obj.disc_start, obj.disc_weight, obj.disc_factor, obj.disc_loss, obj.disc_layers) == (50001, 0.5, 1.0, "hinge", 3)
    # kl-f8: ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, z 4; Adam(0.5, 0.9), lr = 2 * 12 * 4.5e-6 on one GPU
    assert (m.block_out_channels, m.layers_per_block, m.latent_channels, m.norm_num_groups) == ((128, 256, 512, 512), 2, 4, 32)
    assert t.betas == (0.5, 0.9) and t.lr == pytest.approx(2 * 12 * 4.5e-6) and t.grad_clip is None
    assert t.ema_decay is None and t.weight_decay == 0.0


def test_preset_builds_a_frozen_logvar(preset):
    cfg, model, obj = preset
    free = obj.nll.head.free
    assert free is not None and not free.requires_grad and obj.trainable_parameters() == []
    assert isinstance(obj.perceptual, LPIPS) and obj.discriminator is not None
    # the per-pixel twin of the preset is one override away; pixel with a frozen scale is refused
    assert load_config(PRESET, ["log_scale.granularity=pixel", "log_scale.trainable=true"]).log_scale.trainable
    with pytest.raises(ConfigError, match="log_scale.trainable"):
        load_config(PRESET, ["log_scale.granularity=pixel"])


def _sd_generator(x, xr, post, lpips_fn, disc, last_layer, step, *, pw, kl_w, disc_w, disc_start, weights=None):
    """CompVis LPIPSWithDiscriminator.forward(optimizer_idx=0), logvar = 0, written out: loss and its log."""
    logvar = torch.zeros(())
    rec_loss = torch.abs(x - xr) + pw * lpips_fn(x, xr)
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    weighted = weights * nll_loss if weights is not None else nll_loss
    weighted = torch.sum(weighted) / weighted.shape[0]
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = torch.sum(post.kl()) / post.kl().shape[0]
    g_loss = -torch.mean(disc(xr))
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * disc_w
    disc_factor = 1.0 if step >= disc_start else 0.0
    loss = weighted + kl_w * kl_loss + d_weight * disc_factor * g_loss
    log = {"total_loss": loss, "logvar": logvar, "kl_loss": kl_loss, "nll_loss": nll_loss,
           "rec_loss": rec_loss.mean(), "d_weight": d_weight, "g_loss": g_loss}
    return loss, {k: v.item() for k, v in log.items()}, disc_factor


@pytest.mark.parametrize("step", [50000, 50001])
@pytest.mark.parametrize("use_weights", [False, True])
def test_preset_generator_is_sds_loss_gradients_and_logs(preset, step, use_weights):
    """In float64, so that the two sides agree to rounding (1e-9) in every term and every gradient."""
    cfg, model, obj = _tiny(preset)
    lpips, obj.perceptual = obj.perceptual, None
    model, obj = model.double(), obj.double()
    obj.perceptual = _Float32LPIPS(lpips)
    x = _images().double()
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)).double() if use_weights else None
    rec, post = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
    loss, logs = obj.generator_loss(x, rec, post, step, last_layer=model.last_layer, weights=weights)
    ours = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)

    want, sd_log, disc_factor = _sd_generator(
        x, rec.mean, post, obj.perceptual, obj.discriminator, model.last_layer, step,
        pw=1.0, kl_w=1e-6, disc_w=0.5, disc_start=50001, weights=weights,
    )
    theirs = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)

    # SD's names, SD's meaning; `nll` is what the loss adds (SD's weighted_nll_loss)
    assert logs["disc_factor"] == disc_factor
    for ours_key, sd_key in [("total", "total_loss"), ("kl", "kl_loss"), ("nll_loss", "nll_loss"),
                             ("rec_loss", "rec_loss"), ("logvar", "logvar")]:
        assert logs[ours_key] == pytest.approx(sd_log[sd_key], rel=1e-12, abs=1e-15), ours_key
    assert logs["logvar"] == 0.0
    if step >= 50001:  # before, hetvae skips the discriminator and logs 0 (SD computed them times 0)
        assert logs["d_weight"] == pytest.approx(sd_log["d_weight"], rel=1e-9)
        assert logs["g_loss"] == pytest.approx(sd_log["g_loss"], rel=1e-12)
    else:
        assert logs["d_weight"] == logs["g_loss"] == 0.0
    if not use_weights:
        assert logs["nll"] == logs["nll_loss"]
    else:
        assert logs["nll"] != pytest.approx(logs["nll_loss"], rel=1e-3)


def test_perceptual_log_names(preset):
    """`p_loss` is LPIPS per element, unweighted (taming's p_loss); `rec_loss` = mean(|x - mu| + w LPIPS);
    `perceptual` is w * LPIPS reduced like the NLL (summed over an image's elements, / B)."""
    lpips = preset[2].perceptual
    pw = 0.7
    x = _images(3, 16, seed=2)
    mean = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    post = types.SimpleNamespace(kl=lambda: torch.zeros(3))
    per_image = lpips(x, mean).flatten()  # (B,)
    for mode in ("sd", "separate"):
        obj = AutoencoderObjective(nll=HeteroscedasticNLL("global", init=-1.0), perceptual=lpips,
                                   perceptual_weight=pw, perceptual_mode=mode)
        _, logs = obj.generator_loss(x, Reconstruction(mean), post, 0)
        assert logs["p_loss"] == pytest.approx(per_image.mean().item(), rel=1e-5)
        assert logs["rec_loss"] == pytest.approx(((x - mean).abs() + pw * per_image.view(3, 1, 1, 1)).mean().item(), rel=1e-5)
        assert logs["perceptual"] == pytest.approx(pw * per_image.sum().item() * 3 * 16 * 16 / 3, rel=1e-5)
        assert logs["logvar"] == pytest.approx(-1.0)
    # spatial: the mean of the map that enters the loss
    obj = AutoencoderObjective(nll=HeteroscedasticNLL("global"), perceptual=lpips, perceptual_weight=pw,
                               perceptual_mode="spatial")
    _, logs = obj.generator_loss(x, Reconstruction(mean), post, 0)
    assert logs["p_loss"] == pytest.approx(lpips(mean, x, spatial=True).mean().item(), rel=1e-5)
    # without LPIPS rec_loss is the L1 (SD with perceptual_weight 0), and there is no p_loss
    plain = AutoencoderObjective(nll=HeteroscedasticNLL("channel", init=0.5, trainable=False))
    _, logs = plain.generator_loss(x, Reconstruction(mean), post, 0)
    assert "p_loss" not in logs and logs["rec_loss"] == logs["rec"]
    assert logs["logvar"] == pytest.approx(0.5)


def test_discriminator_loss_is_sds_before_and_after_disc_start(preset):
    cfg, model, obj = _tiny(preset)
    x = _images()
    rec, _ = model(x)
    d = obj.discriminator
    # before disc_start: SD's 0 * hinge(...), a zero in D's graph whose gradient is zero everywhere
    d_loss, logs = obj.discriminator_loss(x, rec, 50000)
    assert d_loss.item() == 0.0 and d_loss.requires_grad and d_loss.grad_fn is not None
    d_loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in d.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert logs == {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0, "disc_factor": 0.0}
    # from disc_start: hinge written out
    d.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    d_loss, logs = obj.discriminator_loss(x, rec, 50001)
    d.load_state_dict(state)  # same BatchNorm statistics for the reference pass
    real, fake = d(x), d(rec.mean.detach())
    want = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    torch.testing.assert_close(d_loss, want, rtol=1e-6, atol=1e-7)
    assert logs["logits_real"] == pytest.approx(real.mean().item(), rel=1e-5)
    # no discriminator at all: still a zero that backward() accepts
    bare = AutoencoderObjective(nll=HeteroscedasticNLL("global"))
    zero, _ = bare.discriminator_loss(x, rec, 10)
    zero.backward()
    assert zero.item() == 0.0


def test_inputs_that_are_not_a_decoder_output_or_posterior_name_their_type():
    obj = AutoencoderObjective(nll=HeteroscedasticNLL("global"))
    x = _images()
    mean = x * 0.9
    post = types.SimpleNamespace(kl=lambda: torch.ones(2))
    with pytest.raises(ValueError, match=r"reconstruction must be .* got a plain torch.Tensor of shape \(2, 3, 16, 16\)"):
        obj.generator_loss(x, mean, post, 0)
    with pytest.raises(ValueError, match=r"got a plain torch.Tensor of shape \(2, 3, 16, 16\)"):
        obj.discriminator_loss(x, mean, 0)
    with pytest.raises(ValueError, match=r"posterior must be .* got a plain torch.Tensor of shape \(2, 8, 2, 2\)"):
        obj.generator_loss(x, Reconstruction(mean), torch.zeros(2, 8, 2, 2), 0)
    with pytest.raises(ValueError, match="got builtins.dict"):
        obj.generator_loss(x, {"mean": mean}, post, 0)
    with pytest.raises(ValueError, match="inputs must be a torch.Tensor"):
        obj.generator_loss(x.numpy(), Reconstruction(mean), post, 0)
    with pytest.raises(ValueError, match="log_scale must be a tensor or None, got builtins.float"):
        obj.generator_loss(x, types.SimpleNamespace(mean=mean, log_scale=0.5), post, 0)
    # diffusers' DecoderOutput (.sample, no log-scale) is named, with the way to pass it
    from diffusers.models.autoencoders.vae import DecoderOutput

    with pytest.raises(ValueError, match=r"DecoderOutput.*Reconstruction\(mean=output.sample\)"):
        obj.generator_loss(x, DecoderOutput(sample=mean), post, 0)
    # any object with .mean / .log_scale is a decoder output; an encoder output holding .latent_dist works
    want, _ = obj.generator_loss(x, Reconstruction(mean), post, 0)
    got, _ = obj.generator_loss(x, types.SimpleNamespace(mean=mean, log_scale=None, sample=mean), post, 0)
    got2, _ = obj.generator_loss(x, types.SimpleNamespace(mean=mean), types.SimpleNamespace(latent_dist=post), 0)
    assert torch.equal(got, want) and torch.equal(got2, want)


def test_frozen_log_scale_holds_no_optimiser_slot(tmp_path):
    overrides = [f"out_dir={tmp_path / 'run'}", "data.samples_per_epoch=4", "objective.perceptual_weight=0"]
    trainer = Trainer(load_config(PRESET, TINY + overrides), progress=False)
    free = trainer.objective.nll.head.free
    assert not any(p is free for group in trainer.g_opt.param_groups for p in group["params"])
    assert len(trainer.g_opt.param_groups) == 1  # no log-scale group: nothing to put in it


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_hetvae_train_sd_reference_keeps_logvar_exactly_zero(images, tmp_path):
    """`hetvae train configs/sd-reference.yaml` with tiny overrides: the discriminator switches on at
    step 1, both optimisers step, and the frozen logvar is exactly 0 in every record and file."""
    out = tmp_path / "run"
    args = ["train", str(PRESET), "--out", str(out), "--no-progress"]
    for item in TINY + [f"data.path={images}", "train.steps=2", "train.batch_size=2", "train.log_every=1",
                        "objective.disc_start=1", "data.samples_per_epoch=4", "train.checkpoint_every=0",
                        "train.sample_every=0"]:
        args += ["--set", item]
    with pytest.warns(UserWarning, match="NOT a perceptual loss"):
        assert cli_main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["logvar"] == 0.0 and r["log_scale_mean"] == 0.0
        assert {"nll_loss", "rec_loss", "p_loss", "nll", "kl", "total"} <= set(r)
        assert r["rec_loss"] > r["rec"]  # the perceptual term is in SD's rec_loss
    assert records[0]["disc_factor"] == 0.0 and records[1]["disc_factor"] == 1.0 and records[1]["d_loss"] > 0
    assert load_file(out / "loss.safetensors")["head.free"].item() == 0.0
    assert load_config(out / "config.yaml").log_scale.trainable is False
