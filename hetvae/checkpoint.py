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
next save. A failed save (a full disk) removes its temporary folder and raises
:class:`~hetvae.files.CheckpointError` naming the folder, the cause and the newest checkpoint, which
is intact.

A folder that cannot be read back (torn by a failing disk, edited by hand) makes :func:`load_checkpoint`
raise ``CheckpointError``; :func:`set_aside` renames it ``corrupt-step_XXXXXXXX`` so that it is kept
for inspection but neither resumed from nor mistaken for a saved step.
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

from hetvae.files import CheckpointError, fsync_dir, fsync_file
from hetvae.pickles import load_weights_only

__all__ = [
    "CORRUPT_GLOB",
    "STATE_FILE",
    "STEP_GLOB",
    "TMP_GLOB",
    "WEIGHTS_FILE",
    "Checkpoint",
    "folder_name",
    "is_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_weights",
    "save_checkpoint",
    "set_aside",
    "tensors_under",
]

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_CORRUPT_PREFIX = "corrupt-"
STEP_GLOB = "step_*"  # the checkpoints under a root (and anything else named like one)
TMP_GLOB = _TMP_PREFIX + "*"  # saves a crash left unfinished
CORRUPT_GLOB = _CORRUPT_PREFIX + STEP_GLOB  # folders set aside by set_aside


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors`` (name -> CPU tensor), ``metadata`` (str -> str) and
    ``state`` (the plain-data dict given to :func:`save_checkpoint`)."""

    path: Path
    step: int
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    state: dict[str, Any]


def folder_name(step: int) -> str:
    """The name of step ``step``'s checkpoint folder: ``step_XXXXXXXX``."""
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

    Raises:
        CheckpointError: the files could not be written (e.g. the disk is full); nothing of the new
            checkpoint is left and the older ones are untouched.
    """
    root = Path(root)
    final = root / folder_name(step)
    try:
        return _save(root, final, tensors, metadata, state)
    except OSError as exc:
        newest = latest_checkpoint(root)
        raise CheckpointError(
            f"{root}: could not write checkpoint {final.name}: {exc.strerror or exc}. Nothing of it was left "
            f"behind; the newest complete checkpoint is {newest.name if newest else 'none'}, intact"
        ) from exc


def _save(root: Path, final: Path, tensors: dict[str, Tensor], metadata: dict[str, str], state: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        return final
    for stale in root.glob(TMP_GLOB):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
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
        load_weights_only(tmp / STATE_FILE)
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    return final


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint folder (both files there; readability unchecked)."""
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / STATE_FILE).is_file()


def tensors_under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors of one owner (``"autoencoder."``, ``"ema."``, ...), names without the prefix."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``[(step, folder), ...]``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and is_checkpoint(child):
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


def _unreadable(file: Path, exc: Exception) -> ValueError:
    detail = " ".join(str(exc).split())[:300]
    return CheckpointError(f"{file}: truncated or corrupt ({type(exc).__name__}: {detail})")


def read_checkpoint_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of checkpoint folder ``path``'s ``weights.safetensors`` (CPU), without
    its training state: what scoring or exporting a saved step needs.

    Raises:
        FileNotFoundError: ``path`` has no ``weights.safetensors``.
        CheckpointError: the file is there but cannot be read (truncated, corrupt).
    """
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (needs {WEIGHTS_FILE} and {STATE_FILE})")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors and I/O errors all mean "unreadable"
        raise _unreadable(weights, exc) from exc
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint folder.
        CheckpointError: a file is there but cannot be read (truncated, corrupt, not plain data).
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (needs {WEIGHTS_FILE} and {STATE_FILE})")
    tensors, metadata = read_checkpoint_weights(path)
    try:
        state = load_weights_only(state_file)
    except ValueError as exc:  # refused as code (UnsafePickleError), or damaged: the message says which
        raise CheckpointError(f"{state_file}: {exc}") from exc
    except OSError as exc:
        raise _unreadable(state_file, exc) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: expected a dict of training state, got {type(state).__name__}")
    match = _NAME.match(path.name)
    step = int(state.get("step", match.group(1) if match else -1))
    return Checkpoint(path=path, step=step, tensors=tensors, metadata=metadata, state=state)


def set_aside(path: str | os.PathLike) -> Path:
    """Rename checkpoint folder ``path`` to ``corrupt-<name>`` (``-2``, ``-3``... if taken) beside it,
    so it is kept for inspection but no longer listed, resumed from or taken for a saved step."""
    path = Path(path)
    target = path.with_name(_CORRUPT_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{_CORRUPT_PREFIX}{path.name}-{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target
