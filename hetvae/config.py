"""Run configuration: YAML mapped onto typed dataclasses.

A config is a :class:`Config` with five sections (``model``, ``log_scale``, ``objective``,
``data``, ``train``) and ``out_dir``. The rules:

- A YAML file may set any subset of keys, at any depth; every key it leaves out keeps its
  default. A fine-tuning config is therefore a few lines on top of the defaults.
- Every value is checked against the field's annotation and coerced where that is lossless
  (``1`` -> ``1.0`` for a float, ``"1e-5"`` -> ``1e-05``, a list -> a tuple). Anything else is a
  :class:`ConfigError` naming the full dotted key (``train.lr``), what was expected and what was
  found. Range checks (``lr > 0``, ``beta`` in [0, 1], ...) name the key the same way.
- An unknown key is an error that names it, suggests the closest valid key and lists them all.
- ``--set section.key=value`` overrides (:func:`apply_overrides`) parse ``value`` as YAML and go
  through the same checks.
- Files are read with ``yaml.safe_load`` only: tags such as ``!!python/object`` are refused.
- :func:`save_config` writes the resolved config (every key) so a run folder is self-describing.

Paths (``data.path``, ``model.init_from``) are not checked for existence here: a config may be
written on one machine and run on another; the builders check them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

if typing.TYPE_CHECKING:  # torch-heavy modules; config.py itself is imported without them
    from hetvae.autoencoder import AutoencoderKL
    from hetvae.objective import AutoencoderObjective
    from hetvae.loss import HeteroscedasticNLL

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "LogScaleConfig",
    "ObjectiveConfig",
    "DataConfig",
    "TrainConfig",
    "from_dict",
    "config_to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
    "model_architecture_kwargs",
    "build_model",
    "build_objective",
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


# ---------------------------------------------------------------------------------------------
# generic machinery: mappings <-> dataclasses
# ---------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
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


def _require_finite(obj: Any) -> None:
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
    hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
    return ConfigError(_join(path, key), f"unknown key{hint} (valid keys: {', '.join(valid)})")


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
        detail = f"expected {_describe(tp)}, got {_show(value)}"
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise ConfigError(key, detail + (f"; did you mean {close[0]!r}?" if close else ""))
    fail = ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")
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
                raise _NotFinite(key, f"must be a finite number, got {_show(value)}") from None
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
            raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}") from None
    for member in others:
        try:
            return _coerce(value, member, key)
        except _NotFinite:
            raise
        except ConfigError:
            continue
    raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")


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
        raise ConfigError(path, f"expected a mapping of keys, got {_show(mapping)}")
    fields = _init_fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            raise _unknown_key(str(key), path, fields)
        kwargs[key] = _coerce(value, hints[key], _join(path, key))
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in kwargs and not has_default:
            raise ConfigError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # raised by __post_init__ with a key relative to cls
        raise ConfigError(_join(path, exc.key), exc.detail) from None


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
    string ``"yes"``). Any field at any depth can be set, including a whole section from a YAML
    mapping (``data={resolution: 32}``, which resets that section's other keys to defaults).
    ``cfg`` itself is not modified.

    Raises:
        ConfigError: malformed override, unknown key (with the closest valid one), a value of the
            wrong type or out of range.
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
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            if node.get(part) is None:  # a section reset to null keeps its defaults for the keys below
                node[part] = {}
            elif not isinstance(node[part], Mapping):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(section, f"expected a mapping of keys, got {_show(node[part])} (before {item!r})")
            node = node[part]
        node[leaf] = value
    return from_dict(type(cfg), tree)


def _accepts_none(tp: Any) -> bool:
    return type(None) in _union_members(tp) or dataclasses.is_dataclass(tp)


# ---------------------------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise ConfigError(key, detail)


def _require_path(value: str, key: str) -> None:
    """A path-valued key: not empty, no NUL character (no file system takes one)."""
    _require(bool(value.strip()), key, "must not be empty")
    _require("\0" not in value, key, f"contains a NUL character: {value!r}")


Granularity = Literal["global", "channel", "pixel"]
Family = Literal["laplace", "gaussian"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True)
class ModelConfig:
    """The autoencoder: where it starts from and, for a fresh one, its architecture.

    Attributes:
        init_from: ``"scratch"``: a new model built from the fields below. Otherwise a path that
            ``load_autoencoder`` accepts (diffusers folder, SD/ldm single file, hetvae folder);
            the architecture is then the checkpoint's, and the fields below are not used.
        in_channels, out_channels: image channels.
        block_out_channels: channels per resolution level; the image is down-sampled by
            ``2 ** (len(block_out_channels) - 1)`` (SD: ``(128, 256, 512, 512)``, 8x).
        layers_per_block: ResNet blocks per level (the decoder has one more, as in SD).
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        latent_channels: channels of the latent ``z``.
        use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (SD: both).
        mid_block_attention: self-attention in the middle blocks.
        scaling_factor, shift_factor: ``z_diffusion = (z - shift) * scale``; metadata for
            diffusion models, unused by the autoencoder itself. ``None`` (the default): the
            checkpoint's own value for a loaded model (stored in it, else inferred from its family:
            an SDXL VAE looks like SD 1.x, so set 0.13025 for it), and 0.18215 / 0.0 from scratch.
            A value set here always wins, for a loaded model too.
    """

    init_from: str = "scratch"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        _require_finite(self)
        _require(bool(self.init_from.strip()), "init_from", "must be 'scratch' or a checkpoint path, got ''")
        _require_path(self.init_from, "init_from")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(len(self.block_out_channels) >= 1, "block_out_channels", "must list at least one level")
        for i, c in enumerate(self.block_out_channels):
            _require(
                c >= 1 and c % self.norm_num_groups == 0,
                f"block_out_channels[{i}]",
                f"must be a positive multiple of norm_num_groups={self.norm_num_groups}, got {c}",
            )
        _require(
            self.scaling_factor is None or self.scaling_factor > 0,
            "scaling_factor",
            f"must be > 0 or null, got {self.scaling_factor}",
        )

    @property
    def downsample_factor(self) -> int:
        """Side of the image divided by the side of the latent."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(kw_only=True)
