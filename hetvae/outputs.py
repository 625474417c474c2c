"""What hetvae writes beside a user's files: recognising its own outputs, refusing to overwrite
anything else, and writing maps, tables and JSON atomically.

PNGs and safetensors files hetvae writes carry :data:`OUTPUT_MARKER` in their metadata; its JSON
and markdown are recognised by their keys (:data:`METRIC_KEYS`) and table header
(:data:`COMPARISON_HEADER`). :func:`check_output_file` lets a command overwrite only those.
"""

from __future__ import annotations

import json
import math
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


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def check_output_folder(path: str | Path, flag: str = "output folder") -> Path:
    """``path`` as a folder outputs can go into (it may not exist yet); ``ValueError`` naming
    ``flag`` and the file in the way otherwise."""
    path = Path(path).expanduser()
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder (existing or to be created)")
    _check_parents(path, flag)
    return path


def check_output_file(path: str | Path, flag: str = "output") -> Path:
    """``path`` as a file hetvae may write: absent, or an earlier output of hetvae
    (:func:`is_hetvae_output`). ``ValueError`` naming ``flag`` and ``path`` otherwise."""
    path = Path(path).expanduser()
    _check_parents(path, flag)
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
