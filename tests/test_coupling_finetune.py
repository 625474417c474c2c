"""Fine-tuning into (and out of) per-pixel colour coupling: ``AutoencoderKL.add_coupling_maps`` widens a
head by zero coefficient rows, so the widened model is the uncoupled one (mean, log-scales, loss) until
trained; ``remove_coupling_maps`` is its inverse; ``build_model`` does either for ``model.init_from`` as
``log_scale.channel_coupling`` asks, and ``hetvae train`` fine-tunes a run into coupling end to end."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import test_coupling_pixel
import test_hostile_train
import test_sd_head
import torch

import hetvae
from conftest import write_noise_photos
from hetvae import functional as F
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.build import build_model, build_nll
from hetvae.calibration import Calibration
from hetvae.cli import main as cli_main
from hetvae.config import Config, ConfigError, LogScaleConfig, ModelConfig, save_config
from hetvae.convert import load_autoencoder
from hetvae.likelihood import CalibrationDropped, Likelihood
from hetvae.train import Trainer

TINY = test_coupling_pixel.TINY  # 32/64 channels, 2 levels
fused_mode = test_coupling_pixel.fused_mode  # the fused and the reference loss, both
COEFFICIENT_MAPS = 3  # C (C - 1) / 2 for RGB


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
    """Four 40 px random photographs: room for test_hostile_train's tiny run at 32 px crops."""
    return write_noise_photos(tmp_path_factory.mktemp("images"), 4, 40, seed=1)


def _trained_like(seed: int = 0, coupling: bool = False, **head) -> AutoencoderKL:
    """A tiny per-pixel model whose head is no longer its fresh init (random output weights, a bias
    per map), so that copying rows wrong would show."""
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel", log_scale_init=-2.0,
                                            log_scale_coupling=coupling, **head))
    with torch.no_grad():
        conv = model.decoder.log_scale_head
        conv.weight.copy_(torch.randn_like(conv.weight) * 0.05)
        conv.bias.copy_(torch.linspace(-2.5, -1.5, conv.out_channels))
    return model.eval()


