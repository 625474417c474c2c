"""Every checkpoint format in one place: detection, key renaming, config inference, safe I/O.

Formats read by ``load_autoencoder``:

* ``"hetvae"``: ``model.safetensors`` (a directory holding it, or the file itself) in the internal
  key layout, its ``AutoencoderConfig`` as JSON in the safetensors metadata (``hetvae_config``).
* ``"diffusers"``: a folder with ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors``
  or ``.bin`` (also a pipeline folder, whose ``vae/`` sub-folder is used); diffusers' ``variant``
  and ``use_safetensors`` choose among them.
* ``"ldm"``: one file in the original Stable Diffusion layout (``encoder.down.0.block.0...``),
  ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (or a folder holding the
  ``vae.safetensors`` an ldm export writes), possibly nested under
  ``"state_dict"`` and prefixed ``first_stage_model.`` or ``vae.`` (the rest of a full SD
  checkpoint is ignored); attention weights as 1x1 convolutions or linear matrices.
* ``"diffusers-file"``: one file in the diffusers key layout (``encoder.down_blocks.0...``),
  including the old attention names ``query/key/value/proj_attn``.

Each of them may also be named by a Hugging Face Hub id (``org/name``, ``org/name/vae``,
``org/name/file.safetensors``, ``@revision``), fetched or read from the cache by
:func:`hetvae.hub.resolve_model`.

Single files carry no config: the architecture is inferred from tensor shapes and the latent
scaling from the detected family (see ``FAMILIES``); any field can be overridden.

A per-pixel log-scale head is stored inside hetvae files and beside exported ones
(``log_scale_head.safetensors`` in a diffusers folder, ``<stem>.log_scale_head.safetensors`` next
to an ldm file), so stock loaders still read the VAE and nothing is lost.

The reconstruction likelihood the model was trained with (``AutoencoderConfig.likelihood``:
family, granularity, bounds, learned global/channel values) rides in the config of every format:
the ``hetvae_config`` metadata of hetvae and ldm files, ``_hetvae_likelihood`` in a diffusers
``config.json`` (diffusers ignores keys starting with ``_``). ``store_likelihood`` replaces it in
place and changes nothing else: a diffusers folder's ``config.json`` only, or a safetensors file's
header with every tensor's bytes kept.

Internal names are the ldm ones; all renaming lives here. Pickled files are read only through
``torch.load(weights_only=True)``; every failure raises ``CheckpointError`` naming the file, the
detected format and the offending keys.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.files import (
    TEMPORARY,
    CheckpointError,
    Terminated,
    fsync_dir,
    remove_stale_temporaries,
    signals_raise,
    write_atomically,
)
from hetvae.hub import resolve_model
from hetvae.likelihood import (
    Likelihood,
    grafted_record,
    is_int,
    is_number,
    likelihood_from_nll,
)
from hetvae.pickles import load_weights_only

FORMATS = ("hetvae", "diffusers", "ldm")
CONFIG_KEY = "hetvae_config"
FORMAT_KEY = "hetvae_format"
HEAD_KEY = "hetvae_log_scale_head"
HEAD_PREFIX = "decoder.log_scale_head."
TRUNK_PREFIX = "decoder.log_scale_trunk."  # the head's optional hidden layers
HETVAE_FILE = "model.safetensors"
LDM_FILE = "vae.safetensors"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_LIKELIHOOD_KEY = "_hetvae_likelihood"  # diffusers ignores config keys starting with "_"
# Written as `_diffusers_version` when diffusers is not installed: the oldest release whose
# AutoencoderKL reads every key we write (shift_factor, latents_mean/std, use_quant_conv, ...).
FALLBACK_DIFFUSERS_VERSION = "0.30.0"
DIFFUSERS_HEAD_FILE = "log_scale_head.safetensors"
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Where the VAE sits inside a full checkpoint; everything else in such a file is ignored.
MODEL_PREFIXES = ("first_stage_model.", "vae.")
# Training leftovers in ldm VAE checkpoints (LPIPS/discriminator/logvar of the loss, EMA counters).
IGNORED_PREFIXES = ("loss.", "model_ema.")

# family -> (scaling_factor, shift_factor), used when the file has no config.
FAMILIES = {
    "sd": (0.18215, 0.0),  # 4 latent channels: SD 1.x/2.x (SDXL 0.13025 looks identical: override)
    "sd3": (1.5305, 0.0609),  # 16 latent channels, no quant convs (FLUX 0.3611/0.1159 looks identical)
    "unknown": (1.0, 0.0),
}

_SHOWN_KEYS = 5


def _keys_text(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    more = f", ... ({len(keys)} keys in all)" if len(keys) > _SHOWN_KEYS else f" ({len(keys)} key{'s' * (len(keys) != 1)})"
    return shown + more


def _error(file: Path, fmt: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{file}: {problem} [detected format: {fmt}]")


# --- reading -------------------------------------------------------------------------------


def _read_safetensors(
    file: Path, fmt: str, select: Callable[[list[str]], list[str]] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            wanted = select(keys) if select else keys
            return {k: f.get_tensor(k) for k in wanted}, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _error(file, fmt, f"cannot read the safetensors file, it is truncated or corrupt ({e})") from e


def _read_pickle(file: Path, fmt: str) -> dict[str, Tensor]:
    try:
        obj = load_weights_only(file)
    except ValueError as e:  # UnsafePickleError included: refused as code, or damaged
        raise _error(file, fmt, str(e)) from e
    # Lightning checkpoints nest the weights beside optimizer state and counters.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _error(file, fmt, f"expected a state dict, found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _select_vae(keys: list[str]) -> list[str]:
    """The keys of the VAE: those under the first model prefix present, else all but training leftovers."""
    for prefix in MODEL_PREFIXES:
        found = [k for k in keys if k.startswith(prefix)]
        if found:
            return found
    return [k for k in keys if not k.startswith(IGNORED_PREFIXES)]


def _strip_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in MODEL_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}


def _key_layout(keys: Iterable[str]) -> str | None:
    """"ldm", "diffusers", or None for neither or a mix of both."""
    keys = list(keys)
    diffusers = any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.", k) for k in keys)
    ldm = any(re.match(r"(encoder\.down|decoder\.up|encoder\.mid|decoder\.mid|encoder\.norm_out|decoder\.norm_out)\.", k) for k in keys)
    if diffusers == ldm:
        return None
    return "diffusers" if diffusers else "ldm"


# --- key maps ------------------------------------------------------------------------------

_Rule = tuple[str, Callable[[re.Match, int], str]]

_DIFFUSERS_TO_LDM: list[_Rule] = [
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m, n: f"encoder.down.{m[1]}.downsample."),
    # diffusers lists decoder levels from the lowest resolution, ldm from the highest.
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m, n: f"{m[1]}.mid.attn_1."),
    (r"(encoder|decoder)\.conv_norm_out\.", lambda m, n: f"{m[1]}.norm_out."),
]
_DIFFUSERS_TO_LDM_LEAF = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    # diffusers < 0.14 attention names
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
_LDM_TO_DIFFUSERS: list[_Rule] = [
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (r"encoder\.down\.(\d+)\.downsample\.", lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}."),
    (r"decoder\.up\.(\d+)\.upsample\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0."),
    (r"(encoder|decoder)\.mid\.block_(\d+)\.", lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"(encoder|decoder)\.mid\.attn_1\.", lambda m, n: f"{m[1]}.mid_block.attentions.0."),
    (r"(encoder|decoder)\.norm_out\.", lambda m, n: f"{m[1]}.conv_norm_out."),
]
_LDM_TO_DIFFUSERS_LEAF = {
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
}
_LDM_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_DIFFUSERS_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _rename(key: str, rules: list[_Rule], leaf: dict[str, str], num_levels: int) -> str:
    for pattern, replace in rules:
        m = re.match(pattern, key)
        if m:
            rest = key[m.end():]
            for old, new in leaf.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return replace(m, num_levels) + rest
    return key  # unmapped keys surface as "unexpected" in the strict check


def _num_levels(keys: Iterable[str], pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def diffusers_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers key layout -> internal (ldm) layout; linear attention weights become 1x1 convs."""
    levels = _num_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    out = {_rename(k, _DIFFUSERS_TO_LDM, _DIFFUSERS_TO_LDM_LEAF, levels): v for k, v in state_dict.items()}
    return _attention_as_conv(out)


