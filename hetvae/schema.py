"""Typed YAML: plain mappings mapped onto (nested, keyword-only) dataclasses, and back.

- Every value is checked against the field's annotation and coerced where that is lossless
  (``1`` -> ``1.0`` for a float, ``"1e-5"`` -> ``1e-05``, a list -> a tuple). Anything else is a
  :class:`ConfigError` naming the full dotted key (``train.lr``), what was expected and what was
  found.
- An unknown key is an error that names it, suggests the closest valid key and lists them all.
- ``section.key=value`` overrides (:func:`apply_overrides`) parse ``value`` as YAML and go
  through the same checks.

This module knows nothing of hetvae's sections (:mod:`hetvae.config` declares them) and imports
nothing from hetvae.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_to_dict",
    "deep_merge",
    "from_dict",
    "join_key",
    "require",
    "require_finite",
    "require_path",
    "section_null_detail",
    "show_value",
]


class ConfigError(ValueError):
    """A config key or value is wrong.

    ``key`` is the full dotted key (``"train.lr"``, ``"model.block_out_channels[1]"``; ``""`` for
    the file as a whole) and ``detail`` says what is wrong; ``str(error)`` is ``"key: detail"``.
    """

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def show_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:  # a 5000-digit number or a pasted file is named, not reprinted
        text = text[:60] + f"... ({len(text)} characters)"
    return f"{text} ({type(value).__name__})"


class _NotFinite(ConfigError):
    """A nan / inf where a number is expected: reported as such, not as a type mismatch."""


def _finite(number: float, key: str, value: Any) -> float:
    if not math.isfinite(number):
        shown = f"{value} (= {number})" if isinstance(value, str) and value.strip() != str(number) else number
        raise _NotFinite(key, f"must be a finite number, got {shown}")
    return number


def require_finite(obj: Any) -> None:
    """Every float field of dataclass ``obj`` (and every float inside a tuple / list field) is finite:
    a nan or inf from Python code is refused like one from a file."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f.name if i is None else f"{f.name}[{i}]", f"must be a finite number, got {v}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _union_members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _describe(tp: Any) -> str:
    """A reader's name for an annotation: ``float``, ``list of int``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return "list [" + ", ".join(_describe(a) for a in args) + "]"
    if origin is list:
        return f"list of {_describe(args[0])}"
    if origin is dict:
        return f"mapping of {_describe(args[0])} to {_describe(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _unknown_key(key: str, path: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {join_key(path, close[0])!r}?" if close else ""
    return ConfigError(join_key(path, key), f"unknown key{hint} (valid keys: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` and converted where lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args):
            return value
        detail = f"expected {_describe(tp)}, got {show_value(value)}"
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise ConfigError(key, detail + (f"; did you mean {close[0]!r}?" if close else ""))
    fail = ConfigError(key, f"expected {_describe(tp)}, got {show_value(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise fail
    if tp is bool:
        # no 0/1 or "yes" here: a typo must not silently flip a switch
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            # YAML 1.1 reads 1e4 as a string; accept it when it is an integer
            try:
                return int(value)
            except ValueError:  # also past Python's int-parsing limit (4300 digits)
                try:
                    value = float(value)
                except ValueError:
                    raise fail from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise fail
    if tp is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            try:
                return _finite(float(value), key, value)
            except OverflowError:  # an int past float range
                raise _NotFinite(key, f"must be a finite number, got {show_value(value)}") from None
        if isinstance(value, str):
            # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise fail from None
            return _finite(number, key, value)
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {_describe(tp)}, got {len(value)} values: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail
        return {
            _coerce(k, args[0], f"{key}.{k}"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    members = typing.get_args(tp)
    optional = type(None) in members
    others = [m for m in members if m is not type(None)]
    if value is None:
        if optional:
            return None
        raise ConfigError(key, f"expected {_describe(tp)}, got None")
    if (
        optional
        and isinstance(value, str)
        and value.strip().lower() in ("none", "null")
        and not any(_accepts_text(m) for m in others)
    ):
        return None
    if len(others) == 1:
        try:
            return _coerce(value, others[0], key)
        except ConfigError as exc:
            if exc.key != key or isinstance(exc, _NotFinite):  # the more precise error
                raise
            raise ConfigError(key, f"expected {_describe(tp)}, got {show_value(value)}") from None
    for member in others:
        try:
            return _coerce(value, member, key)
        except _NotFinite:
            raise
        except ConfigError:
            continue
    raise ConfigError(key, f"expected {_describe(tp)}, got {show_value(value)}")


def _accepts_text(tp: Any) -> bool:
    """Whether ``tp`` (or a member of it) takes free text or text choices."""
    for member in _union_members(tp):
        if member is str:
            return True
        if typing.get_origin(member) is Literal and any(isinstance(a, str) for a in typing.get_args(member)):
            return True
    return False


def _accepts_scalar_non_text(tp: Any) -> bool:
    return any(m in (bool, int, float) for m in _union_members(tp))


def from_dict(cls: type[T], mapping: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``mapping`` (nested mappings for nested dataclasses).

    Keys left out keep their defaults (``None`` counts as an empty mapping); a dataclass field
    without a default must be present. Values are checked and coerced from the annotations: int,
    float, bool, str, ``X | None``, ``Literal[...]`` choices, ``tuple[T, ...]`` and fixed
    tuples (from YAML lists), ``list[T]``, ``dict[K, V]`` and nested dataclasses. ``path`` is the
    dotted prefix used in error messages.

    Raises:
        ConfigError: unknown key (with the closest valid key and the list of valid ones), missing
            required key, wrong type or invalid value, naming the full dotted key.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(path, f"expected a mapping of keys, got {show_value(mapping)}")
    fields = _init_fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            raise _unknown_key(str(key), path, fields)
        kwargs[key] = _coerce(value, hints[key], join_key(path, key))
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in kwargs and not has_default:
            raise ConfigError(join_key(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # raised by __post_init__ with a key relative to cls
        raise ConfigError(join_key(path, exc.key), exc.detail) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` (a dataclass) as nested plain dicts and lists, ready for ``yaml.safe_dump``.

    Tuples become lists; :func:`from_dict` turns them back, so
    ``from_dict(type(cfg), config_to_dict(cfg)) == cfg``.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of dotted key ``dotted`` under dataclass ``cls``; unknown keys raise."""
    parts = dotted.split(".")
    tp: Any = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(prefix, f"is a value, not a section; cannot set {dotted!r}")
        fields = _init_fields(tp)
        if not part.strip():
            raise ConfigError(dotted, f"malformed key {dotted!r}: an empty part (expected section.key)")
        if part not in fields:
            raise _unknown_key(part, prefix, fields)
        tp = _hints(tp)[part]
    return tp


