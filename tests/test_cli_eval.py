"""`hetvae uncertainty`, `eval` and `compare` on tiny runs trained inside the test."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from hetvae.cli import main
from hetvae.config import load_config
from hetvae.evaluate import COLOUR_KEYS
from hetvae.outputs import METRIC_KEYS
from hetvae.predictor import load_predictor
from hetvae.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_RUN = [
    "model.block_out_channels=[16, 32]",
    "model.latent_channels=4",
    "model.norm_num_groups=8",
    "data.resolution=32",
    "data.samples_per_epoch=8",
    "train.steps=3",
    "train.final_steps=0",  # tiny.yaml ends on 128 px crops; 3 steps stay on 32 px
    "train.head_steps=2",  # a head-only phase (tiny.yaml has none): eval reads the model exported after it
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.sample_every=0",
    "train.checkpoint_every=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for granularity in ("pixel", "global"):
        cfg = load_config(CONFIGS / "tiny.yaml", TINY_RUN + [f"log_scale.granularity={granularity}",
                                                            f"out_dir={root / granularity}"])
        train(cfg, progress=False)
        out[granularity] = root / granularity
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    # 44 x 60: not a multiple of the model's factor, so padding and cropping back are exercised
    for i in range(2):
        img = (np.clip(rng.normal(128, 40, (44, 60, 3)), 0, 255)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_uncertainty_writes_panels_maps_and_raw_maps(runs, image_dir, tmp_path):
    assert main(["uncertainty", str(runs["pixel"]), "--images", str(image_dir), "--out", str(tmp_path)]) == 0
    for name in ("img0.png", "img1.png"):  # outputs keep the input's extension: x.png and x.jpg never collide
        panel = Image.open(tmp_path / f"{name}_panel.png")
        assert panel.size == (1300, 280)  # 5 columns x 2.6 in, 2.4 in + title, at 100 dpi
        assert Image.open(tmp_path / f"{name}_scale.png").size == (60, 44)
        maps = load_file(str(tmp_path / f"{name}_maps.safetensors"))
        assert set(maps) == {"input", "mean", "log_scale", "error"}
        assert all(tuple(m.shape) == (3, 44, 60) for m in maps.values())
        assert maps["log_scale"].std() > 0  # a per-pixel map, not a constant


def test_eval_json_has_every_key(runs, image_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(runs["pixel"]), "--images", str(image_dir), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(METRIC_KEYS) | set(COLOUR_KEYS)
    assert result["n_images"] == 2 and result["granularity"] == "pixel"
    assert 0 <= result["coverage_50"] <= result["coverage_90"] <= 1
    assert 0 < result["nll_bpd"] < 16 and result["psnr"] > 0 and isinstance(result["spearman"], float)
    assert "calibration_error" in capsys.readouterr().out


def test_eval_reports_the_chroma_kept(runs, image_dir, tmp_path, capsys):
    from hetvae import metrics as M
    from hetvae.images import load_images
    from hetvae.predictor import iter_predictions

    out = tmp_path / "metrics.json"
    assert main(["eval", str(runs["pixel"]), "--images", str(image_dir), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kept = [M.chroma_kept((p.mean.clamp(-1, 1) + 1) / 2, (p.target + 1) / 2).item()
            for _, p in iter_predictions(load_predictor(runs["pixel"]), load_images(image_dir))]
    assert result["chroma_kept"] == pytest.approx(sum(kept) / 2)
    assert (result["chroma_kept_min"], result["chroma_kept_max"]) == pytest.approx((min(kept), max(kept)))
    printed = capsys.readouterr().out
    assert "chroma_kept_min" in printed
    # 3 training steps: the reconstructions are near grey, and eval says so
    assert min(kept) < 2 / 3 and "note: colour: some reconstructions are washed out" in printed

    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(np.full((32, 40), 90, np.uint8)).save(grey / "flat.png")
    assert main(["eval", str(runs["pixel"]), "--images", str(grey), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["chroma_kept"] is None and result["chroma_kept_min"] is None
    printed = capsys.readouterr().out
    assert "n/a (no colour images)" in printed and "note: colour" not in printed


@pytest.mark.parametrize(
    "low, high, words",
    [(0.9, 1.1, None), (0.5, 1.0, "washed out (one keeps 50%"), (0.9, 1.8, "over-saturated (one has 180%"),
     (None, None, None)],
)
def test_colour_note(low, high, words):
    from hetvae.cli import _colour_note

    note = _colour_note({"chroma_kept_min": low, "chroma_kept_max": high})
    assert (note is None) if words is None else (words in note)


def test_eval_of_a_global_run_has_no_spearman(runs, image_dir, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(runs["global"]), "--images", str(image_dir), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["granularity"] == "global" and result["spearman"] is None


def test_compare_writes_table_and_plots(runs, image_dir, tmp_path):
    args = ["compare", str(runs["pixel"]), str(runs["global"]), "--images", str(image_dir), "--out", str(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "| pixel | pixel |" in table and "| global | global |" in table
    for png in ("reliability.png", "sparsification.png"):
        assert Image.open(tmp_path / png).size[0] > 100


def test_a_bare_model_gets_its_head_or_the_closed_form_scale(runs, tmp_path):
    pixel = load_predictor(runs["pixel"] / "model.safetensors")
    assert pixel.granularity == "pixel"
    model = load_predictor(runs["global"] / "model.safetensors")
    assert model.granularity == "global" and model.nll.head.fit == "learned"  # the run's likelihood travels with it
    import dataclasses

    from hetvae.convert import load_autoencoder

    bare = load_autoencoder(runs["global"] / "model.safetensors")
    bare.config = dataclasses.replace(bare.config, likelihood=None)  # a model that records no likelihood
    bare.save_pretrained(tmp_path / "bare")
    model = load_predictor(tmp_path / "bare")
    assert model.granularity == "global" and model.nll.head.fit == "optimal"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """Two pixel runs that keep their step folders: with EMA (tiny.yaml's) and without."""
    root = tmp_path_factory.mktemp("checkpointed")
    out = {}
    for name, extra in (("ema", []), ("raw", ["train.ema_decay=null"])):
        cfg = load_config(CONFIGS / "tiny.yaml", TINY_RUN + extra + [
            "train.steps=4", "train.head_steps=0", "train.checkpoint_every=2", f"out_dir={root / name}"])
        train(cfg, progress=False)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["ema", "raw"])
