"""Calibrating a model in place (hetvae.predictor.store_calibration, `hetvae calibrate` without --out)
changes only its likelihood record: the file that holds it (a diffusers folder's config.json, the
metadata of a hetvae or ldm file) gets the new record and every tensor, file name, file set and mode
stays as it was, for every layout and for --remove alike. A file reached through a symbolic link is
changed where it lies; a model in a Hugging Face Hub cache is refused (--out writes elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import test_hostile_train
import torch

from conftest import write_noise_photos
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import Calibration
from hetvae.cli import main
from hetvae.convert import CONFIG_KEY, DIFFUSERS_LIKELIHOOD_KEY, save_autoencoder
from hetvae.loss import HeteroscedasticNLL
from hetvae.predictor import load_predictor, store_calibration

CALIBRATION = Calibration("affine", "laplace", torch.full((3,), 1.25), torch.full((3,), -0.5))
MODE = 0o640  # not what any writer or umask would give a new file


def _model() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False))
    model.add_log_scale_head(init=-1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # values float16 cannot hold exactly
    return model.eval()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    from hetvae.train import train

    root = tmp_path_factory.mktemp("run")
    images = root / "images"
    images.mkdir()
    write_noise_photos(images, 4, 24, seed=1)
    train(test_hostile_train.make_cfg(images, root / "run", "train.steps=2", "log_scale.granularity=pixel"),
          progress=False)
    return root / "run"


def _layout(kind: str, root: Path, run_folder: Path) -> tuple[Path, Path]:
    """A model laid out as ``kind`` under ``root``: ``(the path to calibrate, the file holding its record)``."""
    half, record = _model().half(), HeteroscedasticNLL("pixel", channels=3, init=-1.0)
    if kind == "diffusers fp16 variant only":
        save_autoencoder(half, root, format="diffusers", variant="fp16")
        return root, root / "config.json"
    if kind == "diffusers fp16 weights":
        save_autoencoder(half, root, format="diffusers", likelihood=record)
        return root, root / "config.json"
    if kind == "diffusers .bin":
        save_autoencoder(_model(), root, format="diffusers", safe_serialization=False)
        return root, root / "config.json"
    if kind == "diffusers pipeline folder":
        save_autoencoder(half, root / "vae", format="diffusers", variant="fp16", likelihood=record)
        (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
        return root, root / "vae" / "config.json"
    if kind == "hetvae fp16 folder":
        save_autoencoder(half, root, format="hetvae", likelihood=record)
        return root, root / "model.safetensors"
    if kind == "hetvae fp16 file":
        file = save_autoencoder(half, root / "mine.safetensors", format="hetvae")
        return file, file
    if kind == "ldm fp16 file":
        file = save_autoencoder(half, root, format="ldm", likelihood=record)
        return file, file
    assert kind == "run folder"
    shutil.copytree(run_folder, root, dirs_exist_ok=True)
    return root, root / "model.safetensors"


LAYOUTS = ["diffusers fp16 variant only", "diffusers fp16 weights", "diffusers .bin", "diffusers pipeline folder",
           "hetvae fp16 folder", "hetvae fp16 file", "ldm fp16 file", "run folder"]


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (hidden ones too): its bytes and mode."""
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


def _safetensors(data: bytes) -> tuple[dict, dict, bytes]:
    """``(tensor entries: name -> dtype, shape, offsets; metadata; the tensors' bytes)`` of a safetensors file."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header, header.pop("__metadata__", {}), data[8 + n:]


def _record(name: str, data: bytes) -> tuple[dict, dict | None]:
    """``(everything but the likelihood record, the record)`` of a record file's content."""
    if name.endswith(".json"):
        config = json.loads(data)
        return config, config.pop(DIFFUSERS_LIKELIHOOD_KEY, None)
    header, metadata, tensors = _safetensors(data)
    config = json.loads(metadata.pop(CONFIG_KEY))
    return {"tensors": header, "bytes": tensors, "metadata": metadata, "config": config}, config.pop("likelihood", None)


def _check_only_the_record_changed(root: Path, record_file: Path, before: dict, calibration: dict | None) -> None:
    after = _files(root)
    assert sorted(after) == sorted(before)  # no file added (no float32 copy, no temporary), none removed
    assert {k: m for k, (_, m) in after.items()} == {k: m for k, (_, m) in before.items()}  # modes kept
    name = str(record_file.relative_to(root))
    for key in before:
        if key != name:
            assert after[key][0] == before[key][0], f"{key} was rewritten"
    rest_before, _ = _record(name, before[name][0])
    rest_after, record = _record(name, after[name][0])
    assert rest_after == rest_before  # every tensor byte, dtype and name, and every other key
    assert record is not None and record["calibration"] == calibration