def _parse_override_value(text: str, tp: Any) -> Any:
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        # not YAML (a Windows path, say; an integer past Python's parsing limit; nesting too deep):
        # the type check below judges the text
        value = text
    # YAML 1.1 turns `yes`, `off`, `2024-01-01`, `1.0` into bool/date/float; a text field wants
    # what was typed.
    if (
        _accepts_text(tp)
        and not _accepts_scalar_non_text(tp)
        and not isinstance(value, (str, list, dict, type(None)))
    ):
        value = text.strip()
    return value


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """A new config: ``cfg`` with ``section.key=value`` overrides applied in order.

    ``value`` is parsed with ``yaml.safe_load`` (``1e-5``, ``true``, ``null``, ``[32, 64]``) and
    then checked like a file value; a text field keeps the typed text (``out_dir=yes`` stays the
    string ``"yes"``). Any field at any depth can be set. A YAML mapping merges key by key into
    what is there, as a ``base:`` file does (:func:`deep_merge`): ``train={steps: 1000,
    final_steps: 0}`` sets those two keys and keeps the section's others; a list or any other
    value replaces. A section cannot be set to null (``train=null``, ``train=~``): that would reset
    every key of it to its default. ``cfg`` itself is not modified.

    Raises:
        ConfigError: malformed override, unknown key (with the closest valid one), a value of the
            wrong type or out of range, a section set to null.
    """
    overrides = list(overrides)
    if not overrides:
        return cfg
    tree = config_to_dict(cfg)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError("", f"override {item!r} is not a string of the form section.key=value")
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"override {item!r} is not of the form section.key=value")
        tp = _field_type(type(cfg), key)
        if not text.strip():
            # `--set data.path=$DATA` with DATA unset: never read as null (the bundled photos)
            hint = f"; write {key}=null for null" if _accepts_none(tp) else ""
            raise ConfigError(key, f"empty value in override {item!r} (an unset shell variable?){hint}")
        value = _parse_override_value(text, tp)
        if value is None and dataclasses.is_dataclass(tp):
            instead = f"set only the keys to change: {key}.KEY=VALUE, or {key}={{KEY: VALUE}}, which merges"
            raise ConfigError(key, section_null_detail(key, f"in override {item!r}", instead))
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            if node.get(part) is None:  # a section reset to null keeps its defaults for the keys below
                node[part] = {}
            elif not isinstance(node[part], Mapping):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(section, f"expected a mapping of keys, got {show_value(node[part])} (before {item!r})")
            node = node[part]
        node[leaf] = deep_merge(node, {leaf: value})[leaf]
    return from_dict(type(cfg), tree)


def section_null_detail(key: str, where: str, instead: str) -> str:
    """The :class:`ConfigError` detail for section ``key`` given as null in ``where`` (the override,
    the file): null would reset every key of the section to its default, so it is refused and
    ``instead`` says what to write."""
    return (
        f"expected a mapping of keys, got null ({where}), which would reset every key of {key} to its "
        f"default; {instead}"
    )


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces.

    How a ``base:`` file's child and a ``--set key={...}`` mapping apply; neither input is modified.
    """
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _accepts_none(tp: Any) -> bool:
    """Whether ``tp`` takes null (a section does not: null would reset it to its defaults)."""
    return type(None) in _union_members(tp)


def require(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise ConfigError(key, detail)


def require_path(value: str, key: str) -> None:
    """A path-valued key: not empty, no NUL character (no file system takes one)."""
    require(bool(value.strip()), key, "must not be empty")
    require("\0" not in value, key, f"contains a NUL character: {value!r}")
