"""Writing files so that nothing is lost: the one atomic writer, fsync helpers, and the error a
model or checkpoint file that cannot be read raises.

This module sits below every other one of the package: it imports nothing from hetvae.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CheckpointError", "atomic_write_text", "fsync_dir", "fsync_file", "hub_cache_entry", "write_atomically"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file,
    the detected format and the keys involved."""


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk (a rename is only durable once the data is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (makes a rename inside it durable); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


TEMPORARY = ".{name}.tmp-{pid}"
"""How :func:`write_atomically` names its temporary file: hidden, beside the target, with the
writing process's id (so a later write can tell a killed writer's leftover from a live one's)."""

# Signals whose default action ends the process without running ``except`` / ``finally`` blocks;
# SIGINT already raises KeyboardInterrupt.
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

# Where huggingface_hub keeps its cache: ``<repo type>s--<org>--<name>/{blobs,snapshots}/...``;
# a snapshot's files are links into ``blobs/``, shared by every snapshot that has the same content.
_HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")


class Terminated(BaseException):
    """A SIGTERM / SIGHUP received while a temporary file exists (it is removed, then the signal is
    delivered again with its default action)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """While inside: an ending signal (:data:`_ENDING_SIGNALS`) left at its default action raises
    :class:`Terminated` instead of ending the process at once, so ``except`` blocks run. A handler
    the program installed is left alone; only the main thread can install handlers."""
    installed = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in _ENDING_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    installed[signum] = signal.signal(signum, _raise_terminated)
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def hub_cache_entry(path: str | os.PathLike) -> Path | None:
    """The Hugging Face Hub cache folder (``models--org--name``) that ``path`` lies in, through a
    snapshot (``snapshots/<revision>/...``) or as a blob a link names (``blobs/...``); None when it
    lies in none. ``path`` and, when it is a link, the file it names are both checked."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    for candidate in (path, Path(os.path.realpath(path))):
        parts = candidate.parts
        for i in range(1, len(parts) - 1):
            if parts[i] in ("snapshots", "blobs") and _HUB_REPO.fullmatch(parts[i - 1]):
                return Path(*parts[:i])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # another user's process, or not a number a process can have: leave it
    return True


def remove_stale_temporaries(path: Path, *, exports: bool = False) -> None:
    """Remove what a killed writer of ``path`` left: entries named as :data:`TEMPORARY` names
    ``path``'s temporary (``.NAME.tmp-PID``), for a process that no longer runs. Nothing else is
    touched. The atomic writer removes files only, this process's leftovers too; ``exports``
    (a multi-file export, hetvae.convert): folders and files, this process's own left alone."""
    if os.name != "posix":
        return  # os.kill(pid, 0) only asks about a process on POSIX
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"([0-9]+)")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not (exports or entry.is_file(follow_symlinks=False)):
            continue
        pid = int(match.group(1))
        mine = pid == os.getpid()
        if pid <= 0 or (mine and exports) or (not mine and _alive(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


def _new_file_mode() -> int:
    """The mode a new file gets from the umask (what ``open(path, "w")`` creates)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, fsync it, and ``os.replace``
    it onto ``path``: whatever happens (a kill, a full disk), ``path`` holds either its old content
    or the whole new one. The one atomic writer of the package (checkpoints, exports, configs,
    outputs, metrics). Creates ``path``'s folder. Returns ``path``.

    Nothing but the content changes and nothing is left behind:

    * an error, Ctrl-C, SIGTERM or SIGHUP (left at its default action) removes the temporary, and
      the signal then ends the process as it would have; a temporary left by a writer of ``path``
      that was killed outright (SIGKILL, a power cut) is removed by the next write of ``path``;
    * a replaced file keeps its permission bits; a new one gets what the umask gives new files;
    * a symbolic link keeps pointing where it did, and the file it names gets the content;
    * nothing is written into a Hugging Face Hub cache (:func:`hub_cache_entry`): its files are
      links to blobs every snapshot shares; a ``ValueError`` says so.
    """
    path = Path(path)
    cache = hub_cache_entry(path)
    if cache is not None:
        raise ValueError(
            f"{path} is in the Hugging Face Hub cache {cache} (its files are links to blobs that every snapshot "
            "shares): hetvae does not write there; write to a folder of your own"
        )
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # the link stays; the file it names is replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    tmp = path.with_name(TEMPORARY.format(name=path.name, pid=os.getpid()))
    try:
        with signals_raise():
            write(tmp)
            os.chmod(tmp, mode)
            fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, Terminated) and signal.getsignal(error.signum) is signal.SIG_DFL:
            os.kill(os.getpid(), error.signum)  # end as the signal would have, now that nothing is left
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically (:func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
