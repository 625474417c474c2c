"""A multi-file export (a diffusers folder: config.json, weights, head file; an ldm folder with its
head file) is all or nothing: a full disk or Ctrl-C midway leaves the destination as it was, not
some of the files. A new destination is built in a hidden sibling folder and renamed into place; an
existing one gets each file staged beside it and renamed in only once all are written, so a failure
leaves the old model whole and removes every file the export wrote; files that are not part of the
export are never touched. ``hetvae convert`` without ``--overwrite`` refuses a destination holding a
model before it reads the source."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hetvae.convert
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.convert import load_autoencoder, save_autoencoder

TINY = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, mid_block_attention=False)
REAL_WRITE = hetvae.convert.write_atomically


def _model(seed: int, head: bool = True) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(TINY).eval()
    if head:
        model.add_log_scale_head(init=-1.0)
        with torch.no_grad():
            model.decoder.log_scale_head.weight.normal_(0, 0.5)
    return model


def _same(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every entry under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def _failing_at(n: int, error: BaseException):
    """The atomic writer, its ``n``-th file cut short by ``error`` after half a file is on disk."""
    calls = []

    def write(path, body):
        calls.append(Path(path))
        if len(calls) < n:
            return REAL_WRITE(path, body)

        def half(tmp):
            Path(tmp).write_bytes(b"half")
            raise error

        return REAL_WRITE(path, half)

    write.calls = calls
    return write


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FAILURES = {"disk full": DISK_FULL, "Ctrl-C": KeyboardInterrupt()}
# (format, DST relative to the test folder, the number of files the export writes)
EXPORTS = [("diffusers", "out", 3), ("ldm", "out", 2), ("ldm", "file.safetensors", 2)]


# --- a new destination ---------------------------------------------------------------------------


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
@pytest.mark.parametrize("fmt, dst, files", EXPORTS, ids=[f"{f}-{d}" for f, d, _ in EXPORTS])
def test_a_failed_export_to_a_new_destination_leaves_nothing(tmp_path, monkeypatch, failure, fmt, dst, files):
    root = tmp_path / "new" / "deeper"  # folders the export creates go too
    for n in range(1, files + 1):
        writer = _failing_at(n, FAILURES[failure])
        monkeypatch.setattr(hetvae.convert, "write_atomically", writer)
        with pytest.raises(type(FAILURES[failure])):
            save_autoencoder(_model(0), root / dst, format=fmt)
        assert len(writer.calls) == n
        assert not (tmp_path / "new").exists(), (n, _tree(tmp_path))


@pytest.mark.parametrize("fmt, dst, files", EXPORTS, ids=[f"{f}-{d}" for f, d, _ in EXPORTS])
def test_an_export_to_a_new_destination_is_whole_with_the_usual_modes(tmp_path, fmt, dst, files):
    written = save_autoencoder(_model(0), tmp_path / "a" / dst, format=fmt)
    folder = written if written.is_dir() else written.parent
    assert len([p for p in folder.iterdir()]) == files
    assert _same(load_autoencoder(written), _model(0))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in folder.iterdir())
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary left anywhere


# --- an existing destination -----------------------------------------------------------------------


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
@pytest.mark.parametrize("old_head", [False, True], ids=["old without head", "old with head"])
def test_a_failed_overwrite_leaves_the_old_model_and_the_other_files_as_they_were(tmp_path, monkeypatch, failure,
                                                                                    old_head):
    out = tmp_path / "out"
    save_autoencoder(_model(1, head=old_head), out, format="diffusers", variant="fp16")
    (out / "README.md").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "a.png").write_bytes(b"png")
    before = _tree(out)
    for n in range(1, 4):
        writer = _failing_at(n, FAILURES[failure])
        monkeypatch.setattr(hetvae.convert, "write_atomically", writer)
        with pytest.raises(type(FAILURES[failure])):
            save_autoencoder(_model(0), out, format="diffusers", overwrite=True)
        assert _tree(out) == before, n
    monkeypatch.setattr(hetvae.convert, "write_atomically", REAL_WRITE)
    assert _same(load_autoencoder(out), _model(1, head=old_head))
    save_autoencoder(_model(0), out, format="diffusers", overwrite=True)  # and then it goes through
    assert _same(load_autoencoder(out), _model(0))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "diffusion_pytorch_model.safetensors", "log_scale_head.safetensors", "samples"]


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
def test_a_failed_export_into_an_existing_folder_without_a_model_removes_what_it_wrote(tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for n in range(1, 4):
        monkeypatch.setattr(hetvae.convert, "write_atomically", _failing_at(n, FAILURES[failure]))
        with pytest.raises(type(FAILURES[failure])):
            save_autoencoder(_model(0), out, format="diffusers", overwrite=False)
        assert _tree(out) == {"notes.txt": b"mine"}, n


def test_an_overwrite_keeps_modes_and_links(tmp_path):
    out = tmp_path / "out"
    save_autoencoder(_model(1), out, format="diffusers")
    (out / "config.json").chmod(0o640)
    store = tmp_path / "store"
    store.mkdir()
    (out / "diffusion_pytorch_model.safetensors").rename(store / "weights.safetensors")
    (out / "diffusion_pytorch_model.safetensors").symlink_to(store / "weights.safetensors")
    save_autoencoder(_model(0), out, format="diffusers", overwrite=True)
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o640
    assert (out / "diffusion_pytorch_model.safetensors").is_symlink()
    assert _same(load_autoencoder(out), _model(0))
    assert [p.name for p in store.iterdir()] == ["weights.safetensors"]
    assert not [p for p in tmp_path.rglob(".*")]


def test_a_leftover_of_a_killed_export_is_removed_by_the_next_one(tmp_path):
    """SIGKILL or a power cut gives no chance to clean up: what it left (hidden, named for the
    export's process) goes with the next export to the same place, once that process is gone."""
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has this number
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / "config.json").write_text("{}")
    save_autoencoder(_model(0), out, format="diffusers")
    (out / f".config.json.tmp-{dead}").write_text("{}")
    (out / f".config.json.tmp-{os.getpid()}-not-mine").write_text("{}")  # not the pattern: kept
    save_autoencoder(_model(1), out, format="diffusers", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [f".config.json.tmp-{os.getpid()}-not-mine"]


_SLOW_EXPORT = """
    import sys, time
    from pathlib import Path
    import torch
    import hetvae.files
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
    from hetvae.convert import save_autoencoder

    calls = []

    def slow(path):  # the n-th written file is complete here, just before its rename
        calls.append(path)
        if len(calls) == int(sys.argv[2]):
            print("ready", flush=True)
            time.sleep(60)

    hetvae.files.fsync_file = slow
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False))
    model.add_log_scale_head()
    save_autoencoder(model, Path(sys.argv[1]), format="diffusers", overwrite=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "existing folder"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_signal_midway_leaves_the_destination_as_it_was_and_ends_the_process(tmp_path, signum, existing, n):
    out = tmp_path / "out"
    if existing:
        save_autoencoder(_model(1, head=False), out, format="diffusers")
        (out / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_EXPORT), str(out), str(n)],
                            cwd=Path(__file__).resolve().parents[1], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            # as in a terminal: a suite run under nohup would hand down SIGHUP ignored
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == -signum
    assert _tree(tmp_path) == before


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("failure, code", [("disk full", 1), ("Ctrl-C", 130)])
def test_convert_interrupted_midway_leaves_no_destination(tmp_path, monkeypatch, capsys, failure, code):
    src = tmp_path / "src"
    save_autoencoder(_model(0), src)
    monkeypatch.setattr(hetvae.convert, "write_atomically", _failing_at(3, FAILURES[failure]))
    assert main(["convert", str(src), "--to", "diffusers", "--out", str(tmp_path / "dst")]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("interrupted" if code == 130 else
                                           f"error: --out {tmp_path / 'dst'}: could not be written (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("fmt, dst", [("diffusers", "out"), ("hetvae", "out"), ("ldm", "out"), ("ldm", "v.safetensors"),
                                      ("hetvae", "m.safetensors")])
def test_convert_without_overwrite_refuses_an_existing_model_before_reading_the_source(tmp_path, monkeypatch, capsys,
                                                                                       fmt, dst):
    src = tmp_path / "src"
    save_autoencoder(_model(0), src)
    save_autoencoder(_model(1), tmp_path / dst, format=fmt)
    before = _tree(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(hetvae.convert, "load_autoencoder", never)
    assert main(["convert", str(src), "--to", fmt, "--out", str(tmp_path / dst)]) == 1
    err = capsys.readouterr().err
    assert "already holds a model" in err and "--overwrite" in err, err
    assert _tree(tmp_path) == before


def test_convert_checks_a_shadowing_model_before_reading_the_source(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    save_autoencoder(_model(0), src)
    monkeypatch.setattr(hetvae.convert, "load_autoencoder", lambda *a, **k: pytest.fail("the source was read"))
    assert main(["convert", str(src), "--to", "diffusers", "--overwrite", "--out", str(src)]) == 1
    assert "which load_autoencoder" in capsys.readouterr().err


def test_check_export_destination_is_what_save_autoencoder_checks(tmp_path):
    from hetvae.convert import check_export_destination

    save_autoencoder(_model(0, head=False), tmp_path / "out", format="diffusers")
    with pytest.raises(FileExistsError, match="already holds a model"):
        check_export_destination(tmp_path / "out", "diffusers", overwrite=False)
    check_export_destination(tmp_path / "out", "diffusers", overwrite=True)
    check_export_destination(tmp_path / "elsewhere", "diffusers", overwrite=False)
    (tmp_path / "ldm").mkdir()
    (tmp_path / "ldm" / "vae.log_scale_head.safetensors").write_bytes(b"old head")  # an earlier export's head
    with pytest.raises(FileExistsError, match="vae.log_scale_head.safetensors"):
        check_export_destination(tmp_path / "ldm", "ldm", overwrite=False)
    with pytest.raises(ValueError, match="format must be one of"):
        check_export_destination(tmp_path / "out", "onnx", overwrite=True)
