"""`hetvae uncertainty` with a model whose outputs cannot be drawn (NaN weights), or that has no map
for latents: one `error:` line naming the input file and the cause, and no output folder. A model
with extreme but finite outputs is drawn (as `hetvae eval` scores it), never matplotlib's "Invalid
vmin or vmax"; the panels refuse non-finite maps themselves, naming the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hetvae import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.viz import decoded_panel, save_scale_map, uncertainty_panel

TINY = {"block_out_channels": (32, 64), "norm_num_groups": 16, "layers_per_block": 1, "latent_channels": 4}


def tiny_model(head: bool = True) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(**TINY))
    if head:
        model.add_log_scale_head(init=-2.0)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 32 px photograph and a latent file of one (1, 4, 4, 4) latent."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "photo.png")
    save_file({"latents": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))},
              str(folder / "z.safetensors"))
    return {"image": folder / "photo.png", "latent": folder / "z.safetensors"}


def saved(model: AutoencoderKL, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def run_uncertainty(capsys, source, checkpoint: str, out) -> tuple[int, list[str]]:
    code = main(["uncertainty", checkpoint, "--images", str(source), "--out", str(out)])
    err = capsys.readouterr().err.replace("\r", "\n")  # the progress bar redraws with carriage returns
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def nan_weights(model: AutoencoderKL) -> AutoencoderKL:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def nan_head(model: AutoencoderKL) -> AutoencoderKL:
    with torch.no_grad():
        model.decoder.log_scale_head.weight.fill_(float("nan"))
    return model


@pytest.mark.parametrize("kind", ["image", "latent"])
@pytest.mark.parametrize("damage, cause", [(nan_weights, "reconstruction has"), (nan_head, "log-scale has")])
def test_non_finite_outputs_are_refused_before_anything_is_written(inputs, tmp_path, capsys, kind, damage, cause):
    checkpoint = saved(damage(tiny_model()), tmp_path / "model")
    out = tmp_path / "out"
    code, errors = run_uncertainty(capsys, inputs[kind], checkpoint, out)
    assert code == 1
    assert len(errors) == 1, errors
    assert str(inputs[kind]) in errors[0] and cause in errors[0] and "NaN" in errors[0], errors[0]
    assert "Invalid vmin" not in errors[0]
    assert not out.exists(), sorted(out.rglob("*"))


def test_a_model_without_a_map_for_latents_is_refused_without_an_output_folder(inputs, tmp_path, capsys):
    checkpoint = saved(tiny_model(head=False), tmp_path / "model")
    out = tmp_path / "out"
    code, errors = run_uncertainty(capsys, inputs["latent"], checkpoint, out)
    assert code == 1 and len(errors) == 1, errors
    assert str(inputs["latent"]) in errors[0] and "no per-pixel log-scale head" in errors[0], errors[0]
    assert not out.exists()


def test_an_existing_output_folder_is_left_as_it_was(inputs, tmp_path, capsys):
    checkpoint = saved(nan_weights(tiny_model()), tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    assert run_uncertainty(capsys, inputs["image"], checkpoint, out)[0] == 1
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("head", [True, False], ids=["pixel-head", "no-head"])
def test_extreme_finite_outputs_are_drawn(inputs, tmp_path, capsys, head):
    """A reconstruction of 3e38 everywhere is finite (eval scores it); its |error| averaged over the
    channels in float32 was infinite, and the panel's colour range undefined."""
    model = tiny_model(head)
    with torch.no_grad():
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.fill_(3e38)
    checkpoint = saved(model, tmp_path / "model")
    out = tmp_path / "out"
    code, errors = run_uncertainty(capsys, inputs["image"], checkpoint, out)
    assert code == 0 and not errors, errors
    assert sorted(p.name for p in out.iterdir()) == ["photo.png_maps.safetensors", "photo.png_panel.png",
                                                      "photo.png_scale.png"]


X = torch.zeros(1, 3, 8, 8)
NAN, INF = X + float("nan"), X + float("inf")


@pytest.mark.parametrize("args, what", [
    ((NAN, X, X), "input"),
    ((X, NAN, X), "reconstruction"),
    ((X, INF, X), "reconstruction"),
    ((X, X, NAN), "log-scale"),
    ((X, X, INF), "log-scale"),
    ((X, X, -INF), "log-scale"),
    ((X, X, X + 1e4), "scale exp(log_scale)"),
])
def test_the_uncertainty_panel_refuses_non_finite_maps_by_name(args, what):
    with pytest.raises(ValueError, match=r"cannot draw the panel 'step 3': the " + what.replace("(", r"\(").replace(")", r"\)")):
        uncertainty_panel(*args, title="step 3")


@pytest.mark.parametrize("args, what", [
    ((NAN, X), "decoded image"),
    ((X, NAN), "log-scale"),
    ((X, INF), "log-scale"),
    ((X, X + 1e4), "scale exp(log_scale)"),
])
def test_the_decoded_panel_refuses_non_finite_maps_by_name(args, what):
    with pytest.raises(ValueError, match=r"cannot draw the panel: the " + what.replace("(", r"\(").replace(")", r"\)")):
        decoded_panel(*args)


def test_panels_of_extreme_finite_values_are_drawn(tmp_path):
    huge = X + 3e38
    uncertainty_panel(X, huge, X + 80.0, standardized=True)
    decoded_panel(huge, X + 80.0)
    save_scale_map(tmp_path / "scale.png", X[0] + 80.0)


def test_the_scale_map_refuses_a_non_finite_log_scale(tmp_path):
    with pytest.raises(ValueError, match=r"cannot draw the scale map s\.png: the log-scale has 192 NaN"):
        save_scale_map(tmp_path / "s.png", NAN[0])
    assert not (tmp_path / "s.png").exists()
