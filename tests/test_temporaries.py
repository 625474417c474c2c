"""The atomic writer (hetvae.files.write_atomically) leaves nothing behind and changes nothing but the
content: a SIGTERM or SIGHUP mid-write removes its temporary (as an exception does), a temporary a
killed writer left is removed by the next write of the same target (and nothing else is), a replaced
file keeps its mode, a symbolic link keeps pointing at the file it names, which gets the new content,
and nothing is written into a Hugging Face Hub cache."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hetvae.files import write_atomically

ROOT = Path(__file__).resolve().parents[1]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _start(code: str, *args: str) -> subprocess.Popen:
    """A Python process running ``code`` that prints ``ready`` once it is inside the write."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # as in a terminal: a suite run under nohup would hand down SIGHUP ignored
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the writer did not start: {line!r} {proc.stderr.read()}")
    return proc


_SLOW_WRITER = """
    import sys, time
    from pathlib import Path
    from hetvae.files import write_atomically

    def write(tmp):
        tmp.write_bytes(b"new" * 100_000)  # half a model on disk, then a long wait
        print("ready", flush=True)
        time.sleep(60)

    write_atomically(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_write_removes_the_temporary_and_still_ends_the_process(tmp_path, signum):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    proc = _start(_SLOW_WRITER, str(target))
    assert _temporaries(tmp_path)  # the write is under way
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == -signum  # ended by the signal, as before
    assert _temporaries(tmp_path) == []
    assert target.read_bytes() == b"old"


def test_a_signal_handler_of_the_program_is_left_alone(tmp_path):
    """A program that handles SIGTERM itself (the trainer does) keeps its handler: the write completes."""
    target = tmp_path / "model.safetensors"
    code = """
        import signal, sys, time
        from pathlib import Path
        from hetvae.files import write_atomically

        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))

        def write(tmp):
            tmp.write_bytes(b"new")
            print("ready", flush=True)
            deadline = time.monotonic() + 60
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)

        write_atomically(Path(sys.argv[1]), write)
        print("handled", seen == [signal.SIGTERM], flush=True)
    """
    proc = _start(code, str(target))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "handled True"
    assert target.read_bytes() == b"new" and _temporaries(tmp_path) == []


_SLOW_FSYNC = """
    import sys, time
    import hetvae.files

    def slow(path):  # every written temporary is complete here, just before its rename
        print("ready", flush=True)
        time.sleep(60)

    hetvae.files.fsync_file = slow
    from hetvae.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _export(tmp_path: Path) -> Path:
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
    from hetvae.convert import save_autoencoder

    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False))
    return save_autoencoder(model, tmp_path / "model", format="hetvae")


@pytest.mark.parametrize("command", ["convert", "calibrate"])
def test_sigterm_during_convert_or_an_in_place_calibrate_leaves_no_temporary(tmp_path, command):
    source = _export(tmp_path)
    before = source.read_bytes()
    if command == "convert":
        dst = tmp_path / "diffusers"
        args = ["convert", str(source), "--to", "diffusers", "--out", str(dst)]
    else:
        dst = source.parent
        args = ["calibrate", str(source), "--remove"]
    proc = _start(_SLOW_FSYNC, *args)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    if command == "convert":  # a new destination is built aside and renamed into place: none of it is left
        assert not dst.exists() and _temporaries(dst.parent) == []
    assert command == "convert" or _temporaries(dst) == []
    assert _temporaries(source.parent) == []
    assert source.read_bytes() == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporary_is_removed_by_the_next_write_of_that_target(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    proc = _start(_SLOW_WRITER, str(target))
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait(timeout=60)
    assert _temporaries(tmp_path) == [f".model.safetensors.tmp-{proc.pid}"]
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new"))
    assert _temporaries(tmp_path) == [] and target.read_bytes() == b"new"


def test_only_the_writers_own_stale_temporaries_of_that_exact_target_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".model.safetensors.tmp-{dead}", f".model.safetensors.tmp-{os.getpid()}"]
    kept = [
        f".model.safetensors.tmp-{alive}",  # a writer that is still running
        ".model.safetensors.tmp-abc",  # not a process number
        f"model.safetensors.tmp-{dead}",  # not hidden: not the writer's name
        f".model.safetensors.tmp-{dead}.bak",
        f".other.safetensors.tmp-{dead}",  # another target's
        f".model.safetensors.tmp-{dead}.tmp-{dead}",  # the temporary of a target named '.model...tmp-N'
        f".xmodel.safetensors.tmp-{dead}",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".model.safetensors.tmp-{dead + 1}").mkdir()  # a folder is never the writer's
    write_atomically(tmp_path / "model.safetensors", lambda tmp: tmp.write_bytes(b"new"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*kept, f".model.safetensors.tmp-{dead + 1}", "model.safetensors"])


# --- what replacing keeps ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o644, 0o664], ids=oct)
@pytest.mark.parametrize("writer", ["text", "safetensors"])
def test_replacing_a_file_keeps_its_mode(tmp_path, mode, writer):
    from safetensors.torch import save_file

    write = {"text": lambda tmp: tmp.write_text("new"),
             "safetensors": lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp))}[writer]
    target = tmp_path / "file"
    target.write_text("old")
    target.chmod(mode)
    write_atomically(target, write)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    fresh = write_atomically(tmp_path / "fresh", write)  # a new file: what the umask gives any new file
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_a_symbolic_link_keeps_pointing_at_the_file_it_names_which_gets_the_content(tmp_path):
    real = tmp_path / "store" / "model.safetensors"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "mine" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "store" / "model.safetensors")
    write_atomically(link, lambda tmp: tmp.write_text("new"))
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "store" / "model.safetensors")
    assert real.read_text() == "new" and stat.S_IMODE(real.stat().st_mode) == 0o640
    assert _temporaries(link.parent) == [] and _temporaries(real.parent) == []


def _hub_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """A Hub cache entry as huggingface_hub lays it out: ``(snapshot folder, blob)``."""
    repo = tmp_path / "hub" / "models--org--vae"
    blob = repo / "blobs" / ("a" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_text("{}")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot, blob


@pytest.mark.parametrize("where", ["the link", "a new file", "a link to a blob"])
def test_nothing_is_written_into_a_hub_cache(tmp_path, where):
    snapshot, blob = _hub_snapshot(tmp_path)
    target = {"the link": snapshot / "config.json", "a new file": snapshot / "model.safetensors",
              "a link to a blob": tmp_path / "mine" / "config.json"}[where]
    if where == "a link to a blob":
        target.parent.mkdir()
        target.symlink_to(blob)
    with pytest.raises(ValueError, match="Hugging Face Hub cache") as error:
        write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert "\n" not in str(error.value)
    assert blob.read_text() == "{}" and (snapshot / "config.json").is_symlink()
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]
    assert _temporaries(blob.parent) == []