def test_a_training_checkpoint_scores_as_the_model_the_run_exports_at_that_step(checkpointed, name, image_dir, tmp_path):
    import torch

    run = checkpointed[name]
    final, exported = load_predictor(run / "checkpoints" / "step_00000004"), load_predictor(run)
    assert final.granularity == exported.granularity == "pixel"
    for ours, theirs in ((final.model, exported.model), (final.nll, exported.nll)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    earlier = load_predictor(run / "checkpoints" / "step_00000002").model.state_dict()
    assert any(not torch.equal(earlier[k], v) for k, v in final.model.state_dict().items())  # another step, other weights
    out = tmp_path / "m.json"
    assert main(["eval", str(run / "checkpoints" / "step_00000002"), "--images", str(image_dir), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == set(METRIC_KEYS) | set(COLOUR_KEYS)


def test_an_unreadable_training_checkpoint_is_a_clear_error(checkpointed, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from hetvae.files import CheckpointError

    step = tmp_path / "step_00000002"
    shutil.copytree(checkpointed["ema"] / "checkpoints" / "step_00000002", step)
    weights = step / "weights.safetensors"
    tensors = load_file(weights)
    save_file(tensors, weights)  # the same tensors without the config metadata
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*hetvae_config.*metadata"):
        load_predictor(step)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: truncated or corrupt"):
        load_predictor(step)


def test_calibrating_a_training_checkpoint_writes_a_new_export_and_leaves_the_step_alone(checkpointed, tmp_path, capsys,
                                                                                         monkeypatch):
    """Where the calibration goes, not the fit (tests/test_calibration*.py test that): a 2-step EMA
    map is nearly constant (std ~3e-5), which the affine fit rightly refuses, so the fit is fixed."""
    import torch

    import hetvae.predictor
    from hetvae.calibration import Calibration

    fitted = Calibration("affine", "laplace", torch.full((3,), 1.2), torch.full((3,), 0.1))
    fits = []
    monkeypatch.setattr(hetvae.predictor, "calibrate", lambda *a, **k: fits.append(1) or fitted)
    step = checkpointed["ema"] / "checkpoints" / "step_00000002"
    image_dir = tmp_path / "images"  # enough values per channel to fit (10,000)
    image_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(np.clip(rng.normal(128, 40, (72, 80, 3)), 0, 255).astype(np.uint8)).save(image_dir / f"{i}.png")
    before = {f.name: f.read_bytes() for f in step.iterdir()}
    assert main(["calibrate", str(step), "--images", str(image_dir)]) == 1
    err = capsys.readouterr().err
    assert "training checkpoint" in err and "--out DIR" in err and not fits  # refused before any fit
    assert main(["calibrate", str(step), "--images", str(image_dir), "--out", str(tmp_path / "cal")]) == 0
    assert {f.name: f.read_bytes() for f in step.iterdir()} == before
    calibrated = load_predictor(tmp_path / "cal")
    assert calibrated.calibration.to_dict() == fitted.to_dict() and calibrated.granularity == "pixel"


def test_eval_per_image_rows_pool_to_the_totals(runs, image_dir, tmp_path, capsys):
    """Each row is the image scored alone; the pooled PSNR and chroma kept are their means, the
    pooled bits/dim their mean weighted by element counts, coverage the weighted hit rate."""
    from hetvae.evaluate import PER_IMAGE_KEYS, evaluate
    from hetvae.images import load_images

    out = tmp_path / "metrics.json"
    args = ["eval", str(runs["pixel"]), "--images", str(image_dir), "--out", str(out), "--per-image"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    rows = result["images"]
    assert [Path(r["image"]).name for r in rows] == ["img0.png", "img1.png"]
    assert all(set(r) == {"image", *PER_IMAGE_KEYS} for r in rows)
    predictor = load_predictor(runs["pixel"])
    for row in rows:
        alone = evaluate(predictor, load_images(row["image"]))
        assert {k: row[k] for k in PER_IMAGE_KEYS} == pytest.approx({k: alone[k] for k in PER_IMAGE_KEYS})
    assert result["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / 2)
    assert result["chroma_kept"] == pytest.approx(sum(r["chroma_kept"] for r in rows) / 2)
    # both images are 44 x 60: equal weights
    assert result["nll_bpd"] == pytest.approx(sum(r["nll_bpd"] for r in rows) / 2)
    assert result["coverage_90"] == pytest.approx(sum(r["coverage_90"] for r in rows) / 2)
    printed = capsys.readouterr().out
    assert "img0.png" in printed and "bits/dim" in printed and f"{rows[1]['psnr']:.2f}" in printed
    # without the flag: no rows, and the summary keys as before
    assert main(args[:-1]) == 0
    assert "images" not in json.loads(out.read_text())


def test_eval_per_image_of_a_calibrated_model_shows_raw_beside(runs, image_dir, tmp_path, capsys):
    """A calibrated model's rows carry the raw figures too: each row's ``uncalibrated`` entry is the
    image scored alone by the same model with --uncalibrated, and the table prints both."""
    import shutil

    from hetvae.evaluate import PER_IMAGE_KEYS

    import skimage.data
    from PIL import Image

    run, fit = tmp_path / "run", tmp_path / "fit"
    shutil.copytree(runs["pixel"], run)
    fit.mkdir()
    for name in ("astronaut", "coffee"):  # 2 x 100 x 100: enough values for a fit
        Image.fromarray(getattr(skimage.data, name)()[:100, :100].copy()).save(fit / f"{name}.png")
    assert main(["calibrate", str(run), "--images", str(fit)]) == 0
    capsys.readouterr()
    calibrated, raw = tmp_path / "cal.json", tmp_path / "raw.json"
    assert main(["eval", str(run), "--images", str(image_dir), "--out", str(calibrated), "--per-image"]) == 0
    printed = capsys.readouterr().out
    assert main(["eval", str(run), "--images", str(image_dir), "--out", str(raw), "--per-image", "--uncalibrated"]) == 0
    rows, raw_rows = json.loads(calibrated.read_text())["images"], json.loads(raw.read_text())["images"]
    for row, alone in zip(rows, raw_rows, strict=True):
        assert set(row["uncalibrated"]) == set(PER_IMAGE_KEYS) and "uncalibrated" not in alone
        assert row["uncalibrated"] == pytest.approx({k: alone[k] for k in PER_IMAGE_KEYS})
        assert row["nll_bpd"] != pytest.approx(alone["nll_bpd"])  # the calibration changed it
    assert "raw b/d" in printed and f"{rows[0]['uncalibrated']['nll_bpd']:.3f}" in printed
    assert f"{rows[0]['nll_bpd']:.3f}" in printed
