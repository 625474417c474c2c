"""The calibration photographs that ship with hetvae: present, readable, small, credited, packaged,
and what calibration uses when no images are given."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
import torch

from hetvae.images import CALIBRATION_PHOTOS, calibration_photos, load_images

ROOT = Path(__file__).resolve().parents[1]


def test_the_set_is_there_and_small():
    files = calibration_photos()
    assert len(files) >= 8
    assert all(f.suffix == ".jpg" for f in files)
    total = sum(f.stat().st_size for f in CALIBRATION_PHOTOS.iterdir())
    assert total <= 4_000_000, f"the shipped calibration set is {total / 1e6:.2f} MB: at most 4 MB in the wheel"


def test_every_photograph_reads_as_colour_in_range():
    images = load_images(calibration_photos())
    for name, x in images:
        assert x.shape[0] == 3 and min(x.shape[1:]) >= 256, name
        assert x.min() >= -1 and x.max() <= 1
        assert (x[0] - x[1]).abs().mean() > 0.01, f"{name} looks grey: the set is colour photographs"


def test_every_photograph_is_credited():
    credits = (CALIBRATION_PHOTOS / "CREDITS.md").read_text()
    for f in calibration_photos():
        assert f.stem in credits, f"{f.name} is not named in CREDITS.md"
    if any(f.stem.startswith("wiki") for f in calibration_photos()):
        assert "commons.wikimedia.org" in credits
    assert "calibration_photos/CREDITS.md" in (ROOT / "README.md").read_text()


def test_the_wheel_carries_the_set():
    """Every shipped file matches a package-data pattern (an editable install would not notice a miss)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["hetvae"]
    for f in CALIBRATION_PHOTOS.iterdir():
        relative = f.relative_to(ROOT / "hetvae").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in the wheel's package-data"


def test_a_missing_set_names_the_folder(monkeypatch, tmp_path):
    import hetvae.images as images

    monkeypatch.setattr(images, "CALIBRATION_PHOTOS", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        images.calibration_photos()


def test_calibrate_without_images_fits_on_the_shipped_set(monkeypatch):
    """calibrate(model) fits on exactly the shipped photographs (64 px crops of them here, to stay fast)."""
    import hetvae.predictor as predictor_module
    from hetvae import AutoencoderConfig, AutoencoderKL
    from hetvae.calibration import Calibration

    seen = []
    crops = [(n, x[:, :64, :64]) for n, x in load_images(calibration_photos()[:4])]

    def reading(paths=None):
        seen.append(paths)
        return crops

    monkeypatch.setattr(predictor_module, "load_images", reading)
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                            norm_num_groups=16, log_scale="pixel"))
    assert isinstance(predictor_module.calibrate(model), Calibration)
    assert seen == [calibration_photos()]
