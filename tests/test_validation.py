"""Validation while training (data.val_path, train.val_every, train.keep_best): the numbers are
``hetvae eval``'s on the same model and images, validating leaves training's weights bit for bit
as they were, best/ holds the best step, and bad validation images stop the run before it starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.checkpoint import latest_checkpoint, load_checkpoint
from hetvae.config import Config
from hetvae.data import build_dataset
from hetvae.evaluate import evaluate
from hetvae.images import load_images, sample_images
from hetvae.predictor import load_predictor
from hetvae.schema import ConfigError, apply_overrides
from hetvae.train import Trainer, train
from hetvae.validation import VAL_KEYS, validation_images


def _write_images(folder: Path, seed: int, n: int = 3, size: tuple[int, int] = (36, 44)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(n):
        base = ((xx + 5 * i) // 6 + yy // 6) % 2 * 150 + 50
        noise = rng.integers(0, 30, size=size)
        rgb = np.stack([base + noise, base[::-1] + noise, np.full_like(base, 80 + 30 * i)], axis=-1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("val")
    return _write_images(root / "train", 0, n=4), _write_images(root / "val", 1)


def make_cfg(train_dir: Path, out_dir: Path, *overrides: str) -> Config:
    base = [
        "model.block_out_channels=[8, 16]", "model.norm_num_groups=8", "model.layers_per_block=1",
        "model.mid_block_attention=false", "log_scale.granularity=pixel", "log_scale.head_channels=8",
        f"data.path={train_dir}", "data.resolution=16", "data.samples_per_epoch=8",
        "train.steps=4", "train.batch_size=4", "train.log_every=2", "train.sample_every=0",
        "train.checkpoint_every=4", "train.seed=5", "train.device=cpu", "train.ema_decay=0.5",
        "train.logger=none", f"out_dir={out_dir}",
    ]
    return apply_overrides(Config(), base + list(overrides))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_changes_no_weight_and_scores_as_hetvae_eval(folders, tmp_path):
    """The same run with and without validation (every step, best kept, panels from the validation
    images) ends with the same tensors bit for bit; the last validation record equals
    ``evaluate`` of the exported model on those images."""
    train_dir, val_dir = folders
    plain = train(make_cfg(train_dir, tmp_path / "plain"), progress=False)
    watched = train(make_cfg(train_dir, tmp_path / "watched", f"data.val_path={val_dir}", "train.val_every=1",
                             "train.keep_best=true", "train.sample_every=2"), progress=False)
    assert plain.step == watched.step == 4
    a = load_checkpoint(latest_checkpoint(tmp_path / "plain" / "checkpoints")).tensors
    b = load_checkpoint(latest_checkpoint(tmp_path / "watched" / "checkpoints")).tensors
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    val = [r for r in _records(tmp_path / "watched") if "val_nll_bpd" in r]
    assert [r["step"] for r in val] == [1, 2, 3, 4]
    assert not any("val_nll_bpd" in r for r in _records(tmp_path / "plain"))
    reference = evaluate(load_predictor(tmp_path / "watched", calibrated=False), load_images(val_dir))
    last = val[-1]
    assert last["val_images"] == 3
    for key in VAL_KEYS:
        if reference[key] is not None:
            assert last[f"val_{key}"] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    # the weights moved, so the validations differ
    assert len({r["val_nll_bpd"] for r in val}) == 4


def test_keep_best_holds_the_best_step(folders, tmp_path):
    train_dir, val_dir = folders
    run = tmp_path / "run"
    # a high lr makes the validation bits/dim go up and down
    train(make_cfg(train_dir, run, f"data.val_path={val_dir}", "train.val_every=1", "train.keep_best=true",
                   "train.steps=6", "train.lr=0.05", "train.ema_decay=null", "train.checkpoint_every=0"),
          progress=False)
    val = [r for r in _records(run) if "val_nll_bpd" in r]
    best = min(val, key=lambda r: r["val_nll_bpd"])
    assert best["step"] != val[-1]["step"]  # the best, not the last
    record = json.loads((run / "best" / "validation.json").read_text())
    assert record["step"] == best["step"] and record["val_nll_bpd"] == pytest.approx(best["val_nll_bpd"])
    # best/ is a run folder: hetvae eval scores it to the recorded bits/dim
    again = evaluate(load_predictor(run / "best", calibrated=False), load_images(val_dir))
    assert again["nll_bpd"] == pytest.approx(best["val_nll_bpd"], rel=1e-6)
    assert not list(run.glob(".tmp-best-*")) and not list(run.glob(".old-best-*"))


def test_a_resume_keeps_comparing_with_the_best_so_far(folders, tmp_path):
    """A run resumed after its best step replaces best/ only with a lower bits/dim; a resume may turn
    validation on (a key a resume may change)."""
    train_dir, val_dir = folders
    run = tmp_path / "run"
    common = [f"data.val_path={val_dir}", "train.keep_best=true", "train.lr=0.05", "train.ema_decay=null",
              "train.checkpoint_every=1"]
    train(make_cfg(train_dir, run, *common, "train.steps=1", "train.val_every=1"), progress=False)
    first = json.loads((run / "best" / "validation.json").read_text())
    resumed = Trainer(make_cfg(train_dir, run, *common, "train.steps=6", "train.val_every=1"), progress=False)
    assert resumed.step == 1 and resumed.best_bpd == pytest.approx(first["val_nll_bpd"])
    resumed.run()
    val = [r for r in _records(run) if "val_nll_bpd" in r]
    assert [r["step"] for r in val] == [1, 2, 3, 4, 5, 6]
    best = json.loads((run / "best" / "validation.json").read_text())
    assert best["val_nll_bpd"] == pytest.approx(min(r["val_nll_bpd"] for r in val))


def test_panels_show_the_validation_images(folders, tmp_path):
    train_dir, val_dir = folders
    trainer = Trainer(make_cfg(train_dir, tmp_path / "run", f"data.val_path={val_dir}"), progress=False)
    trainer.run_dir.mkdir(parents=True)
    trainer.write_samples()
    want = build_dataset(apply_overrides(Config(), [f"data.path={val_dir}", "data.resolution=16"]).data, train=False)
    assert torch.equal(trainer._panel_inputs, torch.stack([want[i] for i in range(len(want))]))


def test_the_demo_validates_on_the_held_out_sample_photographs():
    cfg = apply_overrides(Config(), ["train.val_every=10"])
    images = validation_images(cfg)
    assert list(images.names) == [name for name, _ in sample_images("test")]
    assert validation_images(apply_overrides(Config(), ["data.path=/somewhere"])) is None


def test_own_data_without_val_path_warns_and_does_not_validate(folders, tmp_path, caplog):
    train_dir, _ = folders
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        train(make_cfg(train_dir, tmp_path / "run", "train.val_every=2", "train.steps=2"), progress=False)
    assert "set data.val_path" in caplog.text
    assert not any("val_nll_bpd" in r for r in _records(tmp_path / "run"))


@pytest.mark.parametrize("case", ["empty folder", "missing", "unreadable", "empty list file"])
def test_unusable_validation_images_stop_the_run_before_it_starts(folders, tmp_path, case):
    train_dir, _ = folders
    bad = tmp_path / "bad"
    if case == "empty folder":
        bad.mkdir()
        (bad / "notes.txt").write_text("no images here")
    elif case == "unreadable":
        bad.mkdir()
        (bad / "broken.png").write_bytes(b"not a png")
    elif case == "empty list file":
        bad = tmp_path / "list.txt"
        bad.write_text("# nothing\n")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^data\.val_path: ") as info:
        Trainer(make_cfg(train_dir, run, f"data.val_path={bad}", "train.val_every=1"), progress=False)
    assert str(bad) in str(info.value)
    assert not run.exists()
