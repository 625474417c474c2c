"""Issue 13, items 2 and 19: `hetvae uncertainty` / `eval` / `compare` on hostile inputs.

Outputs unique per input and never over a user's file, images streamed one at a time, tiling
(automatic above a size, `--tile` on every command, checked values), clear errors for outputs
that point at files or folders, and a quiet exit on a closed pipe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hetvae.images
import hetvae.predictor as P
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.convert import save_autoencoder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny SD-shaped model (factor 8, like SD) with a per-pixel head, as one hetvae file."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale="pixel")
    return save_autoencoder(AutoencoderKL(config).eval(), tmp_path_factory.mktemp("model") / "m.safetensors")


def _photo(path: Path, seed: int, size=(40, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _uncertainty(images, out, model_file, *extra) -> int:
    return main(["uncertainty", str(model_file), "--images", *map(str, images), "--out", str(out), *extra])


# --- item 2: outputs unique per input, never over an input or a user's file --------------------


def test_same_stem_in_different_folders_and_formats_gets_separate_outputs(model_file, tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(("a/x.png", "b/x.png", "x.png", "x.jpg")):
        _photo(root / name, i)
    out = tmp_path / "out"
    assert _uncertainty([root], out, model_file) == 0
    for name in ("a/x.png", "b/x.png", "x.png", "x.jpg"):
        for suffix in ("_panel.png", "_scale.png", "_maps.safetensors"):
            assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix}"
    assert len([p for p in out.rglob("*") if p.is_file()]) == 4 * 3


def test_out_equal_to_the_input_folder_never_overwrites_a_photo_and_skips_its_own_outputs(model_file, tmp_path, capsys):
    folder = tmp_path / "photos"
    _photo(folder / "cat.png", 0)
    user_photo = _photo(folder / "cat_scale.png", 1)  # the user's own photo, named like an old output
    before = user_photo.read_bytes()
    assert _uncertainty([folder], folder, model_file) == 0
    assert user_photo.read_bytes() == before
    files = sorted(p.name for p in folder.iterdir())
    assert _uncertainty([folder], folder, model_file) == 0  # a second run reads no output as an input
    assert sorted(p.name for p in folder.iterdir()) == files
    assert user_photo.read_bytes() == before
    assert "wrote 2 panel(s)" in capsys.readouterr().out


def test_a_foreign_file_where_an_output_goes_is_never_overwritten(model_file, tmp_path, capsys):
    _photo(tmp_path / "in" / "x.png", 0)
    out = tmp_path / "out"
    foreign = _photo(out / "x.png_panel.png", 5)  # not written by hetvae
    before = foreign.read_bytes()
    assert _uncertainty([tmp_path / "in"], out, model_file) == 1
    err = capsys.readouterr().err
    assert str(foreign) in err and "not written by hetvae" in err and "Traceback" not in err
    assert foreign.read_bytes() == before
    assert not (out / "x.png_scale.png").exists()  # checked before anything is written


def test_eval_skips_hetvae_outputs_in_its_image_folder(model_file, tmp_path):
    folder = tmp_path / "photos"
    _photo(folder / "a.png", 0)
    _photo(folder / "b.png", 1)
    assert _uncertainty([folder], folder, model_file) == 0
    out = tmp_path / "m.json"
    assert main(["eval", str(model_file), "--images", str(folder), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 2


# --- outputs that point at the wrong kind of thing ---------------------------------------------


@pytest.mark.parametrize("command", ["uncertainty", "compare"])
def test_out_naming_an_existing_file_is_a_clear_error(model_file, tmp_path, capsys, command):
    images = tmp_path / "in"
    _photo(images / "x.png", 0)
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    if command == "uncertainty":
        args = ["uncertainty", str(model_file), "--images", str(images), "--out", str(file)]
    else:
        args = ["compare", str(model_file), "--images", str(images), "--out", str(file)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--out" in err and str(file) in err and "folder" in err
    assert file.read_text() == "mine"


def test_out_naming_a_folder_or_a_foreign_file_is_a_clear_error(model_file, tmp_path, capsys):
    images = tmp_path / "in"
    _photo(images / "x.png", 0)
    base = ["eval", str(model_file), "--images", str(images), "--out"]
    assert main(base + [str(images)]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and str(images) in err and "folder" in err
    foreign = tmp_path / "settings.json"
    foreign.write_text('{"theme": "dark"}')
    assert main(base + [str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and str(foreign) in err and "not written by hetvae" in err
    assert foreign.read_text() == '{"theme": "dark"}'
    ours = tmp_path / "metrics.json"
    assert main(base + [str(ours)]) == 0 and main(base + [str(ours)]) == 0  # its own output is replaced
    assert json.loads(ours.read_text())["n_images"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_compare_refuses_to_overwrite_a_foreign_table(model_file, tmp_path, capsys):
    images = tmp_path / "in"
    _photo(images / "x.png", 0)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison.md").write_text("# my notes\n")
    assert main(["compare", str(model_file), "--images", str(images), "--out", str(out)]) == 1
    assert str(out / "comparison.md") in capsys.readouterr().err
    assert (out / "comparison.md").read_text() == "# my notes\n"
    (out / "comparison.md").unlink()
    assert main(["compare", str(model_file), "--images", str(images), "--out", str(out)]) == 0
    assert main(["compare", str(model_file), "--images", str(images), "--out", str(out)]) == 0  # rerun: replaced


# --- item 19: --tile everywhere, checked; automatic tiling; streaming; out of memory ------------


@pytest.mark.parametrize("value", ["-8", "abc"])
def test_tile_rejects_values_that_are_not_sizes(model_file, tmp_path, capsys, value):
    _photo(tmp_path / "x.png", 0)
    for args in (["uncertainty", str(model_file), "--images", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")],
                 ["eval", str(model_file), "--images", str(tmp_path)],
                 ["compare", str(model_file), "--images", str(tmp_path), "--out", str(tmp_path / "c")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--tile", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--tile" in err and "auto" in err and "multiple" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["uncertainty", "eval", "compare"])
def test_tile_not_a_multiple_of_the_factor_names_the_flag_and_the_factor(model_file, tmp_path, capsys, command):
    _photo(tmp_path / "in" / "x.png", 0)
    args = {
        "uncertainty": ["uncertainty", str(model_file), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o")],
        "eval": ["eval", str(model_file), "--images", str(tmp_path / "in")],
        "compare": ["compare", str(model_file), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o")],
    }[command]
    assert main([*args, "--tile", "100"]) == 1
    err = capsys.readouterr().err
    assert "--tile 100" in err and "multiple of 8" in err and "Traceback" not in err


def _count_tiles(monkeypatch) -> list[tuple[int, int]]:
    seen = []
    decode_tile = AutoencoderKL._decode_tile

    def spy(self, z):
        seen.append(tuple(z.shape[-2:]))
        return decode_tile(self, z)

    monkeypatch.setattr(AutoencoderKL, "_decode_tile", spy)
    return seen


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_eval_and_compare_take_tile(model_file, tmp_path, monkeypatch, command):
    _photo(tmp_path / "in" / "x.png", 0, size=(40, 56))
    seen = _count_tiles(monkeypatch)
    args = (["eval", str(model_file), "--images", str(tmp_path / "in")] if command == "eval" else
            ["compare", str(model_file), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert main([*args, "--tile", "16"]) == 0
    assert len(seen) > 1 and all(s == (2, 2) for s in seen)  # 16 px tiles = 2 latent pixels


def test_large_images_are_tiled_automatically_unless_tile_is_0(model_file, tmp_path, monkeypatch):
    _photo(tmp_path / "in" / "big.png", 0, size=(40, 56))
    _photo(tmp_path / "in" / "small.png", 1, size=(8, 8))
    monkeypatch.setattr(P, "AUTO_TILE_PIXELS", 20 * 20)
    monkeypatch.setattr(P, "AUTO_TILE_SIZE", 16)
    seen = _count_tiles(monkeypatch)
    args = ["eval", str(model_file), "--images", str(tmp_path / "in")]  # no panels: faster
    assert main(args) == 0
    assert sorted(set(seen)) == [(1, 1), (2, 2)]  # big: 16 px tiles; small: whole
    assert len(seen) > 2
    seen.clear()
    assert main([*args, "--tile", "0"]) == 0
    assert sorted(seen) == [(1, 1), (5, 7)]  # one whole decode per image


def test_images_are_decoded_one_at_a_time(model_file, tmp_path, monkeypatch):
    for i in range(3):
        _photo(tmp_path / "in" / f"{i}.png", i)
    events = []
    read_image = hetvae.images.read_image
    monkeypatch.setattr(hetvae.images, "read_image", lambda path: events.append("read") or read_image(path))
    images = hetvae.images.load_images(tmp_path / "in")
    assert len(images) == 3 and events == []  # listed, not decoded
    predict = P.Predictor.predict
    monkeypatch.setattr(P.Predictor, "predict", lambda self, image: events.append("predict") or predict(self, image))
    assert main(["eval", str(model_file), "--images", str(tmp_path / "in")]) == 0
    assert events == ["read", "predict"] * 3


def test_out_of_memory_is_a_clear_error_that_names_the_image_and_tile(model_file, tmp_path, monkeypatch, capsys):
    photo = _photo(tmp_path / "in" / "huge.png", 0)

    def forward(self, x, sample_posterior=False, generator=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 12884901888 bytes.")

    monkeypatch.setattr(AutoencoderKL, "forward", forward)
    assert _uncertainty([photo], tmp_path / "o", model_file) == 1
    err = capsys.readouterr().err
    assert str(photo) in err and "--tile" in err and "40x56" in err and "Traceback" not in err
    assert main(["eval", str(model_file), "--images", str(photo.parent)]) == 1
    err = capsys.readouterr().err
    assert str(photo) in err and "--tile" in err


def test_an_unreadable_image_met_while_streaming_is_still_named(model_file, tmp_path, capsys):
    _photo(tmp_path / "in" / "a.png", 0)
    broken = tmp_path / "in" / "b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["eval", str(model_file), "--images", str(tmp_path / "in")]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err


# --- a closed pipe --------------------------------------------------------------------------------


def test_a_closed_pipe_exits_quietly(model_file):
    """`hetvae info X | head`: the reader goes away; no traceback, no 'Exception ignored' note."""
    code = "import sys; from hetvae.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "info", str(model_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has printed anything (importing torch takes far longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
