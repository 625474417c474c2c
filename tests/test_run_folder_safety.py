"""A run folder never loses what it holds: a user's files are not replaced by a fresh run, and a
stored calibration survives a resume that trains nothing (and is dropped with a warning otherwise)."""

from __future__ import annotations

import logging
import pathlib

import pytest
import test_hostile_train
import torch

from conftest import write_noise_photos
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import Calibration
from hetvae.cli import main as cli_main
from hetvae.config import Config, save_config
from hetvae.convert import inspect_checkpoint, save_autoencoder
from hetvae.predictor import load_predictor, store_calibration

images = test_hostile_train.images  # the same module-scoped fixture: four 24 px photographs


def make_cfg(images: pathlib.Path, out_dir: pathlib.Path, *overrides: str) -> Config:
    """test_hostile_train's tiny run: 2 steps, a per-pixel head, one checkpoint at the end."""
    return test_hostile_train.make_cfg(images, out_dir, "train.steps=2", "log_scale.granularity=pixel", *overrides)


def train(cfg: Config, tmp_path: pathlib.Path, *extra: str) -> int:
    return cli_main(["train", str(save_config(cfg, tmp_path / "cfg.yaml")), "--no-progress", *extra])


def stored_calibration(run: pathlib.Path):
    return inspect_checkpoint(run / "model.safetensors").config.likelihood.calibration


@pytest.fixture
def calibrated_run(images, tmp_path) -> pathlib.Path:
    run = tmp_path / "run"
    assert train(make_cfg(images, run), tmp_path) == 0
    fitted = Calibration("affine", "laplace", torch.full((3,), 1.2), torch.full((3,), 0.1))
    store_calibration(load_predictor(run, calibrated=False), fitted, run)
    assert stored_calibration(run) is not None
    return run


def test_a_resume_with_nothing_to_train_keeps_the_calibration(images, tmp_path, calibrated_run, caplog):
    before = stored_calibration(calibrated_run)
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        assert train(make_cfg(images, calibrated_run), tmp_path) == 0  # resumes at its last step
    assert stored_calibration(calibrated_run) == before
    assert "calibrat" not in caplog.text
    assert load_predictor(calibrated_run).calibration is not None


def test_a_resume_that_trains_drops_the_calibration_and_says_so(images, tmp_path, calibrated_run, caplog):
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        assert train(make_cfg(images, calibrated_run, "train.steps=4"), tmp_path, "--resume") == 0
    assert stored_calibration(calibrated_run) is None
    assert "post-hoc calibration" in caplog.text and "hetvae calibrate" in caplog.text and "step 4" in caplog.text


def _hand_written_config(folder: pathlib.Path) -> pathlib.Path:
    (folder / "config.yaml").write_text("# my experiment\nbase: ../configs/tiny.yaml\ntrain:\n  steps: 10\n")
    return folder / "config.yaml"


def _export(folder: pathlib.Path) -> pathlib.Path:
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False))
    return save_autoencoder(model, folder / "model.safetensors", format="hetvae")


def _diffusers_export(folder: pathlib.Path) -> pathlib.Path:
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False))
    save_autoencoder(model, folder, format="diffusers")
    return folder / "config.json"


@pytest.mark.parametrize("make", [_hand_written_config, _export, _diffusers_export], ids=["config", "export", "diffusers"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_fresh_run_never_replaces_or_shadows_a_users_files(images, tmp_path, capsys, make, overwrite):
    run = tmp_path / "out"
    run.mkdir()
    user_file = make(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code = train(make_cfg(images, run), tmp_path, *(["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and user_file.name in err and "did not write" in err and "--out)" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing added or changed
    assert not (run / "checkpoints").exists()


def test_a_run_that_stopped_before_its_first_checkpoint_starts_over(images, tmp_path):
    """Its config.yaml and metrics are a run's own: a fresh start may replace them."""
    run = tmp_path / "out"
    save_config(make_cfg(images, run), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert train(make_cfg(images, run), tmp_path) == 0
    assert (run / "model.safetensors").is_file()


def test_a_home_relative_out_dir_is_expanded(images, tmp_path, monkeypatch):
    """``out_dir: ~/runs/x`` trains into the home folder, not into a folder named ``~``."""
    from hetvae.train import Trainer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(make_cfg(images, pathlib.Path("~/runs/x")), progress=False)
    assert trainer.run_dir == tmp_path / "home" / "runs" / "x"
    assert not (tmp_path / "~").exists()


def test_metrics_lines_are_strict_json(tmp_path):
    """A non-finite loss is logged as null, not as the bare NaN JSON readers refuse."""
    import json
    import math

    from hetvae.runs import append_metrics

    append_metrics(tmp_path, {"step": 1, "loss": math.nan, "nll": math.inf})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"step": 1, "loss": None, "nll": None}


def _photos(folder: pathlib.Path, seed: int) -> pathlib.Path:
    folder.mkdir(parents=True)
    return write_noise_photos(folder, 4, 24, seed=seed)


def test_a_relative_data_path_means_the_same_photos_wherever_the_run_resumes(tmp_path, monkeypatch, capsys):
    from hetvae.config import load_config

    first, elsewhere = tmp_path / "a", tmp_path / "b"
    _photos(first / "photos", 1)
    _photos(elsewhere / "photos", 2)  # another folder of the same name
    run = tmp_path / "run"
    monkeypatch.chdir(first)
    assert train(make_cfg(pathlib.Path("photos"), run), tmp_path) == 0
    assert load_config(run / "config.yaml").data.path == str(first / "photos")  # stored absolute
    monkeypatch.chdir(elsewhere)
    # the same relative config from another folder names other photos: refused, naming the key
    capsys.readouterr()
    assert train(make_cfg(pathlib.Path("photos"), run, "train.steps=4"), tmp_path) == 1
    err = capsys.readouterr().err
    assert "data.path" in err and str(first / "photos") in err and str(elsewhere / "photos") in err
    # the run folder itself resumes on the photos it trained on
    assert cli_main(["train", str(run), "--resume", "--no-progress", "--set", "train.steps=4"]) == 0
    assert load_config(run / "config.yaml").data.path == str(first / "photos")


def _damage_calibration(run: pathlib.Path, record) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    file = run / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    config = json.loads(metadata["hetvae_config"])
    config["likelihood"]["calibration"] = record
    metadata["hetvae_config"] = json.dumps(config)
    save_file(tensors, str(file), metadata=metadata)


@pytest.mark.parametrize("record", [
    {"method": "bogus", "family": "laplace"},
    {"method": "affine", "family": "laplace", "slope": [1.0], "offset": [0.0, 0.0, 0.0]},
    {"method": "affine", "family": "gaussian", "slope": [1.0] * 3, "offset": [0.0] * 3},
], ids=["method", "shape", "family"])
def test_a_damaged_stored_calibration_can_be_removed(calibrated_run, capsys, record):
    _damage_calibration(calibrated_run, record)
    capsys.readouterr()
    assert cli_main(["eval", str(calibrated_run)]) == 1  # using it: a clear error
    err = capsys.readouterr().err
    assert "stored calibration cannot be used" in err and "--remove" in err and "--uncalibrated" in err
    assert cli_main(["eval", str(calibrated_run), "--uncalibrated"]) == 0
    assert cli_main(["calibrate", str(calibrated_run), "--remove"]) == 0
    assert stored_calibration(calibrated_run) is None
    assert cli_main(["eval", str(calibrated_run)]) == 0
