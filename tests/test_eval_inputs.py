"""Issue 35, items 5, 9 and 18, and the uncertainty progress bar: every `--images` path is used,
a non-finite reconstruction or scale is refused naming the image (eval, compare, uncertainty,
calibrate), every JSON hetvae writes is valid, and hetvae's own maps are never read as latents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.convert import save_autoencoder
from hetvae.outputs import write_json


def _model(tmp_path: Path, name: str, poison: str | None = None, log_scale: str | None = "pixel") -> Path:
    """A tiny SD-shaped model as one hetvae file; ``poison``: "mean" (NaN reconstruction), "scale"
    (NaN log-scale map, finite mean) or "inf" (an infinite reconstruction)."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale=log_scale)
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        if poison == "mean":
            model.decoder.conv_out.bias[0] = math.nan
        elif poison == "inf":
            model.decoder.conv_out.bias[1] = math.inf
        elif poison == "scale":
            model.decoder.log_scale_head.weight.fill_(math.nan)
    return save_autoencoder(model, tmp_path / name)


def _photo(path: Path, seed: int, size=(72, 72)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], -1) * 0.4 + 0.5
    base += np.random.default_rng(seed).normal(0, 0.1, base.shape)
    Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("model"), "m.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return [_photo(root / f"{d}/p{i}.png", i) for i, d in enumerate("abc")]


# --- item 5: a repeated --images keeps every path ------------------------------------------------


@pytest.mark.parametrize("form", ["repeated", "several", "mixed"])
def test_eval_uses_every_images_path(model_file, photos, tmp_path, form):
    a, b, c = map(str, photos)
    images = {"repeated": ["--images", a, "--images", b, "--images", c],
              "several": ["--images", a, b, c],
              "mixed": ["--images", a, b, "--images", c]}[form]
    out = tmp_path / "m.json"
    assert main(["eval", str(model_file), *images, "--out", str(out), "--per-image"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 3
    assert [Path(r["image"]) for r in result["images"]] == photos


def test_compare_uses_every_images_path(model_file, photos, tmp_path):
    a, b, c = map(str, photos)
    out = tmp_path / "cmp"
    assert main(["compare", str(model_file), "--images", a, "--images", b, c, "--out", str(out)]) == 0
    (result,) = json.loads((out / "comparison.json").read_text()).values()
    assert result["n_images"] == 3


def test_calibrate_fits_on_every_images_path(model_file, photos, tmp_path, capsys):
    from hetvae.images import load_images
    from hetvae.predictor import calibrate, load_predictor

    a, b, c = map(str, photos)
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(model_file), "--images", a, "--images", b, "--images", c, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(p in printed for p in (a, b, c)), printed  # the message names what it fitted on
    stored = load_predictor(out).calibration
    direct = calibrate(load_predictor(model_file, calibrated=False), load_images(photos))
    assert stored.n_pixels == direct.n_pixels == 3 * 72 * 72
    torch.testing.assert_close(stored.offset, direct.offset)


def test_a_repeated_path_is_read_once(model_file, photos, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", str(model_file), "--images", str(photos[0]), "--images", str(photos[0]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 1


# --- item 9: non-finite reconstructions and scales are refused, naming the image ----------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("poisoned")
    return {p: _model(root, f"{p}.safetensors", p, None if p == "global" else "pixel")
            for p in ("mean", "scale", "inf")} | {
        "global": _model(root, "global.safetensors", "mean", None)}


def _refused(capsys, code: int, photo: Path) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert str(photo) in lines[0] and ("NaN" in lines[0] or "infinite" in lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("poison", ["mean", "scale", "inf", "global"])
@pytest.mark.parametrize("command", ["eval", "compare", "uncertainty", "calibrate"])
def test_a_non_finite_output_is_refused_naming_the_image(poisoned, photos, tmp_path, capsys, command, poison):
    model, photo = str(poisoned[poison]), str(photos[1])
    argv = {
        "eval": ["eval", model, "--images", photo, "--out", str(tmp_path / "m.json")],
        "compare": ["compare", model, "--images", photo, "--out", str(tmp_path / "cmp")],
        "uncertainty": ["uncertainty", model, "--images", photo, "--out", str(tmp_path / "unc")],
        "calibrate": ["calibrate", model, "--images", photo, "--out", str(tmp_path / "cal")],
    }[command]
    line = _refused(capsys, main(argv), photos[1])
    assert ("log-scale" in line) == (poison == "scale"), line
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "cmp").exists()
    assert not list((tmp_path / "unc").rglob("*.png")) if (tmp_path / "unc").exists() else True
    assert not (tmp_path / "cal").exists()


def test_non_finite_decoded_latents_are_refused_naming_the_file(poisoned, tmp_path, capsys):
    save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(tmp_path / "z.safetensors"))
    code = main(["uncertainty", str(poisoned["mean"]), "--images", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "out")])
    _refused(capsys, code, tmp_path / "z.safetensors")
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True


def test_the_python_api_refuses_a_non_finite_prediction(poisoned):
    from hetvae.evaluate import evaluate
    from hetvae.predictor import load_predictor

    with pytest.raises(ValueError, match="NaN"):
        evaluate(load_predictor(poisoned["mean"]), [torch.zeros(3, 16, 16)])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_written_json_is_always_valid(tmp_path, value):
    """Undefined values are null, never a bare NaN/Infinity (which no strict JSON reader accepts)."""
    path = write_json({"psnr": value, "nested": {"x": [1.0, value]}, "n_images": 1}, tmp_path / "m.json")
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}")) == {
        "psnr": None, "nested": {"x": [1.0, None]}, "n_images": 1}


