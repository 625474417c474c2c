"""train.logger: where a run's scalars go besides metrics.jsonl (tensorboard, wandb, none, a list),
and the start line that says what train.batch_size means."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from test_validation import _write_images, make_cfg

from hetvae import loggers
from hetvae.loggers import logger_names
from hetvae.schema import ConfigError
from hetvae.train import Trainer, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loggers")
    return _write_images(root / "train", 0, n=4), _write_images(root / "val", 1)


def test_logger_names():
    assert logger_names("none") == []
    assert logger_names("wandb") == ["wandb"]
    assert logger_names(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]


def test_none_writes_metrics_jsonl_alone(folders, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(folders[0], run, "train.steps=2", "train.logger=none"), progress=False)
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


def test_tensorboard_writes_events_or_says_it_is_missing(folders, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        train(make_cfg(folders[0], run, "train.steps=2", "train.logger=tensorboard"), progress=False)
    if importlib.util.find_spec("tensorboard") is None:
        assert caplog.text.count("tensorboard is not installed") == 1
        assert not (run / "tensorboard").exists()
    else:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_named_but_not_installed_is_refused_before_the_run(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(loggers, "_installed", lambda module: module != "wandb")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^train\.logger: .*pip install wandb"):
        Trainer(make_cfg(folders[0], run, "train.logger=[tensorboard, wandb]"), progress=False)
    assert not run.exists()


def test_wandb_offline_run_holds_the_metrics(folders, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "hetvae-test")
    run = tmp_path / "run"
    train(make_cfg(folders[0], run, "train.steps=2", "train.logger=wandb", f"data.val_path={folders[1]}",
                   "train.val_every=2"), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    stored = b"".join(f.read_bytes() for f in offline[0].glob("run-*.wandb"))  # what `wandb sync` uploads
    last_train = [r for r in records if "total" in r][-1]
    last_val = [r for r in records if "val_nll_bpd" in r][-1]
    assert _last_logged(stored, "total") == pytest.approx(last_train["total"])
    assert _last_logged(stored, "val_nll_bpd") == pytest.approx(last_val["val_nll_bpd"])
    assert _last_logged(stored, "grad_norm") == pytest.approx(last_train["grad_norm"])


def _last_logged(stored: bytes, key: str) -> float:
    """The last value of ``key`` in a wandb run file: history items are protobuf ``HistoryItem``s,
    ``key`` (field 2) then ``value_json`` (field 16), each a length-prefixed string."""
    tag = b"\x12" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    at = stored.rfind(tag)
    assert at >= 0, f"{key} is not in the wandb run file"
    at += len(tag)  # the value's length, then the value
    return float(json.loads(stored[at + 1 : at + 1 + stored[at]]))


def test_the_start_line_says_what_batch_size_means(folders, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hetvae.train"):
        Trainer(make_cfg(folders[0], tmp_path / "run", "train.grad_accum=2"), progress=False)
    assert "batch: train.batch_size=4 images is 1 process; 8 images per optimizer step x train.grad_accum=2" in caplog.text
