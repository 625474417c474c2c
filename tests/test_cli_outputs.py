"""Where the command line writes, how it stops, and what it accepts once.

Outputs that cannot be written (a folder under a regular file, a read-only folder or file, a full
device) are refused before any model is loaded, with one `error:` line naming the path, and a write
that fails anyway ends the same way; Ctrl-C prints `interrupted` and exits 130 in every command;
a run's training checkpoint given to `info` / `convert` is named as what it is; a single-value
option given twice is refused; `attach_log_scale_head` refuses hetvae's own AutoencoderKL.

Tests run as root here, where a chmod'ed folder stays writable: read-only folders and immutable
files are stood in for by `os.access` answering as the kernel would for them (and a chmod case
runs only for another user).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hetvae
import hetvae.convert
import hetvae.files
import hetvae.outputs
import hetvae.predictor
import hetvae.viz
from hetvae import cli
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.checkpoint import STATE_FILE, WEIGHTS_FILE
from hetvae.cli import build_parser, main
from hetvae.config import Config
from hetvae.convert import save_autoencoder
from hetvae.schema import apply_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny model with a per-pixel head, as one hetvae file."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                               log_scale="pixel")
    return save_autoencoder(AutoencoderKL(config).eval(), tmp_path_factory.mktemp("model") / "m.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three 64 px photographs: enough pixels (12,288 a channel) for a calibration fit."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    """A 2-step 16 px run with its training checkpoint ``checkpoints/step_00000002``."""
    from hetvae.train import train

    folder = tmp_path_factory.mktemp("run") / "run"
    cfg = apply_overrides(Config(), [
        "model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.layers_per_block=1",
        "model.mid_block_attention=false", f"data.path={photos}", "data.resolution=16", "data.samples_per_epoch=8",
        "train.steps=2", "train.batch_size=4", "train.log_every=1", "train.sample_every=0",
        "train.checkpoint_every=2", "train.keep_checkpoints=0", f"out_dir={folder}",
    ])
    train(cfg, progress=False)
    assert (folder / "checkpoints" / "step_00000002" / WEIGHTS_FILE).is_file()
    return folder


def _no_loading(monkeypatch):
    """Fail the test if a command reads a model: its outputs must be checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(hetvae.predictor, "load_predictor", refuse)
    monkeypatch.setattr(hetvae.convert, "load_autoencoder", refuse)


def _one_error_line(err: str, *parts: str) -> str:
    """The only line of ``err`` (progress bars and the device line aside), an `error:` line holding each
    of ``parts``."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line
             and "s/img" not in line and "?img" not in line and not line.startswith("device: ")]
    assert "Traceback" not in err and "Errno" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


def _commands(model_file, photos, out) -> dict[str, list[str]]:
    """Each command that writes, with ``out`` where it writes."""
    m, images = str(model_file), str(photos)
    return {
        "calibrate --out": ["calibrate", m, "--images", images, "--out", str(out)],
        "convert hetvae": ["convert", m, "--to", "hetvae", "--out", str(out)],
        "convert diffusers": ["convert", m, "--to", "diffusers", "--out", str(out)],
        "convert ldm file": ["convert", m, "--to", "ldm", "--out", str(out) + ".safetensors"],
        "uncertainty": ["uncertainty", m, "--images", images, "--out", str(out)],
        "eval --out": ["eval", m, "--images", images, "--out", str(out) + ".json"],
        "compare": ["compare", m, "--images", images, "--out", str(out)],
    }


WRITERS = list(_commands("m", "p", "o"))


# --- item 12: outputs that cannot be written are refused before the work -----------------------


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_under_a_regular_file_is_refused_before_loading(model_file, photos, tmp_path, capsys, monkeypatch,
                                                                  command):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    argv = _commands(model_file, photos, blocker / "out")[command]
    _no_loading(monkeypatch)
    assert main(argv) == 1
    _one_error_line(capsys.readouterr().err, blocker)
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(path)``: from now on ``os.access`` answers for ``path`` (a folder: and whatever
    is under it) as for a read-only folder or an immutable file: no write."""
    marked: list[Path] = []
    real = os.access

    def access(path, mode, *args, **kwargs):
        p = Path(os.path.abspath(path))
        if mode & os.W_OK and any(p == m or m in p.parents for m in marked):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda path: marked.append(Path(os.path.abspath(path)))


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("where", ["existing", "to create"])
def test_an_output_in_a_read_only_folder_is_refused_before_loading(model_file, photos, tmp_path, capsys, monkeypatch,
                                                                   read_only, command, where):
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "out" if where == "to create" else folder
    if where == "existing" and command.startswith(("eval", "convert ldm")):
        out = folder / "out"  # a file name: the folder it goes into exists
    read_only(folder)
    _no_loading(monkeypatch)
    assert main(_commands(model_file, photos, out)[command]) == 1
    _one_error_line(capsys.readouterr().err, folder, "writ")
    assert list(folder.iterdir()) == []