@pytest.mark.parametrize("kind", LAYOUTS)
def test_calibrating_in_place_changes_only_the_likelihood_record(tmp_path, run_folder, kind):
    root = tmp_path / "model"
    root.mkdir()
    path, record_file = _layout(kind, root, run_folder)
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(MODE)
    before = _files(root)

    written = store_calibration(load_predictor(path, calibrated=False), CALIBRATION, path)
    _check_only_the_record_changed(root, record_file, before, CALIBRATION.to_dict())
    assert written == record_file
    stored = load_predictor(path).calibration
    torch.testing.assert_close(stored.slope, CALIBRATION.slope.double())

    store_calibration(load_predictor(path, calibrated=False), None, path)  # --remove
    _check_only_the_record_changed(root, record_file, before, None)
    assert load_predictor(path).calibration is None


def _photos(folder: Path) -> Path:
    folder.mkdir()
    return write_noise_photos(folder, 3, 64, seed=0, prefix="p")


def test_the_command_calibrates_a_variant_only_diffusers_folder_in_place(tmp_path, capsys):
    root = tmp_path / "vae"
    save_autoencoder(_model().half(), root, format="diffusers", variant="fp16")
    for p in root.iterdir():
        p.chmod(MODE)
    before = _files(root)
    assert main(["calibrate", str(root), "--images", str(_photos(tmp_path / "photos"))]) == 0
    fitted = load_predictor(root).calibration
    assert fitted is not None
    _check_only_the_record_changed(root, root / "config.json", before, fitted.to_dict())
    assert main(["calibrate", str(root), "--remove"]) == 0
    _check_only_the_record_changed(root, root / "config.json", before, None)


# --- links and the Hugging Face Hub cache ------------------------------------------------------


def _as_links(folder: Path, store: Path) -> None:
    """Move ``folder``'s files to ``store`` and leave relative links to them in their place."""
    store.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.iterdir()):
        p.rename(store / p.name)
        p.symlink_to(Path(os.path.relpath(store / p.name, folder)))


@pytest.mark.parametrize("kind", ["diffusers fp16 variant only", "hetvae fp16 folder"])
def test_a_linked_model_file_is_calibrated_where_it_lies_and_stays_linked(tmp_path, run_folder, kind):
    mine, store = tmp_path / "mine", tmp_path / "store"
    mine.mkdir()
    path, record_file = _layout(kind, mine, run_folder)
    _as_links(mine, store)
    links = {p.name: os.readlink(p) for p in mine.iterdir()}
    before = _files(store)
    store_calibration(load_predictor(path, calibrated=False), CALIBRATION, path)
    assert {p.name: os.readlink(p) for p in mine.iterdir()} == links  # still the same links
    _check_only_the_record_changed(store, store / record_file.name, before, CALIBRATION.to_dict())
    assert load_predictor(store).calibration is not None


def _hub_cache(tmp_path: Path, format: str = "diffusers") -> tuple[Path, Path]:
    """A VAE in a Hub cache laid out as huggingface_hub does: ``(snapshot folder, repo folder)``."""
    repo = tmp_path / "hub" / "models--org--vae"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    export = tmp_path / "download"  # hetvae writes nothing into a Hub cache: a download puts it there
    save_autoencoder(_model().half(), export, format=format, **({"variant": "fp16"} if format == "diffusers" else {}))
    export.rename(snapshot)
    blobs = repo / "blobs"
    blobs.mkdir()
    for p in sorted(snapshot.iterdir()):
        blob = blobs / f"{abs(hash(p.read_bytes())):064x}"
        p.rename(blob)
        p.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot, repo


@pytest.mark.parametrize("calibration", [CALIBRATION, None], ids=["calibrate", "remove"])
@pytest.mark.parametrize("where", ["diffusers snapshot", "hetvae file in a snapshot", "a link to the snapshot"])
def test_a_model_in_a_hub_cache_is_refused_in_place_and_out_writes_elsewhere(tmp_path, calibration, where):
    snapshot, repo = _hub_cache(tmp_path, "hetvae" if where == "hetvae file in a snapshot" else "diffusers")
    path = {"diffusers snapshot": snapshot, "hetvae file in a snapshot": snapshot / "model.safetensors",
            "a link to the snapshot": tmp_path / "vae"}[where]
    if where == "a link to the snapshot":
        path.symlink_to(snapshot, target_is_directory=True)
    before = _files(repo)
    predictor = load_predictor(path, calibrated=False)
    with pytest.raises(ValueError, match="Hugging Face Hub cache") as error:
        store_calibration(predictor, calibration, path)
    message = str(error.value)
    assert "\n" not in message and "--out" in message
    assert _files(repo) == before and all(p.is_symlink() for p in snapshot.iterdir())
    out = store_calibration(predictor, calibration, path, tmp_path / "out")
    assert out.parent == tmp_path / "out" and _files(repo) == before
    assert (load_predictor(tmp_path / "out").calibration is None) == (calibration is None)


def test_the_command_refuses_a_hub_cache_in_one_line_naming_out(tmp_path, capsys):
    snapshot, repo = _hub_cache(tmp_path)
    before = _files(repo)
    assert main(["calibrate", str(snapshot), "--remove"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "Hugging Face Hub cache" in err
    assert _files(repo) == before
