"""`hetvae calibrate` and a stored calibration: written with the model in every format, applied by
loading, eval, uncertainty and decode, replaced (never stacked), refused when it cannot help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.calibration import Calibration, calibrated_metrics, pooled
from hetvae.predictor import calibrate
from hetvae.cli import main
from hetvae.build import build_model
from hetvae.config import load_config
from hetvae.convert import load_autoencoder
from hetvae.evaluate import evaluate
from hetvae.images import load_images
from hetvae.predictor import load_predictor, predict_all
from hetvae.functional import soft_clamp

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = [
    "model.block_out_channels=[16, 32]", "model.latent_channels=4", "model.norm_num_groups=8",
    "data.resolution=32", "data.samples_per_epoch=8", "train.steps=2", "train.final_steps=0", "train.batch_size=2",
    "train.warmup_steps=0", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
    "log_scale.head_channels=8", "train.head_steps=0",
]


def _photos(folder: Path, n: int = 3, size: int = 72, seed: int = 0) -> Path:
    """Smooth colour images with texture in part of them (so errors vary), 8-bit PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 0.4 + 0.5
        base[:, size // 2:] += rng.normal(0, 0.15, (size, size - size // 2, 3))
        Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    from hetvae.train import train

    root = tmp_path_factory.mktemp("calrun")
    cfg = load_config(CONFIGS / "tiny.yaml", TRAIN + ["log_scale.granularity=pixel", f"out_dir={root / 'run'}"])
    train(cfg, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("photos"))


def _copy_run(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_calibrate_stores_the_correction_and_eval_reports_before_and_after(pixel_run, photos, tmp_path, capsys):
    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    predictor = load_predictor(run)
    cal = predictor.calibration
    assert cal is not None and cal.method == "isotonic" and cal.bpd_after <= cal.bpd_before  # the default
    # the fit is the one the API gives on the same images, on the uncalibrated scale
    direct = calibrate(load_predictor(run, calibrated=False), load_images(photos))
    torch.testing.assert_close(direct.offset, cal.offset)
    capsys.readouterr()
    assert main(["eval", str(run), "--images", str(photos), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "uncalibrated" in out and "calibrated" in out
    result = json.loads((tmp_path / "m.json").read_text())
    before = evaluate(load_predictor(run, calibrated=False), load_images(photos))
    assert result["uncalibrated"]["nll_bpd"] == pytest.approx(before["nll_bpd"])
    # the calibrated metrics are the calibration's, on the fitting images: bits/dim as fitted
    preds = predict_all(load_predictor(run, calibrated=False), load_images(photos))
    want = calibrated_metrics(*pooled(preds), cal)
    assert result["nll_bpd"] == pytest.approx(want["nll_bpd"], rel=1e-6)
    assert result["calibration_error"] == pytest.approx(want["calibration_error"], abs=1e-6)
    assert result["nll_bpd"] <= result["uncalibrated"]["nll_bpd"] + 1e-9
    # --uncalibrated: the model as trained
    assert main(["eval", str(run), "--images", str(photos), "--uncalibrated"]) == 0
    assert "uncalibrated  " not in capsys.readouterr().out


def test_calibrating_twice_replaces_and_remove_restores(pixel_run, photos, tmp_path):
    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    first = load_predictor(run).calibration
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    second = load_predictor(run).calibration
    torch.testing.assert_close(second.slope, first.slope)
    torch.testing.assert_close(second.offset, first.offset)
    assert main(["calibrate", str(run), "--images", str(photos), "--method", "isotonic"]) == 0
    iso = load_predictor(run).calibration
    assert iso.method == "isotonic"
    torch.testing.assert_close(iso.offset, first.offset)  # the affine part, fitted on the raw scale again
    assert main(["calibrate", str(run), "--remove"]) == 0
    assert load_predictor(run).calibration is None


@pytest.mark.parametrize("fmt", ["hetvae", "diffusers", "ldm"])
def test_the_calibration_travels_through_every_export(pixel_run, photos, tmp_path, fmt):
    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos), "--method", "isotonic"]) == 0
    want = load_predictor(run)
    assert main(["convert", str(run), "--to", fmt, "--out", str(tmp_path / fmt)]) == 0
    got = load_predictor(tmp_path / fmt)
    assert got.calibration is not None
    torch.testing.assert_close(got.calibration.knots, want.calibration.knots, rtol=0, atol=0)
    torch.testing.assert_close(got.calibration.offset, want.calibration.offset, rtol=0, atol=0)
    images = load_images(photos)
    a, b = evaluate(want, images), evaluate(got, images)
    for key in ("nll_bpd", "coverage_90", "calibration_error"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9)
    # calibrating an export in place works too (hetvae folder, diffusers folder, ldm file hetvae wrote)
    assert main(["calibrate", str(tmp_path / fmt), "--images", str(photos), "--method", "affine"]) == 0
    assert load_predictor(tmp_path / fmt).calibration.method == "affine"


def test_decode_returns_the_bounded_calibrated_map(pixel_run, photos, tmp_path):
    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    model = load_autoencoder(run / "model.safetensors").eval()
    cal = model.calibration
    assert cal is not None
    x = load_images(photos)[0][1].unsqueeze(0)
    with torch.no_grad():
        z = model.encode(x).mode()
        calibrated = model.decode(z).log_scale
        model.use_calibration = False
        raw = model.decode(z).log_scale
    lik = model.config.likelihood
    torch.testing.assert_close(calibrated, cal.apply(soft_clamp(raw, *lik.bounds, lik.margin)))
    # the predictor's map is the same one
    p = load_predictor(run).predict(x[0])
    torch.testing.assert_close(p.log_scale, calibrated.expand_as(p.log_scale))


def test_uncertainty_maps_are_calibrated_unless_asked(pixel_run, photos, tmp_path):
    from safetensors.torch import load_file

    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    assert main(["uncertainty", str(run), "--images", str(photos / "p0.png"), "--out", str(tmp_path / "a")]) == 0
    assert main(["uncertainty", str(run), "--images", str(photos / "p0.png"), "--out", str(tmp_path / "b"), "--uncalibrated"]) == 0
    a = load_file(str(tmp_path / "a" / "p0.png_maps.safetensors"))["log_scale"]
    b = load_file(str(tmp_path / "b" / "p0.png_maps.safetensors"))["log_scale"]
    cal = load_predictor(run).calibration
    torch.testing.assert_close(a, cal.apply(b.unsqueeze(0))[0].float())


def test_too_few_pixels_is_refused_with_a_message(pixel_run, tmp_path, capsys):
    run = _copy_run(pixel_run, tmp_path / "run")
    small = _photos(tmp_path / "small", n=1, size=32)
    assert main(["calibrate", str(run), "--images", str(small)]) == 1
    assert "at least 10,000 values" in capsys.readouterr().err
    assert load_predictor(run).calibration is None


def test_a_foreign_single_file_needs_out(pixel_run, photos, tmp_path, capsys):
    from safetensors.torch import save_file

    model = load_autoencoder(pixel_run / "model.safetensors")
    model.remove_log_scale_head()
    file = tmp_path / "sd.safetensors"  # an original-layout file with no hetvae metadata
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(file))
    assert main(["calibrate", str(file), "--images", str(photos)]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["calibrate", str(file), "--images", str(photos), "--out", str(tmp_path / "o")]) == 0
    assert load_predictor(tmp_path / "o").calibration is not None