def _x(size: int = 32, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(2, 1, size, size, generator=g, dtype=dtype) * 1.6 - 0.8
    return (grey + 0.1 * torch.randn(2, 3, size, size, generator=g, dtype=dtype)).clamp(-1, 1)


def _cfg(coupling: str, init_from: str = "scratch", **log_scale) -> Config:
    return Config(model=ModelConfig(init_from=init_from, **TINY),
                  log_scale=LogScaleConfig(granularity="pixel", channel_coupling=coupling, **log_scale))


# --- add / remove -------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [{}, {"log_scale_head_layers": 1, "log_scale_head_channels": 8,
                                       "log_scale_head_sees_mean": True, "log_scale_head_sees_edges": True}],
                         ids=["conv", "trunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_widening_keeps_mean_and_log_scales_bit_for_bit_and_couples_nothing(head, dtype):
    model = _trained_like(**head).to(dtype)
    x = _x(dtype=dtype)
    with torch.no_grad():
        before, _ = model(x)
    old = model.decoder.log_scale_head
    model.add_coupling_maps()
    new = model.decoder.log_scale_head
    assert new is not old and new.out_channels == 3 + COEFFICIENT_MAPS and model.config.coupling_maps == COEFFICIENT_MAPS
    assert new.weight.dtype == dtype and new.weight.device == old.weight.device
    assert torch.equal(new.weight[:3], old.weight) and torch.equal(new.bias[:3], old.bias)
    assert torch.equal(new.weight[3:], torch.zeros_like(new.weight[3:])) and torch.equal(new.bias[3:], torch.zeros(3, dtype=dtype))
    assert model.config.log_scale_coupling and not new.training  # the model was in eval mode; so is the new conv
    with torch.no_grad():
        after, _ = model(x)
    assert torch.equal(after.mean, before.mean) and torch.equal(after.log_scale, before.log_scale)
    assert before.coupling is None and torch.equal(after.coupling, torch.zeros_like(after.coupling))
    assert after.coupling.shape == (2, COEFFICIENT_MAPS, 32, 32)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_the_coupled_loss_of_the_widened_model_is_the_uncoupled_loss(family, fused_mode):
    """At zero coefficients the coupled NLL is the uncoupled one: bit for bit, in float32 through
    the training loss (fused or reference) and in float64."""
    for dtype in (torch.float32, torch.float64):
        model = _trained_like().to(dtype)
        x = _x(dtype=dtype)
        plain = build_nll(_cfg("none", family=family, faithful=True), model).to(dtype)
        with torch.no_grad():
            rec, _ = model(x)
        want = plain(x, rec.mean, log_scale=rec.log_scale)
        model.add_coupling_maps()
        coupled = build_nll(_cfg("pixel", family=family, faithful=True), model).to(dtype)
        with torch.no_grad():
            crec, _ = model(x)
        got = coupled(x, crec.mean, log_scale=crec.log_scale, coupling=crec.coupling)
        assert torch.equal(got.loss, want.loss) and torch.equal(got.nll, want.nll), dtype
        # and it is the closed form: the uncoupled Laplace / Gaussian NLL of the bounded map
        s = F.soft_clamp(rec.log_scale.double(), *coupled.head.bounds, coupled.head.margin)
        closed = (F.laplace_nll if family == "laplace" else F.gaussian_nll)(x.double(), rec.mean.double(), s,
                                                                            include_constant=False)
        torch.testing.assert_close(got.nll.double(), closed, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_gradients_reach_the_new_rows_and_an_optimizer_built_after_moves_them():
    model = _trained_like().train()
    model.add_coupling_maps()
    cfg = _cfg("pixel", faithful=True)
    nll = build_nll(cfg, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _x()
    rec, _ = model(x)
    nll(x, rec.mean, log_scale=rec.log_scale, coupling=rec.coupling).loss.backward()
    head = model.decoder.log_scale_head
    assert head.weight.grad[3:].abs().sum() > 0 and head.bias.grad[3:].abs().min() > 0
    opt.step()
    assert head.bias[3:].abs().min() > 0  # the new conv's parameters are the optimizer's


def test_remove_undoes_add_exactly_and_add_undoes_remove_for_the_log_scales():
    model = _trained_like()
    model.config = dataclasses.replace(model.config, likelihood=Likelihood(granularity="pixel", init=-2.0))
    state, config = {k: v.clone() for k, v in model.state_dict().items()}, model.config
    model.add_coupling_maps()
    assert model.config.likelihood.channel_coupling == "pixel" and model.config.likelihood.coupling is None
    model.remove_coupling_maps()
    assert model.config == config and list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # a trained coupled head: removing keeps its log-scale rows, adding back gives zero coefficient rows
    coupled = _trained_like(coupling=True)
    w = coupled.decoder.log_scale_head.weight.clone()
    coupled.remove_coupling_maps()
    assert coupled.decoder.log_scale_head.out_channels == 3 and torch.equal(coupled.decoder.log_scale_head.weight, w[:3])
    coupled.add_coupling_maps()
    assert torch.equal(coupled.decoder.log_scale_head.weight[:3], w[:3])
    assert not coupled.decoder.log_scale_head.weight[3:].any()


def test_the_likelihood_record_follows_the_head():
    cal = Calibration("affine", "laplace", torch.full((3,), 1.2), torch.full((3,), 0.1)).to_dict()
    model = _trained_like()
    # a global-coupling record: the head's maps replace its coefficients; the order and calibration stay
    model.config = dataclasses.replace(model.config, likelihood=Likelihood(
        granularity="pixel", init=-2.0, channel_coupling="global", coupling=(0.6, -0.2, 0.35),
        coupling_order=(1, 0, 2), calibration=cal))
    model.add_coupling_maps()
    lik = model.config.likelihood
    assert (lik.channel_coupling, lik.coupling, lik.coupling_order) == ("pixel", None, (1, 0, 2))
    assert lik.calibration == cal  # at zero coefficients the scales are the ones it was fitted for
    # removing: the calibration was fitted on conditional residuals, so it goes, said so
    with pytest.warns(CalibrationDropped, match="residuals given the coupled colour channels"):
        model.remove_coupling_maps()
    lik = model.config.likelihood
    assert (lik.channel_coupling, lik.coupling, lik.coupling_order, lik.calibration) == ("none", None, None, None)
    # a model without a record keeps none
    bare = _trained_like()
    bare.add_coupling_maps()
    assert bare.config.likelihood is None


def test_each_error_says_what_is_wrong():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"cannot add colour-coupling maps to the log-scale head: the model has none"):
        AutoencoderKL(AutoencoderConfig(**TINY)).add_coupling_maps()
    with pytest.raises(ValueError, match=r"cannot remove colour-coupling maps from the log-scale head: the model has none"):
        AutoencoderKL(AutoencoderConfig(**TINY)).remove_coupling_maps()
    shared = AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel", log_scale_channels=1))
    with pytest.raises(ValueError, match=r"a shared log-scale head \(log_scale_channels=1, one map for all 3 channels\)"):
        shared.add_coupling_maps()
    grey = AutoencoderKL(AutoencoderConfig(**TINY, in_channels=1, out_channels=1, log_scale="pixel"))
    with pytest.raises(ValueError, match=r"out_channels=1 has no pair of channels to couple \(needs at least 2\)"):
        grey.add_coupling_maps()
    coupled = _trained_like(coupling=True)
    with pytest.raises(ValueError, match=r"it already predicts them \(log_scale_coupling=True\)"):
        coupled.add_coupling_maps()
    with pytest.raises(ValueError, match=r"it does not predict them \(log_scale_coupling=False\)"):
        _trained_like().remove_coupling_maps()
    for model in (shared, grey, coupled):  # a refused call changes nothing
        assert model.decoder.log_scale_head.out_channels == model.config.head_channels + model.config.coupling_maps


# --- build_model: model.init_from -------------------------------------------------------------------


def test_build_model_widens_a_stored_head_and_step_0_is_the_uncoupled_model(tmp_path):
    path = tmp_path / "plain"
    original = _trained_like()
    original.save_pretrained(path, format="hetvae")
    model = build_model(_cfg("pixel", str(path)))
    assert model.config.log_scale_coupling and model.training
    x = _x()
    with torch.no_grad():
        want, _ = original(x)
        got, _ = model.eval()(x)
    assert torch.equal(got.mean, want.mean) and torch.equal(got.log_scale, want.log_scale)
    assert not got.coupling.any()
    plain = build_nll(_cfg("none", str(path)), original)(x, want.mean, log_scale=want.log_scale)
    coupled = build_nll(_cfg("pixel", str(path)), model)(x, got.mean, log_scale=got.log_scale, coupling=got.coupling)
    assert torch.equal(coupled.loss, plain.loss)


@pytest.mark.parametrize("coupling", ["none", "global"])
def test_build_model_drops_stored_maps_with_a_warning(coupling, tmp_path):
    path = tmp_path / "coupled"
    stored = _trained_like(coupling=True)
    stored.save_pretrained(path, format="hetvae")
    with pytest.warns(UserWarning, match=r"coupled: its per-pixel head predicts colour-coupling maps, which "
                                         rf"log_scale.channel_coupling='{coupling}' drops; its log-scales were trained "
                                         r"as conditional scales"):
        model = build_model(_cfg(coupling, str(path)))
    assert not model.config.log_scale_coupling and model.decoder.log_scale_head.out_channels == 3
    assert torch.equal(model.decoder.log_scale_head.weight, stored.decoder.log_scale_head.weight[:3])
    build_nll(_cfg(coupling, str(path)), model)  # the loss and the head agree


def test_build_model_refuses_coupling_on_a_stored_shared_head(tmp_path):
    path = tmp_path / "shared"
    torch.manual_seed(0)
    AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel", log_scale_channels=1)).save_pretrained(path, format="hetvae")
    with pytest.raises(ConfigError, match=rf"log_scale.channel_coupling: 'pixel' widens the per-pixel head of "
                                          rf"model.init_from='{path}' with coupling maps, but cannot add .* a shared"):
        build_model(_cfg("pixel", str(path)))


def test_learned_loss_values_start_from_the_config_as_the_global_scale_does(tmp_path):
    """A fine-tune does not carry a loss's learned values over from the record: a global scale starts
    at ``log_scale.init`` and global coupling coefficients at zero, alike."""
    path = tmp_path / "global"
    torch.manual_seed(0)
    record = Likelihood(granularity="global", free=(0.7,), channel_coupling="global", coupling=(0.6, -0.2, 0.35))
    AutoencoderKL(AutoencoderConfig(**TINY)).save_pretrained(path, format="hetvae", likelihood=record)
    assert load_autoencoder(path).config.likelihood.coupling == (0.6, -0.2, 0.35)
    cfg = Config(model=ModelConfig(init_from=str(path)), log_scale=LogScaleConfig(channel_coupling="global"))
    nll = build_nll(cfg, build_model(cfg))
    assert torch.equal(nll.head.free.detach(), torch.zeros_like(nll.head.free))
    assert torch.equal(nll.coupling.detach(), torch.zeros(3))


def test_head_only_grafts_a_coupled_head_on_a_stock_vae(tmp_path):
    """configs/sd-head.yaml with channel_coupling=pixel: the fresh head predicts the coefficient maps,
    trains them with the VAE frozen, and the head file attaches with them."""
    base = test_sd_head.base_model(tmp_path)
    trainer = Trainer(test_sd_head.head_only_config(base, tmp_path / "run", "train.steps=2",
                                                    "log_scale.channel_coupling=pixel"), progress=False)
    head = trainer.model.decoder.log_scale_head
    assert trainer.model.config.log_scale_coupling and head.out_channels == 3 + COEFFICIENT_MAPS
    assert not head.weight[3:].any() and not head.bias[3:].any()
    trainer.run()
    assert trainer.model.decoder.log_scale_head.bias[3:].abs().min() > 0
    model = hetvae.load_autoencoder(tmp_path / "run")
    assert model.config.log_scale_coupling and model.config.likelihood.channel_coupling == "pixel"


# --- hetvae train -----------------------------------------------------------------------------------


def test_hetvae_train_fine_tunes_a_run_into_pixel_coupling_and_back(images, tmp_path, capsys):
    cfg = test_hostile_train.make_cfg(images, tmp_path / "plain", "train.steps=2", "log_scale.granularity=pixel",
                                      "data.resolution=32")
    config = save_config(cfg, tmp_path / "c.yaml")
    assert cli_main(["train", str(config), "--no-progress"]) == 0
    coupled = tmp_path / "coupled"
    assert cli_main(["train", str(config), "--no-progress", "--set", f"model.init_from={tmp_path / 'plain'}",
                     "--set", "log_scale.channel_coupling=pixel", "--set", "train.steps=2", "--out", str(coupled)]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(coupled), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["log_scale.channel_coupling"] == "pixel"
    model = hetvae.load_autoencoder(coupled)
    assert model.config.log_scale_coupling and model.decoder.log_scale_head.out_channels == 3 + COEFFICIENT_MAPS
    with torch.no_grad():
        rec = model.decode(torch.zeros(1, 4, 16, 16))  # 2x down-sampling: 32 px
    assert rec.coupling.shape == (1, COEFFICIENT_MAPS, 32, 32) and rec.coupling.abs().max() > 0  # trained 2 steps
    # and back out: the maps are dropped, said so
    with pytest.warns(UserWarning, match="trained as conditional scales"):
        assert cli_main(["train", str(config), "--no-progress", "--set", f"model.init_from={coupled}",
                         "--set", "train.steps=1", "--out", str(tmp_path / "plain-again")]) == 0
    assert not hetvae.load_autoencoder(tmp_path / "plain-again").config.log_scale_coupling