def ldm_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Internal (ldm) layout -> diffusers layout; attention weights become linear ``(C, C)``."""
    levels = _num_levels(state_dict, r"decoder\.up\.(\d+)\.")
    out = {}
    for k, v in state_dict.items():
        k = _rename(k, _LDM_TO_DIFFUSERS, _LDM_TO_DIFFUSERS_LEAF, levels)
        out[k] = v[:, :, 0, 0] if _DIFFUSERS_ATTN_WEIGHT.fullmatch(k) and v.ndim == 4 else v
    return out


def _attention_as_conv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        k: v[:, :, None, None] if _LDM_ATTN_WEIGHT.fullmatch(k) and v.ndim == 2 else v
        for k, v in state_dict.items()
    }


# --- configs -------------------------------------------------------------------------------


def family_of(latent_channels: int, use_quant_conv: bool) -> str:
    """``"sd"`` for 4 latent channels, ``"sd3"`` for 16 without quant convs, else ``"unknown"``."""
    if latent_channels == 4:
        return "sd"
    if latent_channels == 16 and not use_quant_conv:
        return "sd3"
    return "unknown"


def infer_config(state_dict: dict[str, Tensor]) -> AutoencoderConfig:
    """Architecture from the shapes of an internal-layout state dict.

    GroupNorm leaves no trace of its group count in the weights: 32 (every SD-family VAE) is
    assumed when it divides all widths, else the largest common divisor. Scaling and shift come
    from ``FAMILIES``. Raises ``KeyError`` naming a tensor the inference needs.
    """
    sd = state_dict
    levels = _num_levels(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise KeyError("encoder.down.0.block.0.conv1.weight")
    channels = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    layers = _num_levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    out_channels = int(sd["decoder.conv_out.weight"].shape[0])
    use_quant = "quant_conv.weight" in sd
    groups = 32 if all(c % 32 == 0 for c in channels) else math.gcd(32, *channels)
    scaling, shift = FAMILIES[family_of(latent, use_quant)]
    return AutoencoderConfig(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=out_channels,
        block_out_channels=channels,
        layers_per_block=layers,
        norm_num_groups=groups,
        latent_channels=latent,
        use_quant_conv=use_quant,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_attention=any(k.startswith("encoder.mid.attn_1.") for k in sd),
        scaling_factor=scaling,
        shift_factor=shift,
        **head_fields(sd),
    )


def is_head_key(key: str) -> bool:
    """Whether ``key`` belongs to the per-pixel log-scale head (its output conv or hidden layers)."""
    return key.startswith((HEAD_PREFIX, TRUNK_PREFIX))


def trunk_indices(keys: Iterable[str]) -> list[int]:
    """Sorted indices ``i`` of the head's trunk convolutions (``decoder.log_scale_trunk.<i>.weight``)."""
    return sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(re.escape(TRUNK_PREFIX) + r"(\d+)\.weight", k)))


def head_settings(metadata: dict[str, str]) -> dict[str, Any]:
    """A head file's recorded settings: its ``HEAD_KEY`` metadata, a JSON object (``{}`` when the
    file records none). ``ValueError`` naming the key when it is not valid JSON or not an object."""
    text = metadata.get(HEAD_KEY)
    if text is None:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid {HEAD_KEY} metadata ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"invalid {HEAD_KEY} metadata: expected a JSON object, got {text[:60]!r}")
    return settings


def head_inputs(config: AutoencoderConfig) -> dict[str, bool]:
    """What ``config``'s head reads besides the features, under the names a head file records
    (``sees_mean``, ``sees_latent``, ``sees_edges``; :func:`head_fields` reads them back)."""
    return {"sees_mean": config.log_scale_head_sees_mean, "sees_latent": config.log_scale_head_sees_latent,
            "sees_edges": config.log_scale_head_sees_edges}