def test_info_json_is_valid(model_file, capsys):
    assert main(["info", str(model_file), "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c}"))


# --- item 18: hetvae's own maps are not latents -------------------------------------------------


def test_a_rerun_over_a_glob_skips_hetvaes_own_maps(tmp_path, capsys):
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                            latent_channels=4))
    model.add_log_scale_head(init=-2.0)
    model.eval().save_pretrained(tmp_path / "model")
    folder = tmp_path / "latents"
    folder.mkdir()
    save_file({"latents": torch.randn(1, 4, 4, 4)}, str(folder / "z.safetensors"))
    model, argv = str(tmp_path / "model"), ["--out", str(folder)]
    assert main(["uncertainty", model, "--images", str(folder / "z.safetensors"), *argv]) == 0
    maps = folder / "z.safetensors_maps.safetensors"
    assert maps.is_file()
    capsys.readouterr()
    assert main(["uncertainty", model, "--images", *map(str, sorted(folder.glob("*.safetensors"))), *argv]) == 0  # a glob
    captured = capsys.readouterr()
    assert "wrote 1 decoded panel(s)" in captured.out
    assert f"note: skipped 1 file(s) hetvae wrote (e.g. {maps})" in captured.err
    assert not (folder / "z.safetensors_maps.safetensors_maps.safetensors").exists()
    # only hetvae's own files: nothing to do is an error, not a silent success
    code = main(["uncertainty", model, "--images", str(maps), *argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error:") and str(maps) in err and "written by hetvae" in err


def test_a_rerun_over_images_and_their_outputs_is_not_called_mixed(model_file, tmp_path, capsys):
    """`hetvae uncertainty MODEL --images photos/* --out photos` twice: the maps of the first run are skipped."""
    folder = tmp_path / "photos"
    _photo(folder / "x.png", 0, (24, 24))
    argv = ["--out", str(folder)]
    assert main(["uncertainty", str(model_file), "--images", str(folder / "x.png"), *argv]) == 0
    capsys.readouterr()
    assert main(["uncertainty", str(model_file), "--images", *map(str, sorted(folder.iterdir())), *argv]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 panel(s)" in captured.out and "note: skipped 3 file(s) hetvae wrote" in captured.err


# --- the progress bar ends at n/n ---------------------------------------------------------------


def test_uncertainty_progress_bar_is_finished(model_file, photos, tmp_path, capsys):
    assert main(["uncertainty", str(model_file), "--images", str(photos[0]), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    states = [s for s in err.replace("\r", "\n").splitlines() if "uncertainty" in s and "/1" in s]
    assert states and "1/1" in states[-1], err