@pytest.fixture
def model_copy(model_file, tmp_path):
    copy = tmp_path / "models" / "m.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(model_file.read_bytes())
    return copy


@pytest.mark.parametrize("remove", [False, True], ids=["fit", "remove"])
@pytest.mark.parametrize("what", ["run folder", "model file's folder", "immutable model file"])
def test_calibrate_in_place_where_it_cannot_write_is_refused_before_loading(run, model_copy, photos, capsys,
                                                                             monkeypatch, read_only, what, remove):
    target = run if what == "run folder" else model_copy
    if what == "immutable model file":
        read_only(model_copy)
        named = model_copy
    else:
        read_only(target if target.is_dir() else target.parent)
        named = run if target.is_dir() else model_copy.parent
    before = {p: p.read_bytes() for p in ([run / "model.safetensors"] if target.is_dir() else [model_copy])}
    _no_loading(monkeypatch)
    argv = ["calibrate", str(target), "--images", str(photos), *(["--remove"] if remove else [])]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, named)
    assert "--out" in line  # where a calibrated copy can go instead
    assert all(p.read_bytes() == b for p, b in before.items())


def test_calibrate_out_that_holds_a_model_is_refused_before_the_fit_without_naming_a_missing_flag(
        model_file, photos, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    assert main(["convert", str(model_file), "--to", "hetvae", "--out", str(taken)]) == 0
    capsys.readouterr()
    _no_loading(monkeypatch)
    for out in (taken, taken / "model.safetensors"):
        assert main(["calibrate", str(model_file), "--images", str(photos), "--out", str(out)]) == 1
        line = _one_error_line(capsys.readouterr().err, out, "model.safetensors")
        assert "--overwrite" not in line  # calibrate has no such flag


@pytest.mark.parametrize("remove", [False, True], ids=["fit", "remove"])
def test_calibrate_in_place_in_a_hub_cache_is_refused_before_loading(model_file, photos, tmp_path, capsys, monkeypatch,
                                                                      remove):
    """The Hub cache's links into blobs/ are not rewritten (hetvae.files): refused before the fit, not after it."""
    repo = tmp_path / "hub" / "models--org--vae"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    blob = repo / "blobs" / ("1" * 64)
    blob.write_bytes(model_file.read_bytes())
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    _no_loading(monkeypatch)
    argv = ["calibrate", str(snapshot), "--images", str(photos), *(["--remove"] if remove else [])]
    assert main(argv) == 1
    _one_error_line(capsys.readouterr().err, snapshot, "Hugging Face Hub cache", "--out")
    assert blob.read_bytes() == model_file.read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="a chmod'ed folder stays writable for root")
