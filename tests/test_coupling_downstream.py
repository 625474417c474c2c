"""Colour coupling downstream of the loss: the likelihood record and every export carry the
coefficients, predictions give the conditional centre, the pooled metrics score the conditional
residuals with exact bits/dim, calibration is fitted on them, and the attached head and the panels
show them. Without coupling every result is what it was."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hetvae import functional as F
from hetvae import metrics as M
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import fit_calibration, pooled
from hetvae.evaluate import evaluate
from hetvae.likelihood import Likelihood, likelihood_from_nll, nll_from_likelihood
from hetvae.loss import HeteroscedasticNLL
from hetvae.predictor import Prediction, Predictor, calibrate, load_predictor

TINY = {"block_out_channels": (32, 64), "norm_num_groups": 16, "layers_per_block": 1, "latent_channels": 4}
COEFFICIENTS = (0.6, -0.2, 0.35)


def _model(coupling: str, seed: int = 0) -> tuple[AutoencoderKL, HeteroscedasticNLL]:
    """A tiny model whose head (pixel) or loss (global) carries non-zero coefficients."""
    torch.manual_seed(seed)
    pixel = coupling == "pixel"
    model = AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel", log_scale_init=-3.0, log_scale_coupling=pixel))
    with torch.no_grad():
        head = model.decoder.log_scale_head
        head.weight.copy_(torch.randn_like(head.weight) * 0.05)
        if pixel:
            head.bias[3:] = torch.tensor([0.8, -0.3, 0.4])
    nll = HeteroscedasticNLL("pixel", channel_coupling=coupling, coupling_order=(1, 0, 2) if pixel else None)
    if coupling == "global":
        with torch.no_grad():
            nll.coupling.copy_(torch.tensor(COEFFICIENTS))
    return model.eval(), nll.eval()


def _images(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(n, 1, 32, 40, generator=g) * 1.6 - 0.8
    x = (grey + 0.1 * torch.randn(n, 3, 32, 40, generator=g)).clamp(-1, 1)
    return list(F.quantize_8bit(x))


def test_the_record_carries_the_coupling_and_rebuilds_the_loss():
    _, nll = _model("global")
    record = likelihood_from_nll(nll)
    assert record.channel_coupling == "global" and record.coupling == pytest.approx(COEFFICIENTS) and record.coupling_order is None
    again = nll_from_likelihood(record, 3)
    assert torch.equal(again.coupling, nll.coupling) and again.coupling_order == (0, 1, 2)
    _, pnll = _model("pixel")
    precord = likelihood_from_nll(pnll)
    assert (precord.channel_coupling, precord.coupling, precord.coupling_order) == ("pixel", None, (1, 0, 2))
    assert nll_from_likelihood(precord, 3).channel_coupling == "pixel"
    # an uncoupled record is what it always was, and an old record (no coupling keys) reads as 'none'
    plain = likelihood_from_nll(HeteroscedasticNLL("channel"))
    assert (plain.channel_coupling, plain.coupling, plain.coupling_order) == ("none", None, None)
    old = {k: v for k, v in dataclasses.asdict(plain).items() if "coupling" not in k}
    assert Likelihood(**old) == plain


@pytest.mark.parametrize("bad, match", [
    ({"channel_coupling": "Global"}, "channel_coupling must be one of"),
    ({"channel_coupling": "global"}, "coupling must hold the coefficients"),
    ({"coupling": [0.1, 0.2, 0.3]}, "coupling must hold the coefficients"),
    ({"channel_coupling": "global", "coupling": [0.1, float("nan"), 0.3]}, "coupling must be a list of finite numbers"),
    ({"channel_coupling": "pixel"}, "'pixel' needs granularity 'pixel'"),
    ({"channel_coupling": "global", "coupling": [0.1, 0.2, 0.3], "coupling_order": [0, 0, 1]}, "coupling_order must be"),
    ({"coupling_order": [0, 1, 2]}, "coupling_order must be"),
])
def test_bad_records_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        Likelihood(granularity="channel", free=(0.0, 0.0, 0.0), **bad)
    with pytest.raises(ValueError, match="coupling holds 2 value"):
        nll_from_likelihood(Likelihood(channel_coupling="global", coupling=(0.1, 0.2), free=(0.0,)), 3)


@pytest.mark.parametrize("coupling", ["global", "pixel"])
@pytest.mark.parametrize("fmt", ["hetvae", "diffusers", "ldm"])
def test_every_export_carries_the_coefficients(coupling, fmt, tmp_path):
    model, nll = _model(coupling)
    x = _images(1)[0]
    before = Predictor(model=model, nll=nll, source="test").predict(x)
    path = tmp_path / ("m.safetensors" if fmt == "ldm" else "m")
    model.save_pretrained(path, format=fmt, likelihood=nll)
    after = load_predictor(path).predict(x)
    assert torch.equal(before.mean, after.mean) and torch.equal(before.log_scale, after.log_scale)
    assert after.coupling is not None and torch.equal(before.coupling, after.coupling)
    assert after.coupling_order == before.coupling_order
    if coupling == "global":
        assert after.coupling.shape == (3,) and after.coupling.tolist() == pytest.approx(COEFFICIENTS)
    else:  # the head's last three maps, bounded
        with torch.no_grad():
            rec, _ = model(x.unsqueeze(0))
        assert after.coupling.shape == (1, 3, 32, 40) and rec.coupling.abs().max() > 0.1
        assert torch.equal(after.coupling, F.bound_coupling(rec.coupling))


def test_a_prediction_gives_the_conditional_centre():
    model, nll = _model("pixel")
    p = Predictor(model=model, nll=nll, source="test").predict(_images(1)[0])
    want = F.coupled_mean(p.target, p.mean, p.coupling, (1, 0, 2))
    assert torch.equal(p.centre, want.float()) and torch.equal(p.conditional_error, (p.target - want).abs().float())
    assert not torch.equal(p.centre, p.mean) and torch.equal(p.centre[:, 1], p.mean[:, 1])  # G is first
    maps = p.maps()
    assert set(maps) == {"input", "mean", "log_scale", "error", "centre", "conditional_error", "coupling"}
    assert torch.equal(maps["coupling"], p.coupling[0])
    plain = Prediction(p.target, p.mean, p.log_scale)
    assert plain.centre is plain.mean and set(plain.maps()) == {"input", "mean", "log_scale", "error"}


@pytest.mark.parametrize("coupling", ["global", "pixel"])
def test_the_pooled_metrics_are_those_of_the_conditional_residuals(coupling):
    model, nll = _model(coupling)
    predictor = Predictor(model=model, nll=nll, source="test")
    images = _images(2)
    preds = [predictor.predict(x) for x in images]
    r = evaluate(predictor, images)
    # bits/dim: exact, each channel given the earlier channels' 8-bit values
    nats = [F.coupled_discretized_nll(p.target.double(), p.mean.double(), p.log_scale.double(), p.coupling.double(),
                                      "laplace", order=p.coupling_order) for p in preds]
    assert r["nll_bpd"] == pytest.approx(torch.cat([n.flatten() for n in nats]).mean().item() / math.log(2), rel=1e-9)
    # the Laplace median interval is centre +- b log 2: coverage_50 counts the conditional residuals in it
    cond = torch.cat([p.conditional_error.flatten() for p in preds]).double()
    scale = torch.cat([p.log_scale.exp().flatten() for p in preds]).double()
    assert r["coverage_50"] == pytest.approx((cond <= scale * math.log(2)).double().mean().item(), abs=1e-9)
    flat = cond.view(1, 1, -1, 1)
    assert r["spearman"] == pytest.approx(M.spearman(flat, torch.zeros_like(flat), scale.log().view(1, 1, -1, 1)), abs=1e-6)
    marginal = torch.cat([p.error.flatten() for p in preds]).double()
    assert r["marginal_mae"] == pytest.approx(marginal.mean().item(), rel=1e-9)
    assert r["conditional_mae"] == pytest.approx(cond.mean().item(), rel=1e-6)  # float32 conditional errors
    # the coupling pays on channels that move together: fewer bits than the same model scored without it
    nll_none = HeteroscedasticNLL("pixel").eval()
    r0 = evaluate(Predictor(model=model, nll=nll_none, source="test"), images)
    assert r["nll_bpd"] < r0["nll_bpd"] and r["psnr"] == r0["psnr"]
    assert "marginal_mae" not in r0 and "conditional_mae" not in r0


def test_calibration_is_fitted_on_the_conditional_residuals():
    model, nll = _model("pixel")
    preds = [Predictor(model=model, nll=nll, source="test").predict(x) for x in _images(2)]
    _, centre, _ = pooled(preds)
    assert torch.equal(centre, torch.cat([p.centre.flatten(2) for p in preds], 2).unsqueeze(-1))
    # hetvae calibrate's affine map: fitted on the conditional residuals, not on x - mu
    by_hand = [(p.target.flatten(2), F.coupled_mean(p.target, p.mean, p.coupling, (1, 0, 2)).float().flatten(2),
                p.log_scale.flatten(2)) for p in preds]
    target, centre, s = (torch.cat(parts, 2).unsqueeze(-1) for parts in zip(*by_hand))
    cal = calibrate(Predictor(model=model, nll=nll, source="test"), _images(2), method="affine", min_pixels=1000, slope=False)
    want = fit_calibration(target, centre, s, "laplace", "affine", min_pixels=1000, slope=False)
    torch.testing.assert_close(cal.offset, want.offset)
    torch.testing.assert_close(cal.slope, want.slope)
    assert not torch.equal(centre, target.new_tensor(pooled([Prediction(p.target, p.mean, p.log_scale) for p in preds])[1]))
    plain = [Prediction(p.target, p.mean, p.log_scale) for p in preds]
    assert torch.equal(pooled(plain)[1], torch.cat([p.mean.flatten(2) for p in preds], 2).unsqueeze(-1))


def test_the_attached_head_gives_the_coefficients(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from hetvae.attach import attach_log_scale_head

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for coupling in ("pixel", "global"):
        model, nll = _model(coupling)
        folder = tmp_path / coupling
        model.save_pretrained(folder, format="diffusers", likelihood=nll)
        vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
        with torch.no_grad():
            out = attach_log_scale_head(vae, folder).decode(z)
            own = model.decode(z)
        assert out.log_scale.shape == (1, 3, 16, 16)
        if coupling == "pixel":
            torch.testing.assert_close(out.coupling, F.bound_coupling(own.coupling), rtol=1e-4, atol=1e-5)
        else:
            assert out.coupling.tolist() == pytest.approx(COEFFICIENTS)


def test_the_panel_draws_the_conditional_error_and_the_coupling_strength():
    from hetvae.viz import coupling_strength, uncertainty_panel

    model, nll = _model("pixel")
    p = Predictor(model=model, nll=nll, source="test").predict(_images(1)[0])
    a = torch.tensor([0.3, -0.4, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(coupling_strength(a), torch.full((1, 2, 2), math.sqrt(0.25 / 3), dtype=torch.float64))
    fig = uncertainty_panel(p.target, p.mean, p.log_scale, standardized=True, centre=p.centre, coupling=p.coupling)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[2].startswith("|x - centre|") and titles[3] == "conditional scale" and titles[-1] == "channels move together"
    plain = [ax.get_title() for ax in uncertainty_panel(p.target, p.mean, p.log_scale).axes if ax.get_title()]
    assert plain == ["input", "reconstruction", "|error|", "predicted scale"]
    with pytest.raises(ValueError, match="coupling"):
        uncertainty_panel(p.target, p.mean, p.log_scale, coupling=p.coupling[..., :5])


@pytest.mark.parametrize("coupling", ["global", "pixel"])
def test_info_shows_the_coupling_and_uncertainty_draws_the_conditional_panel(coupling, tmp_path, capsys):
    """`hetvae info` names the coupling under its YAML key (and the learned coefficients), and
    `hetvae uncertainty` writes the maps and a panel of a coupled model."""
    import json

    from PIL import Image

    from hetvae.cli import main

    model, nll = _model(coupling)
    path = tmp_path / "m"
    model.save_pretrained(path, format="hetvae", likelihood=nll)
    assert main(["info", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["settings"]["log_scale.channel_coupling"] == coupling
    # the order the model was trained in, explicitly: a config's null would mean the default R -> B -> G
    assert record["settings"]["log_scale.coupling_order"] == list(nll.coupling_order or (0, 1, 2))
    coefficients = [v for k, v in record["stored"].items() if k.startswith("likelihood.coupling")]
    assert coefficients == ([pytest.approx(list(COEFFICIENTS))] if coupling == "global" else [])
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"colour coupling: {'global' if coupling == 'global' else 'per pixel'}" in text
    if coupling == "pixel":  # the head's 3 log-scales, then its 3 coefficient maps
        assert "log-scale head: yes, 3 map(s) + 3 coupling map(s), inside the file" in text
    photo = tmp_path / "photo.png"
    Image.fromarray(((_images(1)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(photo)
    out = tmp_path / "maps"
    assert main(["uncertainty", str(path), "--images", str(photo), "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".png") for n in written) and any(n.endswith(".safetensors") for n in written), written
