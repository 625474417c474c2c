"""What hetvae writes beside a user's files: recognising its own outputs, refusing to overwrite
anything else, and writing maps, tables and JSON atomically.

PNGs and safetensors files hetvae writes carry :data:`OUTPUT_MARKER` in their metadata; its JSON
and markdown are recognised by their keys (:data:`METRIC_KEYS`) and table header
(:data:`COMPARISON_HEADER`). :func:`check_output_file` lets a command overwrite only those, and
it, :func:`check_output_folder` and :func:`check_replaceable` refuse, before any work, a place
hetvae could not write to (a file in the way, a read-only folder, file or file system).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hetvae.files import atomic_write_text, write_atomically

OUTPUT_MARKER = "hetvae"
"""Metadata key of every PNG and safetensors file hetvae writes: what lets a later command tell
its own outputs (safe to replace, never read back as images) from a user's files."""
METRIC_KEYS = (
    "psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause",
    "n_images", "granularity",
)
"""The keys of every result of ``hetvae eval`` (and of each model in ``hetvae compare``'s JSON)."""
COMPARISON_HEADER = "| run | granularity | PSNR (dB) | bits/dim | coverage 50% | coverage 90% | calib. error | Spearman | AUSE |"
"""The first line of ``hetvae compare``'s markdown table."""


def _is_metrics(data) -> bool:
    return isinstance(data, dict) and set(METRIC_KEYS) <= set(data)


def is_hetvae_output(path: str | Path) -> bool:
    """Whether ``path`` is a regular file hetvae wrote: a PNG or safetensors file carrying
    :data:`OUTPUT_MARKER`, the JSON of ``hetvae eval`` / ``compare``, or the table of
    ``compare``. Unreadable or foreign files are not."""
    path = Path(path)
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            with Image.open(path) as im:
                return OUTPUT_MARKER in im.info
        if suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return OUTPUT_MARKER in (f.metadata() or {})
        if suffix in (".json", ".md") and path.stat().st_size <= 1 << 20:
            text = path.read_text()
            if suffix == ".md":
                return text.startswith(COMPARISON_HEADER + "\n")
            data = json.loads(text)
            return _is_metrics(data) or (isinstance(data, dict) and bool(data) and all(map(_is_metrics, data.values())))
    except Exception:  # unreadable, or not what its name says: not ours
        return False
    return False


def _exists(path: Path, flag: str) -> bool:
    """Whether ``path`` (or a dangling link) is there; ``ValueError`` when that cannot be known."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be reached ({e.strerror or e})") from None
    return True


def _writable(folder: Path) -> bool:
    """Whether this process may create and replace files in ``folder``: ``os.access`` asks the
    kernel, so a read-only file system, an ACL and root's rights are all accounted for."""
    return os.access(folder, os.W_OK | os.X_OK)


def _check_folder(folder: Path, flag: str, shown: Path) -> None:
    """:func:`check_output_folder` of ``folder``, the message naming ``shown`` (the path given)."""
    for existing in (folder, *folder.parents):
        if not _exists(existing, flag):
            continue
        if not existing.is_dir():
            if existing == shown:
                raise ValueError(f"{flag} {shown} is a file; expected a folder (existing or to be created)")
            raise ValueError(f"{flag} {shown}: {existing} is a file, not a folder")
        if not _writable(existing):
            raise ValueError(f"{flag} {shown}: {existing} cannot be written into (a read-only folder or file "
                             "system); choose a folder you can write to")
        return


def check_replaceable(path: str | Path, flag: str = "output") -> Path:
    """``path`` as a file hetvae can replace (or create) atomically: its folder passes
    :func:`check_output_folder`, and an existing ``path`` is writable, neither write-protected nor
    immutable: a file protected so is refused rather than replaced behind its protection.
    ``ValueError`` naming ``flag`` and ``path`` otherwise."""
    path = Path(path).expanduser()
    _check_folder(path.parent, flag, path)
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the file is read-only (write-protected or immutable), so it is not "
                         "replaced")
    return path


def check_output_folder(path: str | Path, flag: str = "output folder") -> Path:
    """``path`` as a folder hetvae can write files into: an existing folder this process may write
    in, or one it can create (the nearest existing folder above it is one it may write in).
    ``ValueError`` naming ``flag`` and what is in the way otherwise: a regular file where a folder
    would be, a read-only folder or file system. Nothing is created."""
    path = Path(path).expanduser()
    _check_folder(path, flag, path)
    return path


def check_output_file(path: str | Path, flag: str = "output") -> Path:
    """``path`` as a file hetvae may write: in a folder it can write into (as
    :func:`check_output_folder` says), and absent or an earlier output of hetvae
    (:func:`is_hetvae_output`). ``ValueError`` naming ``flag`` and ``path`` otherwise."""
    path = Path(path).expanduser()
    _check_folder(path.parent, flag, path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; expected a file name")
    if (path.exists() or path.is_symlink()) and not is_hetvae_output(path):
        raise ValueError(
            f"{flag}: refusing to overwrite {path}: it exists and was not written by hetvae "
            "(choose another name or folder, or move the file)"
        )
    return path


def uncertainty_outputs(out: str | Path, name: str) -> tuple[Path, Path, Path]:
    """Where ``hetvae uncertainty`` writes the panel, scale map and raw maps of image ``name``
    (an :class:`ImageList` name such as ``a/x.png``): ``out/a/x.png_panel.png``,
    ``out/a/x.png_scale.png``, ``out/a/x.png_maps.safetensors``. Distinct names never share an
    output (no suffix ends another), and the extension keeps ``x.png`` and ``x.jpg`` apart."""
    out = Path(out)
    return out / f"{name}_panel.png", out / f"{name}_scale.png", out / f"{name}_maps.safetensors"


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`hetvae.files.atomic_write_text`)."""
    return atomic_write_text(path, text)


def _json_safe(value):
    """``value`` with every NaN or infinite float (an undefined metric) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_text(data, indent: int | None = 2) -> str:
    """``data`` as strict JSON: an undefined (NaN or infinite) value is ``null``, never the bare
    ``NaN`` / ``Infinity`` Python's ``json`` writes by default, which JSON readers refuse."""
    return json.dumps(_json_safe(data), indent=indent, allow_nan=False)


def write_json(result: dict, path: str | Path) -> Path:
    """``result`` as strict JSON (:func:`json_text`), written atomically."""
    return write_text(json_text(result) + "\n", path)


def save_marked_maps(path: str | Path, maps: dict[str, Tensor], family: str, granularity: str, what: str) -> Path:
    """``maps`` as a safetensors file, written atomically, with the family, granularity and
    :data:`OUTPUT_MARKER` (``what``) in its metadata."""
    tensors = {k: v.contiguous().cpu() for k, v in maps.items()}
    metadata = {"family": family, "granularity": granularity, OUTPUT_MARKER: what}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
