"""Training reads its images lazily (nothing decoded before the first step), yet a data set with
nothing usable still fails at start-up, before any step and outside any loader worker, naming the
images; the final phase's larger crops are checked then too, not thousands of steps later."""

from __future__ import annotations

import numpy as np
import pytest
import test_hostile_train
from PIL import Image

from hetvae.train import Trainer

images = test_hostile_train.images  # four 24 px photographs
make_cfg = test_hostile_train.make_cfg


def test_every_image_too_small_for_the_final_crops_fails_at_start(images, tmp_path):
    cfg = make_cfg(images, tmp_path / "run", "train.steps=4", "train.final_steps=2", "train.final_resolution=32")
    with pytest.raises(ValueError, match=r"every image .*smaller than 32x32") as info:
        Trainer(cfg, progress=False)
    assert str(next(images.iterdir()).parent) in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_folder_of_unreadable_files_fails_at_start(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        (folder / f"broken{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match=r"every image .*unreadable.*broken0\.png"), \
            pytest.warns(UserWarning, match="broken2.png"):
        Trainer(make_cfg(folder, tmp_path / "run"), progress=False)


def test_one_usable_image_is_enough_to_start(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_broken.png").write_bytes(b"not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "b_photo.png")
    with pytest.warns(UserWarning, match="a_broken.png"):
        trainer = Trainer(make_cfg(folder, tmp_path / "run", "data.num_workers=0"), progress=False)
    assert trainer.dataset.first_usable() == 1