def head_fields(state_dict: dict[str, Tensor], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``AutoencoderConfig`` head fields read off the tensors' names and shapes: whether there is
    a head, its map count, hidden layers and width, and what else its first layer reads besides
    ``conv_out``'s input features: the mean output (``out_channels`` more channels) and the latent
    (``decoder.conv_in``'s input channels more) and the mean's edge magnitude (``out_channels``
    more). ``settings`` (a head file's recorded ``sees_mean`` / ``sees_latent`` / ``sees_edges``)
    decide where the shapes cannot: read without them, the older option wins (the mean before the
    edges, the mean before a latent with as many channels as the image).
    ``ValueError`` when the first layer's width fits no combination."""
    head = state_dict.get(HEAD_PREFIX + "weight")
    if head is None:
        return dict(log_scale=None)
    features = int(state_dict["decoder.conv_out.weight"].shape[1])
    out_channels = int(state_dict["decoder.conv_out.weight"].shape[0])
    latent = int(state_dict["decoder.conv_in.weight"].shape[1]) if "decoder.conv_in.weight" in state_dict else None
    trunk = trunk_indices(state_dict)
    first = f"{TRUNK_PREFIX}{trunk[0]}.weight" if trunk else HEAD_PREFIX + "weight"
    first_in = int(state_dict[first].shape[1])
    # in order of preference: the options as they were added (edges last)
    options = [(m, z, e) for e in (False, True) for z in (False, True) for m in (False, True)]
    fits = [(m, z, e) for m, z, e in options
            if features + (out_channels if m else 0) + ((latent or 0) if z else 0) + (out_channels if e else 0) == first_in
            and (latent or not z)]
    settings = settings or {}
    recorded = [f for f in fits if all(settings.get(k, v) == v for k, v in zip(("sees_mean", "sees_latent", "sees_edges"), f))]
    if not recorded:
        expected = f"{features} (features) + {out_channels} if it reads the mean" + (
            f" + {latent} if it reads the latent" if latent else "") + f" + {out_channels} if it reads the edges"
        raise ValueError(f"{first} takes {first_in} input channels; expected {expected}"
                         + (f" (recorded: {settings})" if settings else ""))
    sees_mean, sees_latent, sees_edges = recorded[0]
    # a head that also predicts the colour coupling has C (C - 1) / 2 maps after its C log-scales
    maps = int(head.shape[0])
    coupling = out_channels >= 2 and maps == out_channels + out_channels * (out_channels - 1) // 2
    if settings.get("coupling", coupling) != coupling:
        raise ValueError(f"{HEAD_PREFIX}weight has {maps} maps, which does not fit the recorded coupling "
                         f"{settings.get('coupling')!r} of {out_channels} channels")
    return dict(
        log_scale="pixel",
        log_scale_channels=None if maps == out_channels or coupling else maps,
        **({"log_scale_coupling": True} if coupling else {}),
        log_scale_head_layers=len(trunk),
        log_scale_head_channels=int(head.shape[1]) if trunk else None,
        log_scale_head_sees_mean=sees_mean,
        log_scale_head_sees_latent=sees_latent,
        log_scale_head_sees_edges=sees_edges,
    )


# diffusers' own defaults, for config.json files written before a key existed.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=4,
    norm_num_groups=32, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
    use_post_quant_conv=True, mid_block_add_attention=True, act_fn="silu", sample_size=32,
    force_upcast=True, latents_mean=None, latents_std=None,
)


def _positive_int(v: Any) -> bool:
    return is_int(v) and v >= 1


def _numbers(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or (isinstance(v, list) and len(v) == n and all(map(is_number, v))),
            f"null or a list of {n} numbers (one per latent channel)")


# config.json key -> (accepts the value?, what is expected); checked before anything is built
_DIFFUSERS_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_positive_int, "a positive integer")
       for k in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups")},
    "block_out_channels": (lambda v: isinstance(v, (list, tuple)) and bool(v) and all(map(_positive_int, v)),
                           "a list of positive integers"),
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast")},
    "scaling_factor": (is_number, "a number"),
    "shift_factor": (lambda v: v is None or is_number(v), "a number or null"),
    "sample_size": (lambda v: _positive_int(v) or (isinstance(v, list) and bool(v) and all(map(_positive_int, v))),
                    "a positive integer or a list of them"),
    "act_fn": (lambda v: isinstance(v, str), "a string"),
    "down_block_types": (lambda v: isinstance(v, list), "a list of block names"),
    "up_block_types": (lambda v: isinstance(v, list), "a list of block names"),
    DIFFUSERS_LIKELIHOOD_KEY: (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
}


def config_from_diffusers(data: dict[str, Any], file: Path) -> AutoencoderConfig:
    """``AutoencoderConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Every key is type-checked first (a ``CheckpointError`` names the key, its value and what is
    expected); keys absent from ``data`` take diffusers' own defaults. ``sample_size``,
    ``force_upcast``, ``latents_mean`` / ``latents_std`` and hetvae's ``_hetvae_likelihood`` are kept,
    so :func:`config_to_diffusers` writes them back unchanged.
    """
    if not isinstance(data, dict):
        raise _error(file, "diffusers", f"the config must be a JSON object, got {type(data).__name__}")
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _error(file, "diffusers", f"unsupported config: _class_name is {data['_class_name']!r}, only 'AutoencoderKL' is supported")
    d = {**_DIFFUSERS_DEFAULTS, **data}
    checks = dict(_DIFFUSERS_TYPES)
    if _positive_int(d["latent_channels"]):
        checks["latents_mean"] = checks["latents_std"] = _numbers(d["latent_channels"])
    problems = [f"{key} is {d[key]!r}, expected {what}" for key, (ok, what) in checks.items() if key in d and not ok(d[key])]
    if problems:
        raise _error(file, "diffusers", "invalid config: " + "; ".join(problems))
    if d["act_fn"] != "silu":
        problems.append(f"act_fn is {d['act_fn']!r}, only 'silu' is supported")
    levels = len(d["block_out_channels"])
    for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(name, [kind] * levels))
        if types != [kind] * levels:
            problems.append(f"{name} is {types}, expected {levels} x {kind!r}")
    if problems:
        raise _error(file, "diffusers", "unsupported config: " + "; ".join(problems))
    try:
        return AutoencoderConfig(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d["layers_per_block"],
            norm_num_groups=d["norm_num_groups"],
            latent_channels=d["latent_channels"],
            use_quant_conv=d["use_quant_conv"],
            use_post_quant_conv=d["use_post_quant_conv"],
            mid_block_attention=d["mid_block_add_attention"],
            scaling_factor=float(d["scaling_factor"]),
            shift_factor=float(d["shift_factor"] or 0.0),
            sample_size=d["sample_size"],
            force_upcast=d["force_upcast"],
            latents_mean=d["latents_mean"],
            latents_std=d["latents_std"],
            likelihood=d.get(DIFFUSERS_LIKELIHOOD_KEY),
        )
    except (ValueError, TypeError) as e:
        raise _error(file, "diffusers", f"invalid config ({e})") from e