def test_a_chmod_read_only_folder_is_refused(model_file, photos, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _no_loading(monkeypatch)
        assert main(_commands(model_file, photos, folder / "out")["uncertainty"]) == 1
        _one_error_line(capsys.readouterr().err, folder)
    finally:
        folder.chmod(0o755)


# --- item 12: a write that fails anyway is one error line naming the path ------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/somewhere/.m.safetensors.tmp-1")


@pytest.mark.parametrize("command", ["eval --out", "compare", "uncertainty", "convert hetvae", "calibrate --out",
                                     "calibrate --remove in place"])
def test_a_write_that_fails_is_one_error_line_naming_the_output(model_copy, photos, tmp_path, capsys, monkeypatch,
                                                                command):
    out = tmp_path / "out"
    commands = _commands(model_copy, photos, out)
    commands["calibrate --remove in place"] = ["calibrate", str(model_copy), "--remove"]
    before = model_copy.read_bytes()
    monkeypatch.setattr(hetvae.outputs, "atomic_write_text", _disk_full)  # eval, compare
    monkeypatch.setattr(hetvae.viz, "save_uncertainty_panel", _disk_full)
    monkeypatch.setattr(hetvae.convert, "write_atomically", _denied)  # convert, calibrate
    monkeypatch.setattr(hetvae.predictor, "fit_calibration", lambda *a, **k: _FakeCalibration())
    code = main(commands[command])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    named = model_copy if command.endswith("in place") else out
    line = _one_error_line(captured.err, named)
    assert "No space left on device" in line or "Permission denied" in line
    assert ".tmp-" not in line  # the output, not the writer's temporary
    if command == "eval --out":
        assert "psnr" in captured.out  # the metrics are printed before the file is written
    assert model_copy.read_bytes() == before


class _FakeCalibration:
    """What calibrate stores, without a fit (the write is what is tested)."""

    def to_dict(self):
        return None

    def describe(self):
        return "fake"


def test_stdout_on_a_full_device_is_one_error_line(model_file):
    code = "import sys; from hetvae.cli import main; sys.exit(main(sys.argv[1:]))"
    for args in (["info", str(model_file)], ["--help"], ["info", str(model_file), "--json"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-c", code, *args], stdout=full, stderr=subprocess.PIPE,
                                  timeout=300, cwd=ROOT, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1, (args, err)
        line = _one_error_line(err, "standard output", "No space left on device")
        assert "Exception ignored" not in err, line


# --- item 16: Ctrl-C ---------------------------------------------------------------------------


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _main_interrupted(argv) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")


def _assert_interrupted(err: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1] == "interrupted", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))
def test_ctrl_c_in_any_command_prints_one_line_and_exits_130(monkeypatch, capsys, command):
    help_text, add, _ = cli._COMMANDS[command]
    monkeypatch.setitem(cli._COMMANDS, command, (help_text, add, _interrupt))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    # the least the command accepts: its positionals and its required options (some checked after parsing)
    argv = [command]
    for action in sub._actions:
        if not action.option_strings and action.dest != "help":
            argv.append("x")
        elif action.required or action.option_strings[0] in cli._REQUIRED_AFTER.get(command, ()):
            argv += [action.option_strings[0], (action.choices and next(iter(action.choices))) or "x"]
    assert _main_interrupted(argv) == 130
    captured = capsys.readouterr()
    _assert_interrupted(captured.err)


@pytest.mark.parametrize("command", ["convert", "calibrate", "uncertainty"])
def test_ctrl_c_mid_write_leaves_no_partial_file(model_copy, photos, tmp_path, capsys, monkeypatch, command):
    out = tmp_path / "out"
    argv = {
        "convert": ["convert", str(model_copy), "--to", "diffusers", "--out", str(out)],
        "calibrate": ["calibrate", str(model_copy), "--remove"],
        "uncertainty": ["uncertainty", str(model_copy), "--images", str(photos), "--out", str(out)],
    }[command]
    real = hetvae.files.write_atomically
    calls = []

    def interrupted_write(path, write):  # the atomic writer, its nth file cut short by Ctrl-C
        calls.append(path)
        if len(calls) < {"convert": 2, "calibrate": 1, "uncertainty": 2}[command]:
            return real(path, write)

        def half(tmp):
            Path(tmp).write_bytes(b"half")
            raise KeyboardInterrupt

        return real(path, half)

    for module in (hetvae.convert, hetvae.outputs, hetvae.viz):
        monkeypatch.setattr(module, "write_atomically", interrupted_write)
    before = model_copy.read_bytes()
    assert _main_interrupted(argv) == 130
    _assert_interrupted(capsys.readouterr().err)
    assert model_copy.read_bytes() == before
    left = [p for folder in (out, model_copy.parent) if folder.exists() for p in folder.rglob("*")]
    assert not [p for p in left if ".tmp-" in p.name], left


def test_a_real_sigint_prints_interrupted_in_a_subprocess(tmp_path):
    code = ("import os, signal, sys\n"
            "import hetvae.cli as cli\n"
            "text, add, _ = cli._COMMANDS['info']\n"
            "cli._COMMANDS['info'] = (text, add, lambda args: os.kill(os.getpid(), signal.SIGINT))\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    # SIGINT at its default in the child, as in a terminal: a job started in the background by a
    # non-interactive shell inherits it ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.run([sys.executable, "-c", code, "info", str(tmp_path)], capture_output=True, timeout=300,
                          cwd=ROOT, check=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 128 + signal.SIGINT
    assert proc.stderr.decode() == "interrupted\n"


# --- item 16: info / convert on a training checkpoint ---------------------------------------------


@pytest.mark.parametrize("command", ["info", "convert"])
@pytest.mark.parametrize("part", ["step folder", WEIGHTS_FILE, STATE_FILE, "checkpoints folder"])
def test_info_and_convert_name_a_training_checkpoint_and_say_what_to_do(run, tmp_path, capsys, command, part):
    step = run / "checkpoints" / "step_00000002"
    path = {"step folder": step, WEIGHTS_FILE: step / WEIGHTS_FILE, STATE_FILE: step / STATE_FILE,
            "checkpoints folder": run / "checkpoints"}[part]
    argv = ["info", str(path)] if command == "info" else ["convert", str(path), "--to", "hetvae", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, path)
    assert "training checkpoint" in line and "keys" not in line
    assert f"calibrate {path if part == 'step folder' else step} --out" in line  # how to write it as a model file
    assert str(run / "model.safetensors") in line  # the run's own export
    assert not (tmp_path / "o").exists()


def test_the_export_a_training_checkpoint_message_gives_works(run, tmp_path, capsys):
    step = run / "checkpoints" / "step_00000002"
    assert main(["calibrate", str(step), "--remove", "--out", str(tmp_path / "step2")]) == 0
    assert main(["info", str(tmp_path / "step2")]) == 0
    assert "format:      hetvae" in capsys.readouterr().out


# --- item 16: attach_log_scale_head on hetvae's own model -----------------------------------------


@pytest.mark.parametrize("head", ["sees the mean", "plain head", "no head"])
def test_attach_refuses_hetvae_own_autoencoder_saying_what_it_takes(model_file, tmp_path, head):
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    model = AutoencoderKL(config).eval()
    export = model_file
    if head != "no head":
        model.add_log_scale_head(sees_mean=head == "sees the mean")
        export = save_autoencoder(model, tmp_path / "own.safetensors")
    with pytest.raises(ValueError) as info:
        hetvae.attach_log_scale_head(model, export).decode(torch.zeros(1, 4, 4, 4))
    message = str(info.value)
    assert "diffusers.AutoencoderKL" in message and "hetvae" in message and "decode(z).log_scale" in message


# --- repeated single-value options ---------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _single_value_options() -> list[tuple[str, str, str]]:
    """``(command, option, a valid value)`` for every option of every command that takes one value."""
    found = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if not action.option_strings or action.nargs is not None or action.const is not None:
                continue  # positionals, flags, help, --images (nargs='+')
            if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
                continue  # --set: repeatable by design
            value = next(iter(action.choices)) if action.choices else {float: "1.5", int: "1"}.get(action.type, "64")
            found.append((name, action.option_strings[-1], str(value)))
    return found


SINGLE = _single_value_options()


def test_the_option_list_covers_the_known_single_value_options():
    options = {(c, o) for c, o, _ in SINGLE}
    for expected in [("eval", "--out"), ("eval", "--device"), ("calibrate", "--out"), ("uncertainty", "--out"),
                     ("compare", "--out"), ("train", "--out"), ("convert", "--to"), ("convert", "--out"),
                     ("shards", "--out"), ("eval", "--tile"), ("calibrate", "--method")]:
        assert expected in options
    assert len(SINGLE) >= 18


@pytest.mark.parametrize("command, option, value", SINGLE, ids=[f"{c} {o}" for c, o, _ in SINGLE])
def test_a_single_value_option_given_twice_is_refused(capsys, command, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main([command, option, value, option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "given twice" in err and "Traceback" not in err, err


def test_repeatable_options_and_single_options_once_still_parse():
    parser = build_parser()
    for _ in range(2):  # the same parser, twice: a value given once in each parse is not "twice"
        args = parser.parse_args(["eval", "a", "--images", "x", "y", "--images", "z", "--out", "j"])
        assert args.model == "a" and args.images == ["x", "y", "z"] and args.out == "j"
    args = parser.parse_args(["train", "c.yaml", "--set", "a=1", "--set", "b=2", "--overwrite", "--overwrite"])
    assert args.overrides == ["a=1", "b=2"] and args.overwrite


# --- the uncertainty progress bar ---------------------------------------------------------------


def test_uncertainty_closes_its_progress_bar_before_an_error(model_file, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hetvae.viz, "save_scale_map", _disk_full)
    assert main(["uncertainty", str(model_file), "--images", str(photos), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "uncertainty" in err, err  # the bar came first, then the error