def test_fine_tuning_a_calibrated_model_drops_the_calibration(pixel_run, photos, tmp_path):
    run = _copy_run(pixel_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--images", str(photos)]) == 0
    cfg = load_config(CONFIGS / "tiny.yaml", TRAIN + ["log_scale.granularity=pixel", f"model.init_from={run}"])
    with pytest.warns(UserWarning, match="calibration"):
        model = build_model(cfg)
    assert model.calibration is None and model.config.likelihood.calibration is None


def test_a_stored_calibration_for_another_family_is_refused():
    from hetvae.likelihood import Likelihood

    # the record is kept (so that a model holding it loads and the record can be removed); using it refuses
    cal = Calibration("affine", "gaussian", torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="gaussian"):
        Likelihood(granularity="pixel", family="laplace", calibration=cal.to_dict()).calibrator()
    with pytest.raises(ValueError, match="calibration"):
        Likelihood(granularity="pixel", calibration={"method": "affine"}).calibrator()
    with pytest.raises(ValueError, match="calibration"):
        Likelihood(granularity="pixel", calibration="not a mapping")


def test_an_in_memory_model_is_calibrated_under_its_recorded_likelihood(photos):
    """``hetvae.calibrate(model, ...)`` scores the model as load_predictor would: with the
    likelihood recorded in its config (here Gaussian, narrower bounds), not a default Laplace."""
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    config = AutoencoderConfig(
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, log_scale="pixel", log_scale_init=-2.0,
        likelihood={"granularity": "pixel", "family": "gaussian", "bounds": (-5.0, 1.0), "init": -2.0},
    )
    cal = calibrate(AutoencoderKL(config), load_images(photos), method="affine")
    assert cal.family == "gaussian"
