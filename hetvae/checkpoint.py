"""Training checkpoints: atomic folders of safetensors weights plus a plain-data state file.

A checkpoint is a folder ``<root>/step_XXXXXXXX/`` holding

* ``weights.safetensors``: every tensor that defines the models, names prefixed by their owner
  (``autoencoder.``, ``ema.``, ``loss.``, ``discriminator.``), and string metadata (the run
  config, so the folder is loadable with no other file);
* ``state.pt``: optimiser, grad-scaler and RNG states and counters: only tensors, numbers,
  strings, lists, tuples and dicts, so ``torch.load(weights_only=True)`` reads it and no pickled
  object is ever executed.

Atomicity: both files are written into ``<root>/.tmp-step_XXXXXXXX-<pid>/``, flushed and fsynced,
then the folder is renamed to its final name (one ``rename``, atomic on POSIX) and the parent is
fsynced. A crash or ``kill -9`` at any moment leaves either no new folder or a complete one, and
the previous checkpoints untouched; leftover ``.tmp-*`` folders are ignored and cleaned up by the
next save.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "WEIGHTS_FILE",
    "STATE_FILE",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "fsync_file",
    "fsync_dir",
]

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors`` (name -> CPU tensor), ``metadata`` (str -> str) and
    ``state`` (the plain-data dict given to :func:`save_checkpoint`)."""

    path: Path
    step: int
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    state: dict[str, Any]


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


def _folder_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and return its folder.

    ``tensors`` are copied to contiguous CPU tensors (they must not share storage); ``state`` must
    hold plain data only (checked by reading it back with ``weights_only=True`` before the rename).
    If the folder of ``step`` already exists it is kept as is (same step, same content).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _folder_name(step)
    if final.is_dir():
        return final
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{_folder_name(step)}-{os.getpid()}"
    tmp.mkdir()
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / WEIGHTS_FILE), metadata=metadata)
        fsync_file(tmp / WEIGHTS_FILE)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # fail here, not at resume time, if something unpicklable-without-code slipped in
        torch.load(tmp / STATE_FILE, map_location="cpu", weights_only=True)
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``[(step, folder), ...]``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / WEIGHTS_FILE).is_file() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep == 0`` keeps all); returns the deleted."""
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint folder.
    """
    path = Path(path)
    weights, state_file = path / WEIGHTS_FILE, path / STATE_FILE
    if not (weights.is_file() and state_file.is_file()):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (needs {WEIGHTS_FILE} and {STATE_FILE})")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    match = _NAME.match(path.name)
    step = int(state.get("step", match.group(1) if match else -1))
    return Checkpoint(path=path, step=step, tensors=tensors, metadata=metadata, state=state)