def installed_diffusers_version() -> str:
    """The installed diffusers version (read from its package metadata, without importing it), or
    ``FALLBACK_DIFFUSERS_VERSION`` when diffusers is not installed."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_DIFFUSERS_VERSION


def config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """The ``config.json`` diffusers writes for this architecture (the head is not part of it), plus
    the likelihood under ``_hetvae_likelihood``, a key diffusers ignores."""
    levels = len(config.block_out_channels)
    size = config.sample_size
    out = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": installed_diffusers_version(),
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": list(size) if isinstance(size, tuple) else size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor or None,
        "latents_mean": None if config.latents_mean is None else list(config.latents_mean),
        "latents_std": None if config.latents_std is None else list(config.latents_std),
        "force_upcast": config.force_upcast,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_attention,
    }
    if config.likelihood is not None:
        out[DIFFUSERS_LIKELIHOOD_KEY] = dataclasses.asdict(config.likelihood)
    return out


def config_from_metadata(text: str, file: Path, fmt: str) -> AutoencoderConfig:
    try:
        return AutoencoderConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise _error(file, fmt, f"the embedded {CONFIG_KEY} metadata is not a valid config ({e})") from e


# --- detection -----------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What ``inspect_checkpoint`` found. ``format``: "hetvae", "diffusers", "ldm" or
    "diffusers-file"; ``config_source``: "config.json", "file metadata" or "inferred from tensor
    shapes"; ``head_file``: the sidecar the head was read from (None when inside or absent);
    ``scaling_source``: where ``scaling_factor`` and ``shift_factor`` came from ("config.json",
    "default (absent from config.json)", "file metadata" or "inferred from the family '...'")."""

    path: Path
    format: str
    weights_file: Path
    config: AutoencoderConfig
    config_source: str
    family: str
    head_file: Path | None
    num_parameters: int
    scaling_source: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_log_scale_head(self) -> bool:
        return self.config.log_scale == "pixel"


def head_sidecar_path(weights_file: Path, fmt: str) -> Path:
    """Where an exported model's log-scale head lives, beside its weights file."""
    if fmt == "diffusers":
        return weights_file.parent / DIFFUSERS_HEAD_FILE
    return weights_file.with_name(weights_file.stem + ".log_scale_head.safetensors")


_DIFFUSERS_STEM = "diffusion_pytorch_model"
_VARIANT = re.compile(r"[A-Za-z0-9_-]+")


