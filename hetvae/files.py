"""Writing files so that nothing is lost: the one atomic writer, fsync helpers, and the error a
model or checkpoint file that cannot be read raises.

This module sits below every other one of the package: it imports nothing from hetvae.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CheckpointError", "atomic_write_text", "fsync_dir", "fsync_file", "write_atomically"]


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


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, fsync it, and ``os.replace``
    it onto ``path``: whatever happens (a kill, a full disk), ``path`` holds either its old content
    or the whole new one, and no temporary file is left behind by an error. The one atomic writer
    of the package (checkpoints, exports, configs, outputs, metrics). Creates ``path``'s folder.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically (:func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
