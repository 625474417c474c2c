"""A resume that changes what it may not is refused first, naming the key, before the changed setting
is used (a changed final phase or data section used to fail with a data error); and images smaller
than the sample panel's crops are not reported as skipped when training uses them."""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import test_hostile_train
from PIL import Image

from hetvae.cli import main as cli_main
from hetvae.config import save_config
from hetvae.schema import ConfigError
from hetvae.train import train

images = test_hostile_train.images  # the same module-scoped fixture: four 24 px photographs
make_cfg = test_hostile_train.make_cfg  # tiny 16 px runs of 4 steps


@pytest.fixture(scope="module")
def run(images, tmp_path_factory) -> pathlib.Path:
    """A finished 2-step run on the 24 px photographs."""
    folder = tmp_path_factory.mktemp("resume") / "run"
    train(make_cfg(images, folder, "train.steps=2"), progress=False)
    return folder


@pytest.mark.parametrize("overrides, keys", [
    # 32 px final crops of 24 px photographs: building that data set fails, so the refusal must come first
    (["train.steps=4", "train.final_steps=2", "train.final_resolution=32"], ["train.final_steps", "train.final_resolution"]),
    (["train.steps=4", "data.resolution=32"], ["data.resolution"]),
])
def test_a_refused_resume_names_the_key_before_using_it(images, run, tmp_path, capsys, overrides, keys):
    cfg = make_cfg(images, run, "train.steps=2", *overrides)
    with pytest.raises(ConfigError) as info:
        train(cfg, progress=False)
    for key in keys:
        assert key in str(info.value)
    assert "resuming the run" in str(info.value)
    # the command line as a user types it: the run folder, --resume, --set
    assert cli_main(["train", str(run), "--resume", "--no-progress", *(f"--set={o}" for o in overrides)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(key in err for key in keys), err
    assert "no usable image" not in err


def test_the_final_phase_key_alone_is_refused_by_name(images, tmp_path, capsys):
    """A run whose config already names final crops it cannot make (final_steps=0 leaves them unused)."""
    folder = tmp_path / "run"
    train(make_cfg(images, folder, "train.steps=2", "train.final_resolution=32"), progress=False)
    assert cli_main(["train", str(folder), "--resume", "--no-progress", "--set", "train.steps=4",
                     "--set", "train.final_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "train.final_steps: the run used 0, this config says 2" in err, err
    assert "no usable image" not in err


def test_images_smaller_than_the_panel_crop_are_not_reported_skipped(images, tmp_path, caplog):
    """The panel wants 128 px crops; 24 px photographs train at 16 px and show at 16 px in the panel.
    No message may say an image used for training is skipped (unless it says it is about the panel)."""
    with caplog.at_level(logging.INFO):
        train(make_cfg(images, tmp_path / "run", "train.steps=1", "train.sample_every=1"), progress=False)
    assert (tmp_path / "run" / "samples" / "latest.png").is_file()
    for record in caplog.records:
        text = record.getMessage()
        if "skip" in text and "smaller" in text:
            assert "sample panel" in text, text


def test_a_photograph_too_small_for_training_is_still_reported(images, tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in images.iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")
    # training reads its images lazily: a photograph is reported when first read, here in the
    # main process (no loader workers) within the two steps that read every image
    overrides = ("train.steps=2", "train.sample_every=1", "data.num_workers=0")
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="tiny.png"):
        train(make_cfg(folder, tmp_path / "run", *overrides), progress=False)
    skipped = [r.getMessage() for r in caplog.records if "tiny.png" in r.getMessage()]
    assert any("sample panel" not in text for text in skipped), skipped  # training's own report


def test_cli_config_file_resume_is_refused_the_same_way(images, run, tmp_path, capsys):
    cfg = make_cfg(images, run, "train.steps=4", "train.final_steps=2", "train.final_resolution=32")
    assert cli_main(["train", str(save_config(cfg, tmp_path / "cfg.yaml")), "--no-progress"]) == 1
    assert "train.final_steps" in capsys.readouterr().err