def _check_weights_choice(variant: Any, use_safetensors: Any) -> None:
    """Refuse a ``variant`` that is not a plain name (``fp16``, ``ema``) and a ``use_safetensors``
    that is not None, True or False (diffusers' arguments of the same names)."""
    if variant is not None and not (isinstance(variant, str) and _VARIANT.fullmatch(variant)):
        raise ValueError(f"variant must be None or a name of letters, digits, '_' and '-' (e.g. 'fp16'), got {variant!r}")
    if use_safetensors is not None and not isinstance(use_safetensors, bool):
        raise ValueError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def diffusers_weight_names(variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The names a diffusers folder's weights file may have, in the order they are looked for.
    ``variant=None``: the plain file first, then the fp16 one (a variant-only folder loads too);
    ``variant="v"``: ``diffusion_pytorch_model.v.safetensors`` / ``.v.bin``, as diffusers reads
    them. ``use_safetensors`` True keeps only ``.safetensors``, False only ``.bin``."""
    if variant is None:
        names = list(DIFFUSERS_WEIGHTS)
    else:
        names = [f"{_DIFFUSERS_STEM}.{variant}.safetensors", f"{_DIFFUSERS_STEM}.{variant}.bin"]
    if use_safetensors is not None:
        names = [n for n in names if n.endswith(".safetensors") == use_safetensors]
    return names


def _no_weights(folder: Path, variant: str | None, use_safetensors: bool | None) -> CheckpointError:
    names = diffusers_weight_names(variant, use_safetensors)
    present = sorted(p.name for p in folder.iterdir())
    asked = ", ".join(f"{k}={v!r}" for k, v in (("variant", variant), ("use_safetensors", use_safetensors)) if v is not None)
    pattern = re.compile(re.escape(_DIFFUSERS_STEM) + r"\.([A-Za-z0-9_-]+)\.(safetensors|bin)")
    variants = sorted({m.group(1) for m in map(pattern.fullmatch, present) if m} - {variant})
    hint = f"; the variant(s) there: {', '.join(f'variant={v!r}' for v in variants)}" if variants else ""
    return _error(
        folder, "diffusers",
        f"{DIFFUSERS_CONFIG} but no weights: no {_either(names)}{f' ({asked})' if asked else ''}; "
        f"files present: {_keys_text(present)}{hint}",
    )


def _check_single(path: Path, file: Path, what: str, variant: str | None, use_safetensors: bool | None) -> None:
    """A weights file that is not a diffusers folder's: ``variant`` does not apply, and
    ``use_safetensors`` must agree with the file's kind."""
    if variant is not None:
        raise ValueError(
            f"variant applies to a diffusers folder's weights; {path} is {what} ({file.name}): leave variant out"
        )
    if use_safetensors is None:
        return
    safe = file.suffix.lower() == ".safetensors"
    if safe != use_safetensors:
        kind, asked = ("a safetensors", "pickled (.bin)") if safe else ("a pickle", "safetensors")
        raise ValueError(f"use_safetensors={use_safetensors} asks for {asked} weights, but {file} is {kind} file")


def _locate(path: Path, variant: str | None = None, use_safetensors: bool | None = None) -> tuple[Path, Path | None]:
    """``(weights file, diffusers config.json or None)``; ``variant`` and ``use_safetensors`` choose
    a diffusers folder's weights (:func:`diffusers_weight_names`)."""
    _check_weights_choice(variant, use_safetensors)
    if path.is_dir():
        if (path / HETVAE_FILE).is_file():
            _check_single(path, path / HETVAE_FILE, "a hetvae model", variant, use_safetensors)
            return path / HETVAE_FILE, None
        for folder in (path, path / "vae"):
            if (folder / DIFFUSERS_CONFIG).is_file():
                for name in diffusers_weight_names(variant, use_safetensors):
                    if (folder / name).is_file():
                        return folder / name, folder / DIFFUSERS_CONFIG
                raise _no_weights(folder, variant, use_safetensors)
        if (path / LDM_FILE).is_file():  # what `save_pretrained(DIR, format="ldm")` writes
            _check_single(path, path / LDM_FILE, "an ldm model", variant, use_safetensors)
            return path / LDM_FILE, None
        raise _error(
            path, "unknown",
            f"a directory with neither {HETVAE_FILE} (hetvae), {DIFFUSERS_CONFIG} (diffusers) nor {LDM_FILE} (ldm); "
            f"files present: {_keys_text(sorted(p.name for p in path.iterdir()))}",
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    _check_single(path, path, "a single model file", variant, use_safetensors)
    return path, None


def expected_head_file(path: str | Path) -> Path:
    """Where the log-scale head of the exported model at ``path`` lives (or would live)."""
    file, config_file = _locate(Path(path))
    return head_sidecar_path(file, "diffusers" if config_file is not None else "ldm")


def _read_diffusers_folder(
    file: Path, config_file: Path
) -> tuple[dict[str, Tensor], AutoencoderConfig, dict[str, str]]:
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(config_file, "diffusers", f"cannot read the config ({e})") from e
    config = config_from_diffusers(data, config_file)
    scaling = {k: DIFFUSERS_CONFIG if k in data else f"default (absent from {DIFFUSERS_CONFIG})"
               for k in ("scaling_factor", "shift_factor")}
    if file.suffix == ".safetensors":
        tensors, _ = _read_safetensors(file, "diffusers")
    else:
        tensors = _read_pickle(file, "diffusers")
    if _key_layout(tensors) != "diffusers":
        raise _error(file, "diffusers", f"the weights are not in the diffusers AutoencoderKL layout; keys: {_keys_text(tensors)}")
    return diffusers_to_ldm(tensors), config, scaling


def _read_single_file(file: Path) -> tuple[dict[str, Tensor], str, AutoencoderConfig, str]:
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        # Reads only the VAE's tensors out of a full SD checkpoint.
        tensors, metadata = _read_safetensors(file, "single file", select=_select_vae)
    elif suffix in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle(file, "single file (pickle)"), {}
    else:
        raise _error(file, "unknown", f"unknown file type {suffix!r}: expected .safetensors or one of {list(PICKLE_SUFFIXES)}")
    tensors = _strip_prefix(tensors)
    layout = _key_layout(tensors)
    fmt = metadata.get(FORMAT_KEY) or {"ldm": "ldm", "diffusers": "diffusers-file"}.get(layout, "unknown")
    if layout is None:
        raise _error(
            file, fmt,
            "unknown key layout: neither the original SD names (encoder.down.N.block.M...) nor the diffusers "
            f"names (encoder.down_blocks.N.resnets.M...) of an AutoencoderKL; keys: {_keys_text(tensors)}",
        )
    sd = diffusers_to_ldm(tensors) if layout == "diffusers" else _attention_as_conv(tensors)
    if CONFIG_KEY in metadata:
        return sd, fmt, config_from_metadata(metadata[CONFIG_KEY], file, fmt), "file metadata"
    if fmt == "hetvae":
        raise _error(file, fmt, f"the {CONFIG_KEY} metadata is missing")
    try:
        config = infer_config(sd)
    except KeyError as e:
        raise _error(
            file, fmt, f"cannot infer the architecture: tensor {e} is missing; keys: {_keys_text(sd)}"
        ) from e
    except ValueError as e:
        raise _error(file, fmt, f"cannot infer the architecture ({e})") from e
    return sd, fmt, config, "inferred from tensor shapes"


def _read_head(
    file: Path, config: AutoencoderConfig, body: dict[str, Tensor]
) -> tuple[dict[str, Tensor], AutoencoderConfig]:
    tensors, metadata = _read_safetensors(file, "log-scale head")
    required = {HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"}
    if not required <= set(tensors) or not all(is_head_key(k) for k in tensors):
        raise _error(
            file, "log-scale head",
            f"expected {sorted(required)} and optionally {TRUNK_PREFIX}N.weight/bias; keys: {_keys_text(sorted(tensors))}",
        )
    try:
        settings = head_settings(metadata)
        shapes = {k: body[k] for k in ("decoder.conv_out.weight", "decoder.conv_in.weight") if k in body}
        fields = head_fields({**tensors, **shapes}, settings)
        config = dataclasses.replace(
            config,
            **fields,
            log_scale_init=float(settings.get("init", 0.0)),
            log_scale_detach=bool(settings.get("detach", False)),
        )
    except (ValueError, TypeError) as e:
        raise _error(file, "log-scale head", f"invalid head ({e})") from e
    return tensors, config


def read_model_file(
    path: str | Path, *, variant: str | None = None, use_safetensors: bool | None = None
) -> tuple[CheckpointInfo, dict[str, Tensor]]:
    """The model at ``path`` (its :class:`CheckpointInfo`) and its tensors, in the internal layout;
    ``variant`` / ``use_safetensors`` choose a diffusers folder's weights file (:func:`_locate`).
    ``path`` may be a Hugging Face Hub id (:func:`hetvae.hub.resolve_model`)."""
    _check_weights_choice(variant, use_safetensors)
    path = resolve_model(path, variant=variant)
    file, config_file = _locate(path, variant, use_safetensors)
    if config_file is not None:
        sd, config, scaling = _read_diffusers_folder(file, config_file)
        fmt, source = "diffusers", "config.json"
    else:
        sd, fmt, config, source = _read_single_file(file)
        origin = source if source == "file metadata" else (
            f"inferred from the family {family_of(config.latent_channels, config.use_quant_conv)!r}"
        )
        scaling = {"scaling_factor": origin, "shift_factor": origin}
    head_file = None
    if fmt != "hetvae":
        sidecar = head_sidecar_path(file, fmt)
        if sidecar.is_file():
            head, config = _read_head(sidecar, config, sd)
            sd.update(head)
            head_file = sidecar
    info = CheckpointInfo(
        path=path,
        format=fmt,
        weights_file=file,
        config=config,
        config_source=source,
        family=family_of(config.latent_channels, config.use_quant_conv),
        head_file=head_file,
        num_parameters=sum(v.numel() for v in sd.values()),
        scaling_source=scaling,
    )
    return info, sd


def inspect_checkpoint(
    path: str | Path, *, variant: str | None = None, use_safetensors: bool | None = None
) -> CheckpointInfo:
    """Detect the format of ``path`` and read (or infer) its config, without building a model
    (``variant`` / ``use_safetensors`` as in :func:`load_autoencoder`)."""
    return read_model_file(path, variant=variant, use_safetensors=use_safetensors)[0]


# --- loading -------------------------------------------------------------------------------

_HEAD_FIELDS = (
    "log_scale_channels", "log_scale_init", "log_scale_detach", "log_scale_head_layers",
    "log_scale_head_channels", "log_scale_head_sees_mean", "log_scale_head_sees_latent",
    "log_scale_head_sees_edges", "log_scale_coupling",
)
_HEAD_SHAPE_FIELDS = tuple(f for f in _HEAD_FIELDS if f != "log_scale_detach")


def _check_fit(config: AutoencoderConfig, sd: dict[str, Tensor], info: CheckpointInfo) -> None:
    """Compare the key set and shapes of ``config``'s model with the stored tensors on the meta
    device, so a config that declares a huge architecture costs nothing before it is refused."""
    with torch.device("meta"):
        skeleton = AutoencoderKL(config)
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    where = f"config {info.config_source}"
    if missing or unexpected:
        parts = [f"missing keys: {_keys_text(missing)}"] if missing else []
        parts += [f"unexpected keys: {_keys_text(unexpected)}"] if unexpected else []
        raise _error(info.weights_file, info.format, f"the weights do not fit the architecture ({where}); " + "; ".join(parts))
    wrong = [f"{k} file {tuple(sd[k].shape)} != model {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise _error(info.weights_file, info.format, f"shape mismatch ({where}); keys: {_keys_text(wrong)}")


def load_autoencoder(
    path: str | Path,
    log_scale: str | None = None,
    *,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    **overrides: Any,
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from any supported format (see the module docstring), at a local
    path or a Hugging Face Hub id (``org/name``, ``org/name/vae``, ``org/name/file.safetensors``,
    ``@revision``: :func:`hetvae.hub.resolve_model`; ``variant`` fetches that weights file).

    ``log_scale``: None keeps what the checkpoint has (a head stored inside or beside it is loaded);
    ``"pixel"`` also grafts a fresh head (zero weights, bias ``log_scale_init``) when there is
    none, so the mean output is unchanged; the recorded likelihood then becomes the per-pixel one
    (family, bounds and margin kept) and a calibration stored with it is dropped with a
    :class:`hetvae.likelihood.CalibrationDropped` warning (it was fitted for the scale the head replaces).
    ``overrides``: ``AutoencoderConfig`` fields replacing the stored or inferred ones, e.g.
    ``scaling_factor``, ``shift_factor``, ``norm_num_groups``; ``log_scale_channels`` and
    ``log_scale_init`` shape a grafted head, ``log_scale_detach`` applies to any head.
    ``variant`` and ``use_safetensors`` choose a diffusers folder's weights file as diffusers does
    (:func:`diffusers_weight_names`): ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16
    .safetensors`` (or ``.fp16.bin``), ``use_safetensors`` True / False only ``.safetensors`` /
    ``.bin`` weights; without them the plain file is read, else the fp16 one. ``variant`` is refused
    for any other format, and ``use_safetensors`` when the file is not of that kind.
    The model comes back in float32, eval mode, on the CPU.
    """
    if log_scale not in (None, "pixel"):
        raise ValueError(f"log_scale must be None or 'pixel', got {log_scale!r}")
    valid = {f.name for f in dataclasses.fields(AutoencoderConfig)} - {"log_scale"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; valid: {sorted(valid)}")
    info, sd = read_model_file(path, variant=variant, use_safetensors=use_safetensors)
    head_overrides = {k: overrides.pop(k) for k in _HEAD_FIELDS if k in overrides}
    config = dataclasses.replace(info.config, **overrides)
    has_head = config.log_scale == "pixel"
    if has_head:
        asked = head_overrides.get("log_scale_channels", config.log_scale_channels) or config.out_channels
        shaping = sorted(k for k in head_overrides if k in _HEAD_SHAPE_FIELDS and k != "log_scale_channels")
        if asked != config.head_channels or shaping:
            raise ValueError(
                f"{info.weights_file} already has a trained log-scale head ({config.head_channels} maps); "
                f"{', '.join(_HEAD_SHAPE_FIELDS)} only shape a newly grafted head"
                + (f" (got {', '.join(shaping)})" if shaping else "")
            )
        if "log_scale_detach" in head_overrides:
            config = dataclasses.replace(config, log_scale_detach=bool(head_overrides["log_scale_detach"]))
    elif head_overrides and log_scale != "pixel":
        raise ValueError(f"{sorted(head_overrides)} given but no head is loaded or grafted: pass log_scale='pixel'")
    if log_scale == "pixel" and not has_head and config.likelihood is not None:
        # the fresh head is the model's scale now: the record becomes the per-pixel one, and a
        # calibration fitted for the old scale (or for a head the file lost) goes, with a note
        init = head_overrides.get("log_scale_init", 0.0)
        config = dataclasses.replace(config, likelihood=grafted_record(config.likelihood, init))
    _check_fit(config, sd, info)  # before anything the config declares is allocated
    model = AutoencoderKL(config)
    model.load_state_dict(sd, strict=True)
    if log_scale == "pixel" and not has_head:
        model.add_log_scale_head(
            channels=head_overrides.get("log_scale_channels"),
            init=head_overrides.get("log_scale_init", 0.0),
            detach=head_overrides.get("log_scale_detach", False),
            layers=head_overrides.get("log_scale_head_layers", 0),
            hidden=head_overrides.get("log_scale_head_channels"),
            sees_mean=head_overrides.get("log_scale_head_sees_mean", False),
            sees_latent=head_overrides.get("log_scale_head_sees_latent", False),
            sees_edges=head_overrides.get("log_scale_head_sees_edges", False),
            coupling=head_overrides.get("log_scale_coupling", False),
        )
    return model.eval()


# --- saving --------------------------------------------------------------------------------


def _model_files(folder: Path) -> list[Path]:
    """The model files of every format found directly in ``folder``."""
    names = (HETVAE_FILE, DIFFUSERS_CONFIG, *DIFFUSERS_WEIGHTS, DIFFUSERS_HEAD_FILE, LDM_FILE,
             head_sidecar_path(folder / LDM_FILE, "ldm").name)
    return [folder / n for n in names if (folder / n).is_file()]


def _check_destination(path: Path, format: str, written: list[Path], stale: list[Path], overwrite: bool) -> None:
    """Refuse an export that would replace files without ``overwrite``, and one that another model
    in the same folder would shadow (``load_autoencoder(folder)`` would read that one instead)."""
    folder = written[0].parent
    readable_as_folder = format == "diffusers" or written[0].name in (HETVAE_FILE, LDM_FILE)
    if readable_as_folder and format != "hetvae":
        shadows = [folder / HETVAE_FILE]
        if format == "ldm":
            shadows += [folder / DIFFUSERS_CONFIG, folder / "vae" / DIFFUSERS_CONFIG]
        found = [p for p in shadows if p.is_file()]
        if found:
            raise FileExistsError(
                f"{folder} holds {', '.join(str(p.relative_to(folder)) for p in found)}, which load_autoencoder({folder}) "
                f"would read instead of the {format} export; write the export to another folder"
            )
    if overwrite:
        return
    touched = [p for p in [*written, *stale] if p.exists()]
    if readable_as_folder:
        touched += [p for p in _model_files(folder) if p not in touched]
    if touched:
        raise FileExistsError(
            f"{path} already holds a model ({', '.join(p.name for p in touched)}): refusing to replace or delete "
            "anything; pass overwrite=True (hetvae convert --overwrite) to replace it"
        )


def _export_paths(
    path: Path, format: str, variant: str | None, safe_serialization: bool
) -> tuple[Path, list[Path], Path, list[Path]]:
    """``(weights file, the files always written (weights first), the head file, the diffusers
    weights of every other variant and serialisation)`` of an export to ``path``; checks the
    arguments."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if variant not in (None, "fp16"):
        raise ValueError(f"variant must be None or 'fp16' (the variant load_autoencoder reads), got {variant!r}")
    if format != "diffusers" and (variant is not None or not safe_serialization):
        raise ValueError(
            f"variant={variant!r}, safe_serialization={safe_serialization!r}: the {format} format is one "
            "safetensors file; variants and .bin weights exist only with format='diffusers'"
        )
    if format == "diffusers":
        suffix = (f".{variant}" if variant else "") + (".safetensors" if safe_serialization else ".bin")
        weights = path / f"{_DIFFUSERS_STEM}{suffix}"
        return weights, [weights, path / DIFFUSERS_CONFIG], head_sidecar_path(weights, format), [
            path / name for name in DIFFUSERS_WEIGHTS if name != weights.name]
    weights = path if path.suffix == ".safetensors" else path / (HETVAE_FILE if format == "hetvae" else LDM_FILE)
    return weights, [weights], head_sidecar_path(weights, format), []


def check_export_destination(
    path: str | os.PathLike, format: str = "hetvae", *, overwrite: bool = True, variant: str | None = None,
    safe_serialization: bool = True,
) -> None:
    """What :func:`save_autoencoder` checks of ``path`` before it writes, for any model: raises
    ``FileExistsError`` where the export would replace a model file (or remove a head file)
    without ``overwrite``, or where another model in the folder would shadow it. Cheap (no model
    is needed), so ``hetvae convert`` checks before it reads the source."""
    _, files, head, others = _export_paths(Path(path), format, variant, safe_serialization)
    # the head file is written or, when the model has none, removed: either way it is touched
    _check_destination(Path(path), format, files, ([head] if format != "hetvae" else []) + others, overwrite)


# An export's temporary (a folder beside a new destination, or a file staged beside each file it
# replaces) is named as the atomic writer names its own, hetvae.files.TEMPORARY: hidden, with the
# writing process's id, so a later export (or write of the file) can tell a killed one's leftover.


@contextmanager
def _signals_end_cleanly() -> Iterator[None]:
    """Inside: SIGTERM or SIGHUP (left at its default action) raises, as Ctrl-C does, so an export
    of several files removes what it wrote; the signal then ends the process as it would have.
    The atomic writer's own handling (hetvae.files), stretched over the whole export."""
    try:
        with signals_raise():
            yield
    except Terminated as error:
        if signal.getsignal(error.signum) is signal.SIG_DFL:
            os.kill(os.getpid(), error.signum)
        raise


def _write_new_folder(folder: Path, writes: dict[Path, Callable[[Path], None]]) -> None:
    """Build ``folder`` (which does not exist) as a hidden sibling and rename it into place: it
    appears whole or not at all. A failure also removes the folders above it it created."""
    created = [p for p in folder.parents if not p.exists()]  # deepest first
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(TEMPORARY.format(name=folder.name, pid=os.getpid()))
    try:
        tmp.mkdir()  # the umask's mode, as any new folder
        for file, write in writes.items():
            write_atomically(tmp / file.name, write)
        os.rename(tmp, folder)  # refused if a non-empty folder appeared there meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    fsync_dir(folder.parent)


def _write_into(writes: dict[Path, Callable[[Path], None]], remove: list[Path]) -> None:
    """Write every file beside the one it replaces (``write_atomically`` on a staged name), then
    rename them all in and remove ``remove``. A failure while writing removes the staged files:
    nothing in the folder changed. From the first rename on there are only renames and removals, and
    an interruption among them (Ctrl-C) still completes them, so the folder holds the new model
    and none of the old one's files that the export replaces or removes."""
    staged: dict[Path, Path] = {}  # the file replaced (a link's target) -> its staged copy
    try:
        for file, write in writes.items():
            target = Path(os.path.realpath(file)) if file.is_symlink() else file  # a link keeps pointing there
            remove_stale_temporaries(target, exports=True)
            staged[target] = target.with_name(TEMPORARY.format(name=target.name, pid=os.getpid()))
            write_atomically(staged[target], write)
            if target.exists():  # a replaced file keeps its mode
                os.chmod(staged[target], stat.S_IMODE(target.stat().st_mode))
    except BaseException:
        for copy in staged.values():
            copy.unlink(missing_ok=True)
        raise
    try:
        for target, copy in staged.items():
            os.replace(copy, target)
        for old in remove:
            old.unlink(missing_ok=True)
    finally:
        for target, copy in staged.items():
            if os.path.lexists(copy):
                try:
                    os.replace(copy, target)
                except OSError:
                    copy.unlink(missing_ok=True)
        for old in remove:
            try:
                old.unlink(missing_ok=True)
            except OSError:
                pass
    for folder in {target.parent for target in staged} | {old.parent for old in remove}:
        fsync_dir(folder)


def save_autoencoder(
    model: AutoencoderKL,
    path: str | Path,
    format: str = "hetvae",
    *,
    likelihood: Any = None,
    overwrite: bool = True,
    safe_serialization: bool = True,
    variant: str | None = None,
) -> Path:
    """Write ``model`` and return the weights file (the folder for diffusers).

    ``"hetvae"``: ``path/model.safetensors`` (or ``path`` itself if it ends in ``.safetensors``),
    config and head inside. ``"diffusers"``: the folder ``path`` with ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` as diffusers writes them, loadable by
    ``diffusers.AutoencoderKL.from_pretrained``. ``"ldm"``: ``path/vae.safetensors`` (or ``path``)
    in the original SD layout, usable by SD tools; its config rides in the metadata. With a head,
    diffusers and ldm exports put it in its own file beside the weights (``head_sidecar_path``).

    ``likelihood``: a :class:`hetvae.loss.HeteroscedasticNLL` or :class:`Likelihood` to record with
    the model (replacing ``model.config.likelihood`` in the file); it travels in the config of every
    format (``_hetvae_likelihood`` in a diffusers ``config.json``).
    ``overwrite``: False refuses (``FileExistsError`` naming the files) to replace any model file
    already there, or to remove a head file an earlier export left; True (the default) also removes
    a diffusers folder's weights of another variant or serialisation, which loaders would read
    instead of the new ones. Either way an export that
    another model in the folder would shadow is refused (:func:`check_export_destination`).
    ``variant="fp16"`` and ``safe_serialization=False`` (diffusers format only) name the weights
    ``diffusion_pytorch_model.fp16.safetensors`` / write ``diffusion_pytorch_model[.fp16].bin`` as
    diffusers does; the tensors keep the model's dtype.

    The export is all or nothing as far as the file system allows: each file is written with
    ``hetvae.files.write_atomically``; a folder that does not exist yet is built as a hidden sibling
    (``.NAME.tmp-PID``) and renamed into place; into an existing one, each file is staged beside
    the one it replaces and all are renamed in once all are written. An error or Ctrl-C while
    writing leaves the destination as it was (SIGTERM and SIGHUP too: they then end the process as
    they would have); a leftover of an export killed outright is removed by the next export to the
    same place.
    """
    path = Path(path)
    weights, _, sidecar, others = _export_paths(path, format, variant, safe_serialization)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    head = {k: v for k, v in sd.items() if is_head_key(k)}
    body = {k: v for k, v in sd.items() if k not in head}
    config = model.config
    if likelihood is not None:
        record = likelihood if isinstance(likelihood, Likelihood) else likelihood_from_nll(likelihood)
        config = dataclasses.replace(config, likelihood=record)
    writes: dict[Path, Callable[[Path], None]] = {}
    if format == "hetvae":
        metadata = {CONFIG_KEY: json.dumps(config.to_dict()), FORMAT_KEY: "hetvae"}
        writes[weights] = lambda tmp: save_file(sd, str(tmp), metadata=metadata)
        result = weights
    elif format == "diffusers":
        renamed = {k: v.contiguous() for k, v in ldm_to_diffusers(body).items()}
        if safe_serialization:
            writes[weights] = lambda tmp: save_file(renamed, str(tmp), metadata={"format": "pt"})
        else:
            writes[weights] = lambda tmp: torch.save(renamed, tmp)
        text = json.dumps(config_to_diffusers(config), indent=2) + "\n"
        writes[path / DIFFUSERS_CONFIG] = lambda tmp: tmp.write_text(text)
        result = path
    else:
        body_config = dataclasses.replace(config.without_head(), likelihood=config.likelihood)
        metadata = {"format": "pt", CONFIG_KEY: json.dumps(body_config.to_dict()), FORMAT_KEY: "ldm"}
        writes[weights] = lambda tmp: save_file(body, str(tmp), metadata=metadata)
        result = weights
    if format != "hetvae" and head:
        settings = {"channels": config.head_channels, "init": config.log_scale_init, "detach": config.log_scale_detach,
                    **head_inputs(config), **({"coupling": True} if config.log_scale_coupling else {})}
        writes[sidecar] = lambda tmp: save_file(head, str(tmp), metadata={HEAD_KEY: json.dumps(settings)})
    # a head left by an earlier export would be loaded with these weights, and a diffusers folder's
    # weights of another variant or serialisation (read before these by hetvae and diffusers alike)
    # would be the old model under the new config
    stale = ([sidecar] if format != "hetvae" and not head else []) + others
    _check_destination(path, format, list(writes), stale, overwrite)
    folder = weights.parent
    remove_stale_temporaries(folder, exports=True)
    with _signals_end_cleanly():
        if not folder.exists() and not folder.is_symlink():
            _write_new_folder(folder, writes)
        else:
            _write_into(writes, [p for p in stale if p.is_file()])
    return result


# --- the likelihood record, in place ---------------------------------------------------------


def likelihood_file(path: str | Path) -> Path:
    """The file that holds the likelihood record of the model at ``path``: a diffusers folder's
    ``config.json``, else the weights file (its ``hetvae_config`` metadata)."""
    file, config_file = _locate(Path(path))
    return config_file if config_file is not None else file


def _with_record(source: Path, likelihood: dict[str, Any]) -> Callable[[Path], None]:
    """A writer of ``source`` (a safetensors file with ``hetvae_config`` metadata) whose config
    records ``likelihood``: a new header, then the tensors' bytes copied as they are.

    A safetensors file is an 8-byte little-endian header length, the JSON header (every tensor's
    dtype, shape and byte offsets into the data that follows, plus ``__metadata__``), then the
    data; the offsets count from the data's start, so a new header leaves every tensor valid."""

    def write(tmp: Path) -> None:
        with open(source, "rb") as src:
            size = src.seek(0, 2)
            src.seek(0)
            n = int.from_bytes(src.read(8), "little")
            try:
                if not 0 < n <= size - 8:
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(src.read(n))
                metadata = dict(header.get("__metadata__") or {})
                config = json.loads(metadata[CONFIG_KEY])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise _error(source, "safetensors", f"cannot read the {CONFIG_KEY} metadata to rewrite ({e})") from None
            fmt = metadata.get(FORMAT_KEY, "hetvae")
            config["likelihood"] = likelihood
            text = json.dumps(config)
            config_from_metadata(text, source, fmt)  # refuse a record the file could not be read back with
            header["__metadata__"] = {**metadata, CONFIG_KEY: text}
            body = json.dumps(header, separators=(",", ":")).encode()
            body += b" " * (-len(body) % 8)  # safetensors aligns the data to 8 bytes
            with open(tmp, "wb") as dst:
                dst.write(len(body).to_bytes(8, "little"))
                dst.write(body)
                shutil.copyfileobj(src, dst, 1 << 24)

    return write


def store_likelihood(path: str | Path, likelihood: Likelihood) -> Path:
    """Replace the likelihood record (``AutoencoderConfig.likelihood``) of the model at ``path`` in
    place, and nothing else: a diffusers folder's ``config.json`` gets it under ``_hetvae_likelihood``
    (every other key as it was; the weights, of whatever variant, serialisation and dtype, and the
    head file untouched); a hetvae or ldm file hetvae wrote gets it in its ``hetvae_config``
    metadata, every tensor's bytes, dtype and name kept. Written atomically, keeping the file's mode
    (:func:`hetvae.files.write_atomically`). Returns the file written (:func:`likelihood_file`).

    A single file without ``hetvae_config`` metadata (one hetvae did not write) has no record to
    replace: ``CheckpointError``, and the file is not touched.
    """
    path = Path(path)
    file, config_file = _locate(path)
    record = dataclasses.asdict(likelihood)
    if config_file is not None:
        try:
            data = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error(config_file, "diffusers", f"cannot read the config ({e})") from e
        if not isinstance(data, dict):
            raise _error(config_file, "diffusers", f"the config is not a JSON object but {type(data).__name__}")
        data[DIFFUSERS_LIKELIHOOD_KEY] = record
        config_from_diffusers(data, config_file)  # refuse a record the folder could not be read back with
        text = json.dumps(data, indent=2) + "\n"
        return write_atomically(config_file, lambda tmp: tmp.write_text(text))
    metadata: dict[str, str] = {}
    if file.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise _error(file, "single file", f"the file is truncated or corrupt ({e})") from e
    if CONFIG_KEY not in metadata:
        raise _error(
            file, metadata.get(FORMAT_KEY, "single file"),
            f"no {CONFIG_KEY} metadata, so no likelihood record to replace (hetvae did not write this file): it is "
            "not rewritten; write a new export of the model with its record instead",
        )
    return write_atomically(file, _with_record(file, record))
