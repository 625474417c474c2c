"""Reading pickled tensors without running code, and saying why a pickle was not read.

Pickles (``.ckpt``, ``.pt``, ``.bin``) are only ever read with ``torch.load(weights_only=True)``,
which refuses any object but tensors and plain containers. When it refuses, torch's message mixes
damage and code and advises retrying with ``weights_only=False``; hetvae never relays that advice.
:func:`load_weights_only` tells the two apart, reading the pickle's opcodes with :mod:`pickletools`
(which executes nothing): a file that names a real function or class to call is refused as code
(:class:`UnsafePickleError`); bytes that are cut short or garbled are reported as damage.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafePickleError", "load_weights_only", "pickle_globals"]

_SAFE_MODULES = ("torch._utils", "torch._tensor", "torch.serialization", "collections")
_SAFE_TORCH_NAME = re.compile(r"^torch\.(\w+Storage|Size|device|dtype|float\d*|bfloat16|half|int\d*|uint8|bool|complex\d*)$")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


class UnsafePickleError(ValueError):
    """A pickle that holds objects other than tensors and plain containers: unpickling it could run code."""


def _stream(file: Path) -> bytes:
    """The pickle stream of ``file``: the whole file, or ``data.pkl`` of torch's zip format."""
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name) if name is not None else b""
    return file.read_bytes()


def pickle_globals(file: str | os.PathLike) -> list[str]:
    """The ``module.name`` of every global the pickle in ``file`` would import, in order, read from its
    opcodes without executing anything; as far as the stream can be parsed (``[]`` when it cannot)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(_stream(Path(file)))):
            if op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                strings = [*strings[-1:], arg if isinstance(arg, str) else arg.decode("latin-1")]
            elif op.name == "GLOBAL" and isinstance(arg, str):
                names.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                names.append(".".join(strings))
    except Exception:  # noqa: BLE001 - a damaged stream: what was read so far
        pass
    return names


def _harmless(name: str) -> bool:
    """What ``weights_only`` itself rebuilds tensors with (torch's storages, dtypes, rebuild helpers)."""
    return name.rpartition(".")[0] in _SAFE_MODULES or bool(_SAFE_TORCH_NAME.match(name))


def _real(name: str) -> bool:
    """Whether ``name`` names something that exists (garbled bytes name nothing). Nothing is
    imported to find out: a module not imported yet counts as real."""
    module, _, attr = name.rpartition(".")
    loaded = sys.modules.get(module or "builtins")
    return loaded is None or hasattr(loaded, attr)


def _zip_is_damaged(file: Path) -> bool:
    """Whether ``file`` is a zip archive (torch's format since 1.6) whose checksums do not match."""
    try:
        if not zipfile.is_zipfile(file):
            return False
        with zipfile.ZipFile(file) as z:
            return z.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        return True


def _detail(error: Exception) -> str:
    """torch's own words on what went wrong, without its advice to retry with ``weights_only=False``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = next((line.split("error:")[-1].strip() for line in lines if "WeightsUnpickler error" in line), "")
    said = said or next((line for line in lines if "weights_only" not in line and "documentation" not in line), "")
    return said or type(error).__name__


def load_weights_only(file: str | os.PathLike) -> Any:
    """``torch.load(file, map_location="cpu", weights_only=True)``.

    Raises:
        UnsafePickleError: the pickle names a real function or class outside torch's tensor
            rebuilding (the message names the first one); it was not unpickled.
        ValueError: the file is truncated or corrupt, or uses pickle opcodes the safe reader does
            not support; the message says which.
    """
    file = Path(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - weights_only runs no code: any failure is the file's
        damaged = _zip_is_damaged(file)
        found = re.search(r"GLOBAL (\S+)", str(error))
        named = [] if found is None else [found[1] if "." in found[1] else f"builtins.{found[1]}"]
        suspects = [n for n in [*named, *pickle_globals(file)] if not _harmless(n) and _real(n)]
        if suspects and not damaged:
            raise UnsafePickleError(
                f"refused to unpickle: the file holds objects other than tensors and plain containers (first: "
                f"{suspects[0]!r}), and unpickling them could run code. Pickles are only read with "
                "torch.load(weights_only=True); convert the file to safetensors where you trust it"
            ) from error
        detail = "a checksum of the zip archive does not match" if damaged else _detail(error)
        if "Unsupported operand" in detail and not damaged:
            raise ValueError(
                f"cannot unpickle the file: it uses pickle opcodes the safe reader does not support ({detail}; "
                "pickle protocol 4 or 5 outside torch.save's format). Save it with torch.save or as safetensors"
            ) from error
        raise ValueError(f"cannot unpickle the file, it is truncated or corrupt ({detail})") from error