class LogScaleConfig:
    """The reconstruction likelihood's log-scale (``log b`` for Laplace, ``log sigma`` for Gaussian).

    Attributes:
        granularity: ``"global"`` one scalar (SD's ``logvar``), ``"channel"`` one per channel,
            ``"pixel"`` a map predicted by the decoder's log-scale head.
        family: ``"laplace"`` (L1, SD's choice) or ``"gaussian"`` (L2).
        init: initial log-scale; must lie strictly inside ``bounds``.
        bounds: ``(lo, hi)`` of the soft clamp on the log-scale.
        beta: beta-NLL exponent (Seitzer et al. 2022); 0 = plain NLL, 1 = the mean gets the
            plain L1/L2 gradient.
        fit: ``"learned"`` by gradient descent, or ``"optimal"``: the closed-form maximum-likelihood
            scale of the current batch (global / channel only; per pixel it would be the error
            itself).
        shared: pixel only: one map for all channels instead of one per channel.
        detach_features: pixel only: the head sees detached decoder features, so the NLL cannot
            shape the decoder through it.
        head_layers: pixel only: hidden 3x3 conv + SiLU layers before the head's output conv
            (0: the single conv on the decoder's last features).
        head_channels: pixel only: their width (null: the decoder's full-resolution width).
        head_sees_mean: pixel only: the head also reads the (detached) mean output.
        head_sees_latent: pixel only: the head also reads the decoder's input latent, up-sampled
            to full resolution (detached with ``detach_features``): detail the code holds that
            the decoder cannot draw.
        head_sees_edges: pixel only: the head also reads the log of the mean's local gradient
            magnitude (``hetvae.autoencoder.log_edge_magnitude``, computed on the detached mean):
            the level of detail drawn around each pixel, on a scale that carries over to images
            with more detail than the training crops.
        faithful: pixel and channel: the mean gets the gradient of the NLL with one scale, the
            average of the map (of the channel scales), exactly what a global scale would give
            it, and the head (the channel scales) gets the NLL around the stopped mean (Stirn et
            al. 2023). The loss value is the per-pixel (per-channel) NLL. Ignored for ``global``
            (one scale gives the mean that gradient anyway), so one config serves every
            granularity.
        mean_scale: with ``faithful``, the scale the mean's gradient sees: ``"map"`` the map's
            (the channel scales') stopped level, ``log mean exp(s)``; ``"global"`` a learned global
            log-scale of its own (initialised at ``init``), trained exactly as granularity
            ``global`` trains its scale. With ``train.head_grad_clip`` set the autoencoder then
            takes the very steps of its global twin (``--set log_scale.granularity=global``), so
            both reconstruct alike and only the map differs. Ignored for ``global``.
        include_constant: add the density's constant (``log 2`` / ``0.5 log 2 pi``) so the loss is
            a true NLL (needed for bits/dim; irrelevant to the gradients).
        trainable: global / channel: ``false`` freezes the learned log-scale at ``init`` (not in the
            optimiser, no gradient), as SD, whose optimiser never held its ``logvar``
            (configs/sd-reference.yaml). Pixel granularity refuses it (the head is the model's).
    """

    granularity: Granularity = "global"
    family: Family = "laplace"
    init: float = 0.0
    bounds: tuple[float, float] = (-7.0, 3.0)
    beta: float = 0.0
    fit: Literal["learned", "optimal"] = "learned"
    shared: bool = False
    detach_features: bool = False
    head_layers: int = 0
    head_channels: int | None = None
    head_sees_mean: bool = False
    head_sees_latent: bool = False
    head_sees_edges: bool = False
    faithful: bool = False
    mean_scale: Literal["map", "global"] = "map"
    include_constant: bool = False
    trainable: bool = True

    def __post_init__(self) -> None:
        _require_finite(self)
        lo, hi = self.bounds
        _require(
            math.isfinite(lo) and math.isfinite(hi) and lo < hi, "bounds", f"needs finite lo < hi, got {self.bounds}"
        )
        from hetvae.heads import DEFAULT_MARGIN, LOG_SCALE_LIMIT

        _require(
            -LOG_SCALE_LIMIT <= lo and hi <= LOG_SCALE_LIMIT, "bounds",
            f"must lie inside [{-LOG_SCALE_LIMIT}, {LOG_SCALE_LIMIT}] (exp(-s) must not overflow), got {self.bounds}",
        )
        _require(
            hi - lo > 2 * DEFAULT_MARGIN, "bounds",
            f"need hi - lo > {2 * DEFAULT_MARGIN} (the soft clamp's margin on each side), got {self.bounds}",
        )
        _require(
            self.fit == "optimal" or lo + DEFAULT_MARGIN <= self.init <= hi - DEFAULT_MARGIN, "init",
            f"must lie in [{lo + DEFAULT_MARGIN}, {hi - DEFAULT_MARGIN}], at least the soft clamp's margin "
            f"{DEFAULT_MARGIN} inside bounds {self.bounds}, where the bounded log-scale starts exactly at init; "
            f"got {self.init} (widen log_scale.bounds to use it)",
        )
        _require(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        _require(self.head_layers >= 0, "head_layers", f"must be >= 0, got {self.head_layers}")
        _require(
            self.head_channels is None or self.head_channels >= 1,
            "head_channels",
            f"must be >= 1 or null, got {self.head_channels}",
        )
        _require(
            not (self.faithful and self.beta > 0 and self.granularity != "global"),
            "faithful",
            "and beta > 0 both reweight the mean's gradient; use one of them",
        )
        _require(
            self.mean_scale == "map" or self.faithful or self.granularity == "global",
            "mean_scale",
            "'global' names the scale the mean's gradient sees under log_scale.faithful; set faithful: true",
        )
        _require(
            not (self.fit == "optimal" and self.granularity == "pixel"),
            "fit",
            "'optimal' is for granularity 'global' or 'channel' (per pixel it is the error itself)",
        )
        _require(
            self.trainable or self.granularity != "pixel",
            "trainable",
            "false freezes a global or channel log-scale; the per-pixel map comes from the decoder's head, "
            "which is trained with the model (set log_scale.trainable=true for granularity 'pixel')",
        )


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Weights of the terms besides the NLL: KL, LPIPS and the PatchGAN.

    Attributes:
        kl_weight: weight of the posterior KL (SD: 1e-6).
        perceptual_weight: weight of LPIPS (SD: 1.0); 0 skips it (the CPU demo default).
        perceptual_mode: ``"sd"`` LPIPS added to the L1 inside the NLL (SD's recipe),
            ``"spatial"`` the per-pixel LPIPS map added there, ``"separate"`` LPIPS as its own term.
        perceptual_weights: ``"auto"`` (released LPIPS weights, downloaded once), ``"random"``
            (for tests) or a local path.
        disc_start: step at which the discriminator starts; ``None``: no discriminator.
        disc_weight: the adaptive GAN weight's multiplier (SD: 0.5).
        disc_factor: GAN term factor once started (SD: 1.0).
        disc_loss: ``"hinge"`` or ``"vanilla"`` (softplus).
        disc_layers: PatchGAN depth (SD: 3).
        disc_norm: ``"batch"`` (SD's default) or ``"actnorm"``.
    """

    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_mode: Literal["sd", "spatial", "separate"] = "sd"
    perceptual_weights: str = "auto"
    disc_start: int | None = None
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: int = 3
    disc_norm: Literal["batch", "actnorm"] = "batch"

    def __post_init__(self) -> None:
        _require_finite(self)
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, f"must be finite and >= 0, got {value}")
        _require(
            bool(self.perceptual_weights.strip()), "perceptual_weights", "must be 'auto', 'random' or a path"
        )
        _require_path(self.perceptual_weights, "perceptual_weights")
        _require(
            self.disc_start is None or self.disc_start >= 0,
            "disc_start",
            f"must be >= 0 or null, got {self.disc_start}",
        )
        _require(self.disc_layers >= 1, "disc_layers", f"must be >= 1, got {self.disc_layers}")


@dataclass(kw_only=True)
class DataConfig:
    """Training images (see ``hetvae.data.build_dataset``).

    Attributes:
        path: a folder, an image file, or a list of them; ``None``: scikit-image's bundled
            sample photographs (``hetvae.data.sample_images``).
        resolution: square crop side in pixels; a multiple of 8 and of the model's
            down-sampling factor.
        random_crop, random_flip: training augmentation (evaluation always centre-crops).
        num_workers: ``DataLoader`` worker processes.
        split: which sample photographs train the model when ``path`` is ``None``
            (``"train"`` keeps the ``"test"`` ones held out).
        samples_per_epoch: crops per epoch (cycling through the images); ``None``: one per image.
        eval_crop: evaluation crops: ``"center"`` one per image, ``"tiles"`` every
            non-overlapping tile (many more pixels, steadier metrics).
        rescale: ``[lo, hi]`` with ``0 < lo <= hi <= 1``: training crops see a window ``1/scale``
            times larger shrunk to ``resolution`` (antialiased), ``scale ~ U(lo, hi)``; ``None``: off.
        color_jitter: strength of the mild colour jitter of training crops (brightness, contrast,
            saturation, hue; 0 = off, 0.1 mild). See ``hetvae.data.jitter_colors``.
        tint_gray: probability that a grey training crop (every crop of a grayscale photograph)
            gets a random colour tint first (``hetvae.data.tint_gray``); 0 = grey stays grey.
        procedural: fraction of training crops taken from procedural colour dead-leaves images
            (``hetvae.procedural``) instead of the photographs; 0 = photographs only.
        cache_mb: decoded image files of ``path`` kept in memory, in megabytes per process (each
            ``num_workers`` worker holds its own cache); 0 decodes a file for every crop.
    """

    path: str | list[str] | None = None
    resolution: int = 64
    random_crop: bool = True
    random_flip: bool = True
    num_workers: int = 0
    split: Literal["all", "train", "test"] = "train"
    samples_per_epoch: int | None = None
    eval_crop: Literal["center", "tiles"] = "center"
    rescale: tuple[float, float] | None = None
    color_jitter: float = 0.0
    tint_gray: float = 0.0
    procedural: float = 0.0
    cache_mb: float = 1024.0

    def __post_init__(self) -> None:
        _require_finite(self)
        paths = self.path if isinstance(self.path, list) else [self.path] if self.path is not None else []
        _require(self.path != [], "path", "an empty list; use null for the bundled sample photographs")
        _require(all(p.strip() for p in paths), "path", "contains an empty path")
        for p in paths:
            _require_path(p, "path")
        _require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "resolution",
            f"must be a positive multiple of 8, got {self.resolution}",
        )
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            "samples_per_epoch",
            f"must be >= 1 or null, got {self.samples_per_epoch}",
        )
        if self.rescale is not None:
            lo, hi = self.rescale
            _require(0 < lo <= hi <= 1, "rescale", f"needs 0 < lo <= hi <= 1, got {list(self.rescale)}")
        _require(0 <= self.color_jitter <= 1, "color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        _require(0 <= self.tint_gray <= 1, "tint_gray", f"must be a probability in [0, 1], got {self.tint_gray}")
        _require(0 <= self.procedural <= 1, "procedural", f"must be a fraction in [0, 1], got {self.procedural}")
        _require(self.cache_mb >= 0, "cache_mb", f"must be >= 0 (megabytes; 0 turns the cache off), got {self.cache_mb}")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop.

    Attributes:
        steps: optimizer steps.
        batch_size: images per micro-batch; the effective batch is ``batch_size * grad_accum``.
        lr, betas, weight_decay: AdamW (SD used betas ``(0.5, 0.9)`` with its GAN).
        warmup_steps: linear learning-rate warm-up from 0.
        lr_schedule: after the warm-up, ``"constant"`` keeps ``lr``; ``"cosine"`` decays it to 0
            at ``steps`` along a half cosine (short runs end better converged).
        grad_accum: micro-batches per optimizer step.
        ema_decay: decay of an exponential moving average of the weights; ``None``: no EMA.
        precision: ``"fp32"``, or autocast to ``"bf16"`` / ``"fp16"`` (fp16 with a grad scaler).
        grad_clip: max global gradient norm; ``None``: no clipping.
        head_grad_clip: with a value, the log-scale's parameters (the per-pixel head's layers and
            bias, the global / per-channel scale) are clipped to this norm on their own and
            ``grad_clip`` covers the autoencoder alone; ``None``: one norm over all of them. Clipping
            is active on nearly every step of a from-scratch run (norms of ~1e4 against 1), so in
            one norm the map's gradient rescales the mean's step by step: a change to the head's
            training then re-draws the mean. Apart, with ``log_scale.faithful`` and
            ``detach_features``, the mean's update no longer depends on the head at all.
        decoder_only: train only the decoder (and log-scale), keeping the latent space fixed.
        zero_init_residual: a model built from scratch starts with the last convolution of every
            ResNet block at zero, so each block is the identity at step 0 (as in ADM / guided
            diffusion's ``zero_module``): a deep GroupNorm network trains markedly faster in a short
            run. Loaded models are not touched.
        init_logvar: a model built from scratch starts with its posterior's log-variance near
            this value (:meth:`AutoencoderKL.init_posterior_logvar`); ``None``: PyTorch's init,
            log-variance ~0, i.e. latent noise of std ~1, which the reconstruction loss shrinks only
            slowly (the KL at SD's weight 1e-6 barely pushes back). SD's trained VAEs end with a
            small posterior variance. In a 900-step CPU run it helped two seeds of three and made
            the third fail on whole images (docs/results.md), so no shipped config uses it.
            Loaded models are not touched.
        init_chroma_gain: a model built from scratch starts with its encoder's first convolution
            reading the input's chroma (RGB minus its grey component) this many times amplified
            (:meth:`AutoencoderKL.amplify_input_chroma`); ``None``: PyTorch's init. Chroma is a
            small share of a photograph's variance, so a plain init learns colour last and
            reconstructs saturated colours washed out. Loaded models are not touched.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        seed: seeds the model init and the data crops.
        checkpoint_every, sample_every, log_every: intervals in steps; 0 disables. A
            ``metrics.jsonl`` record holds the losses averaged over the interval, and the
            likelihood diagnostics (``bpd``, ``nll_per_dim``, ``log_scale_*``) of its last step,
            the only step that computes them.
        keep_checkpoints: how many recent checkpoints to keep; 0 keeps all.
        max_nonfinite: consecutive non-finite steps skipped before training stops with an error.
        resume: ``"auto"`` continues from the latest checkpoint in ``out_dir`` if there is one;
            ``"never"`` always starts fresh.
        disc_lr: discriminator learning rate; ``None``: ``lr``.
        log_scale_lr: learning rate of the log-scale *offsets* (the global / per-channel log-scale
            parameters, and the per-pixel head's bias); ``None``: ``lr``. Adam moves a scalar by
            about its learning rate per step, so at a typical autoencoder lr (1e-4) a log-scale
            starting at 0 needs tens of thousands of steps to reach ``log|error| ~ -3``; this lets it
            get there in hundreds without touching the network's lr.
        head_lr: learning rate of the per-pixel head's layers (its hidden convs and the output
            conv's weight; the bias is an offset and takes ``log_scale_lr``); ``None``: ``lr``. With
            ``log_scale.faithful`` and ``detach_features`` the head's loss never reaches the mean;
            with ``head_grad_clip`` too, a larger value only lets the map keep up with the mean it
            judges (under one clipping norm it also re-draws the mean).
        head_steps: after ``steps``, this many more steps train only the log-scale (the per-pixel
            head's layers, or the global / per-channel scale) on the frozen autoencoder: the EMA
            weights when there is an EMA, so the map learns the errors of the very mean that is
            exported. The learning rate restarts at each group's value and follows ``lr_schedule``
            over these steps (no warm-up); the discriminator does not train. With
            ``log_scale.faithful`` and ``detach_features`` the head never shaped the mean, so this
            only lets it finish judging the converged one (the situation of a head grafted onto a
            pretrained VAE). 0: no such phase (the shipped configs: docs/results.md has the runs).
        final_steps, final_resolution: the last ``final_steps`` of the ``steps`` (and the
            ``head_steps`` after them) train on crops of ``final_resolution`` px instead of
            ``data.resolution``, in batches of ``batch_size * (data.resolution / final_resolution) ** 2``
            images (rounded, at least 1), about the same pixels per step. GroupNorm normalises over the whole image, so a model
            trained only on small crops meets other statistics on a whole photograph; a short
            phase on large crops adapts it (docs/results.md: +0.4 to +0.6 dB on whole unseen
            photographs for 32 px training crops). With ``objective`` reductions that sum over pixels
            (SD's) the loss per image grows with the crop; ``grad_clip`` keeps the step size. 0 /
            ``None``: off.
        device: where training runs: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. Under torchrun, ``"auto"``/``"cuda"`` put each process on
            the GPU of its ``LOCAL_RANK``; ``"cpu"`` trains with gloo.
    """

    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = 1
    ema_decay: float | None = None
    precision: Precision = "fp32"
    grad_clip: float | None = 1.0
    head_grad_clip: float | None = None
    decoder_only: bool = False
    zero_init_residual: bool = False
    init_logvar: float | None = None
    init_chroma_gain: float | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 200
    sample_every: int = 200
    log_every: int = 20
    keep_checkpoints: int = 2
    max_nonfinite: int = 10
    resume: Literal["never", "auto"] = "auto"
    disc_lr: float | None = None
    log_scale_lr: float | None = None
    head_lr: float | None = None
    head_steps: int = 0
    final_steps: int = 0
    final_resolution: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        _require_finite(self)
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
            "device",
            f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        for name in ("steps", "batch_size", "grad_accum"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "head_steps", "final_steps", "seed", "checkpoint_every", "sample_every", "log_every",
                     "keep_checkpoints", "max_nonfinite"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        # torch seeds are 64-bit, and the posterior noise is seeded with seed + 1
        _require(self.seed < 2**64 - 1, "seed", f"must be < 2**64 - 1, got {self.seed}")
        for name in ("lr", "disc_lr", "log_scale_lr", "head_lr"):
            value = getattr(self, name)
            ok = value is None or (math.isfinite(value) and value > 0)
            _require(ok, name, f"must be finite and > 0, got {value}")
        for i, b in enumerate(self.betas):
            _require(0.0 <= b < 1.0, f"betas[{i}]", f"must be in [0, 1), got {b}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            self.init_chroma_gain is None or (math.isfinite(self.init_chroma_gain) and self.init_chroma_gain > 0),
            "init_chroma_gain",
            f"must be finite and > 0 (1 changes nothing) or null, got {self.init_chroma_gain}",
        )
        _require(
            self.init_logvar is None or -30.0 <= self.init_logvar <= 20.0,
            "init_logvar",
            f"must be in [-30, 20] (the posterior's log-variance clamp) or null, got {self.init_logvar}",
        )
        _require(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "ema_decay",
            f"must be in (0, 1) or null, got {self.ema_decay}",
        )
        for name in ("grad_clip", "head_grad_clip"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        _require(
            self.final_steps <= self.steps,
            "final_steps",
            f"counts the last of train.steps={self.steps} and must not exceed them, got {self.final_steps} "
            "(lower it with the steps, or set 0 to train on data.resolution crops throughout)",
        )
        _require(
            self.final_resolution is None or (self.final_resolution >= 8 and self.final_resolution % 8 == 0),
            "final_resolution",
            f"must be a positive multiple of 8 or null, got {self.final_resolution}",
        )
        _require(
            self.final_steps == 0 or self.final_resolution is not None,
            "final_resolution",
            f"must be set when train.final_steps={self.final_steps} > 0 (the crop side of those steps)",
        )


@dataclass(kw_only=True)
class Config:
    """A whole run: the five sections plus ``out_dir``, the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    log_scale: LogScaleConfig = field(default_factory=LogScaleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _require_path(self.out_dir, "out_dir")
        _require(
            self.train.head_steps == 0 or self.log_scale.trainable,
            "train.head_steps",
            f"trains only the log-scale, which log_scale.trainable=false freezes; got {self.train.head_steps} "
            "(set log_scale.trainable=true, or train.head_steps=0)",
        )
        if self.model.init_from == "scratch":
            factor = self.model.downsample_factor
            _require_crop_sides(self, factor, f"the model's down-sampling factor {factor} "
                                              "(2 ** (len(model.block_out_channels) - 1))")


def _require_crop_sides(cfg: Config, factor: int, what: str) -> None:
    """The training crops (``data.resolution``, ``train.final_resolution``) must down-sample
    ``factor`` times to whole latents; ``what`` names the factor in the error."""
    for key, value in (("data.resolution", cfg.data.resolution), ("train.final_resolution", cfg.train.final_resolution)):
        _require(value is None or value % factor == 0, key, f"must be a multiple of {what}, got {value}")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


BASE_KEY = "base"
"""Top-level YAML key naming a parent config file (see :func:`load_config`)."""


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in ``path`` merged over its ``base:`` chain (parents first)."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(BASE_KEY, f"circular base chain: {chain}")
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
        empty = _empty_path_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not a plain YAML file (tags are not accepted): {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer past Python's parsing limit, nesting too deep
        raise ConfigError("", f"{path}: cannot be read as YAML: {type(exc).__name__}: {exc}") from None
    if empty:
        raise ConfigError(
            empty[0],
            f"empty value (in {path}); write null explicitly where null is meant"
            + (" (the bundled sample photographs)" if empty[0] == "data.path" else ""),
        )
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: expected a mapping of keys at the top level, got {_show(data)}")
    data = dict(data)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(BASE_KEY, f"expected a file path, got {_show(base)} (in {path})")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = path.parent / base_path  # relative to the file that names it, not the cwd
    if not base_path.exists():
        raise ConfigError(BASE_KEY, f"base config {base_path} does not exist (named in {path})")
    return _deep_merge(_read_yaml_tree(base_path, (*seen, resolved)), data)


# keys whose empty YAML value (`path:` with nothing after it, e.g. a template filled from an unset
# variable) is refused rather than read as null
_PATH_KEYS = (BASE_KEY, "out_dir", "data.path", "model.init_from", "objective.perceptual_weights")


def _empty_path_keys(node: yaml.Node | None, prefix: str = "") -> list[str]:
    """The dotted :data:`_PATH_KEYS` whose value in the composed YAML ``node`` is an empty plain scalar."""
    found: list[str] = []
    if not isinstance(node, yaml.MappingNode):
        return found
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = _join(prefix, key_node.value)
        if isinstance(value_node, yaml.MappingNode) and not prefix:
            found += _empty_path_keys(value_node, key)
        elif (
            key in _PATH_KEYS
            and isinstance(value_node, yaml.ScalarNode)
            and value_node.tag == "tag:yaml.org,2002:null"
            and value_node.value == ""
        ):
            found.append(key)
    return found


def _read_text(path: Path) -> str:
    """The text of config file ``path``: a regular UTF-8 file (a folder or a FIFO is an error, not a hang)."""
    if path.is_dir():
        raise ConfigError("", f"{path}: is a folder, not a config file (expected a YAML file)")
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError("", f"{path}: not a regular file (a FIFO, device or socket?); expected a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot be read: {exc}") from None


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file into a :class:`Config`, then apply ``overrides`` (see :func:`apply_overrides`).

    The file may set any subset of keys; the rest keep their defaults (an empty file is the
    default config). It is parsed with ``yaml.safe_load``: tags such as ``!!python/object`` are
    refused. Errors are :class:`ConfigError` naming the dotted key and the file.

    Inheritance: a top-level ``base: other.yaml`` (a path relative to this file) loads that file
    first and lays this one over it, section by section: a key set here replaces the base's, a
    list replaces the whole list, keys left out keep the base's value (or the default). Bases may
    chain; a cycle is an error. This is how a fine-tuning config stays a short override of a
    training config. The resolved config that :func:`save_config` writes has no ``base`` key.
    """
    path = Path(path)
    data = _read_yaml_tree(path)
    try:
        cfg = from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.detail} (in {path})") from None
    return apply_overrides(cfg, overrides)


class _Dumper(yaml.SafeDumper):
    """Sections as indented blocks, lists on one line: ``block_out_channels: [32, 64, 128]``."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` (every key, defaults included) to ``path`` as YAML.

    ``load_config(path) == cfg``. Parent folders are created; the file is written to a temporary
    name first and then renamed, so a crash never leaves half a config in a run folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# hetvae resolved config: every key, defaults included\n" + yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def model_architecture_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The architecture fields of ``model`` (everything but ``init_from``) as a plain dict, for a model
    built from scratch: an unset (``None``) ``scaling_factor`` / ``shift_factor`` is the
    ``AutoencoderConfig`` default (0.18215 / 0.0)."""
    kwargs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "init_from"}
    unset = [name for name in _LATENT_FACTORS if kwargs[name] is None]
    if unset:
        from hetvae.autoencoder import AutoencoderConfig

        defaults = {f.name: f.default for f in dataclasses.fields(AutoencoderConfig)}
        kwargs.update({name: defaults[name] for name in unset})
    return kwargs


_LATENT_FACTORS = ("scaling_factor", "shift_factor")


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def _head_kwargs(log_scale: LogScaleConfig) -> dict[str, Any]:
    """``AutoencoderConfig`` fields of the per-pixel head described by ``log_scale``."""
    return {
        "log_scale_channels": 1 if log_scale.shared else None,
        "log_scale_init": log_scale.init,
        "log_scale_detach": log_scale.detach_features,
        "log_scale_head_layers": log_scale.head_layers,
        "log_scale_head_channels": log_scale.head_channels,
        "log_scale_head_sees_mean": log_scale.head_sees_mean,
        "log_scale_head_sees_latent": log_scale.head_sees_latent,
        "log_scale_head_sees_edges": log_scale.head_sees_edges,
    }


def build_model(cfg: Config) -> AutoencoderKL:
    """The autoencoder of ``cfg``, in float32 on the CPU, train mode.

    ``model.init_from == "scratch"``: a new ``AutoencoderKL`` from the architecture fields, with
    a per-pixel log-scale head when ``log_scale.granularity == "pixel"`` (``shared`` -> one map,
    bias ``init``, ``detach_features``, ``head_*``), its ResNet blocks starting as the identity with
    ``train.zero_init_residual``, its posterior's log-variance near ``train.init_logvar`` and its
    encoder reading chroma amplified by ``train.init_chroma_gain``.
    Parameters come from torch's global RNG: seed it first.

    Otherwise ``init_from`` is a checkpoint path for ``hetvae.convert.load_autoencoder``; its
    architecture is the checkpoint's, and ``model.scaling_factor`` / ``shift_factor``, when set
    (not ``None``), replace the checkpoint's stored or inferred values. For
    ``"pixel"`` a head stored with the checkpoint is kept (``detach_features`` still applies) and
    a fresh one (zero weights, bias ``init``) is grafted when there is none, so step 0 reproduces
    the pretrained output exactly. For ``"global"`` / ``"channel"`` a stored head is dropped: it
    would receive no gradient. A post-hoc calibration stored with the checkpoint is dropped (with
    a warning): it describes the scale before training.

    Raises:
        FileNotFoundError: ``init_from`` does not exist.
        ConfigError: ``data.resolution`` is not a multiple of a loaded model's down-sampling factor.
    """
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL  # torch stays out of config-only use

    pixel = cfg.log_scale.granularity == "pixel"
    if cfg.model.init_from == "scratch":
        config = AutoencoderConfig(
            **model_architecture_kwargs(cfg.model),
            log_scale="pixel" if pixel else None,
            **(_head_kwargs(cfg.log_scale) if pixel else {}),
        )
        model = AutoencoderKL(config)
        if cfg.train.zero_init_residual:
            model.zero_init_residual()
        if cfg.train.init_logvar is not None:
            model.init_posterior_logvar(cfg.train.init_logvar)
        if cfg.train.init_chroma_gain is not None:
            model.amplify_input_chroma(cfg.train.init_chroma_gain)
        return model.train()

    from hetvae.convert import inspect_checkpoint, load_autoencoder

    path = Path(cfg.model.init_from).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model.init_from: {path} does not exist")
    info = inspect_checkpoint(path)
    # explicit values win over the checkpoint's (an SDXL VAE is inferred as SD 1.x's 0.18215)
    factors = {name: getattr(cfg.model, name) for name in _LATENT_FACTORS if getattr(cfg.model, name) is not None}
    if pixel and info.has_log_scale_head:
        # its trained head is kept: only the detach switch can change
        model = load_autoencoder(path, log_scale_detach=cfg.log_scale.detach_features, **factors)
    elif pixel:
        model = load_autoencoder(path, log_scale="pixel", **_head_kwargs(cfg.log_scale), **factors)
    else:
        model = load_autoencoder(path, **factors)
        if model.has_log_scale_head:
            model.remove_log_scale_head()
    lik = model.config.likelihood
    if lik is not None and lik.calibration is not None:
        # training changes the scale a calibration was fitted to, and the loss needs the raw head
        # output (a calibrated model's decode returns the corrected map): drop it; recalibrate after
        import warnings

        warnings.warn(
            f"{path} carries a post-hoc calibration of its scale; fine-tuning drops it "
            "(run `hetvae calibrate` on the new model)", stacklevel=2,
        )
        model.config = dataclasses.replace(model.config, likelihood=dataclasses.replace(lik, calibration=None))
    factor = model.config.downsample_factor
    _require_crop_sides(cfg, factor, f"the down-sampling factor {factor} of {path}")
    return model.train()


def build_nll(cfg: Config, model: AutoencoderKL) -> HeteroscedasticNLL:
    """The ``HeteroscedasticNLL`` of ``cfg.log_scale`` for ``model``: ``channels`` = the model's output
    channels; for ``"pixel"`` its ``init`` is the model head's bias, which a loaded head may have changed.

    Raises:
        ValueError: ``"pixel"`` granularity but ``model`` has no log-scale head.
    """
    from hetvae.loss import HeteroscedasticNLL

    ls = cfg.log_scale
    init = ls.init
    faithful = ls.faithful and ls.granularity != "global"  # one scale gives the mean that gradient anyway
    if ls.granularity == "pixel":
        if not model.has_log_scale_head:
            raise ValueError(
                "log_scale.granularity is 'pixel' but the model has no log-scale head; build it with build_model(cfg)"
            )
        init = model.config.log_scale_init
    return HeteroscedasticNLL(
        ls.granularity,
        channels=model.config.out_channels,
        family=ls.family,
        init=init,
        include_constant=ls.include_constant,
        beta=ls.beta,
        bounds=ls.bounds,
        fit=ls.fit,
        faithful=faithful,
        trainable=ls.trainable,
        mean_scale=ls.mean_scale if faithful else "map",
        mean_scale_init=ls.init,
    )


def build_objective(cfg: Config, model: AutoencoderKL) -> AutoencoderObjective:
    """The training objective of ``cfg`` for ``model`` (from :func:`build_model`).

    - ``HeteroscedasticNLL`` from the ``log_scale`` section (``channels`` = the model's output
      channels; for ``"pixel"`` its ``init`` is the model head's bias, which a loaded head may
      have changed).
    - ``LPIPS`` when ``objective.perceptual_weight > 0``: ``perceptual_weights`` ``"auto"`` or
      ``"random"`` as in :class:`hetvae.perceptual.LPIPS`; any other value is a local VGG16
      weights file (the calibration then comes from the ``lpips`` package).
    - ``NLayerDiscriminator`` (``disc_layers``, ``disc_norm``) when ``objective.disc_start`` is set.

    Raises:
        ValueError: ``"pixel"`` granularity but ``model`` has no log-scale head.
    """
    from hetvae.discriminator import NLayerDiscriminator
    from hetvae.objective import AutoencoderObjective
    from hetvae.perceptual import LPIPS

    obj = cfg.objective
    nll = build_nll(cfg, model)
    perceptual = None
    if obj.perceptual_weight > 0:
        if obj.perceptual_weights in ("auto", "random"):
            perceptual = LPIPS(weights=obj.perceptual_weights)
        else:
            perceptual = LPIPS(weights="auto", vgg_path=obj.perceptual_weights)
    discriminator = None
    if obj.disc_start is not None:
        discriminator = NLayerDiscriminator(
            in_channels=model.config.out_channels, n_layers=obj.disc_layers, norm=obj.disc_norm
        )
    return AutoencoderObjective(
        nll=nll,
        perceptual=perceptual,
        perceptual_weight=obj.perceptual_weight,
        perceptual_mode=obj.perceptual_mode,
        kl_weight=obj.kl_weight,
        discriminator=discriminator,
        disc_start=obj.disc_start if obj.disc_start is not None else 0,
        disc_factor=obj.disc_factor,
        disc_weight=obj.disc_weight,
        disc_loss=obj.disc_loss,
    )
