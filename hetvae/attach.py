"""The uncertainty map from a stock ``diffusers.AutoencoderKL``: attach hetvae's log-scale head to it.

A hetvae export in diffusers' format (``hetvae convert RUN --to diffusers --out OUT``) is a folder stock
diffusers loads as is; the per-pixel log-scale head rides beside the weights in
``log_scale_head.safetensors``, which diffusers does not read. :func:`attach_log_scale_head`
reads that head (or the head of any hetvae export or model file) and returns a
:class:`LogScaleDecoder` whose ``decode(z)`` gives the stock VAE's image and the head's map::

    vae = diffusers.AutoencoderKL.from_pretrained("export")
    dec = hetvae.attach_log_scale_head(vae, "export")
    out = dec.decode(z)          # z unscaled, as for vae.decode
    out.sample                   # == vae.decode(z).sample
    out.log_scale                # (B, 3 or 1, H, W): log b (Laplace) or log sigma (Gaussian)
    out.coupling                 # colour coupling, if the export has it: (3,) or (B, 3, H, W); else None

The head reads what hetvae's ``Decoder`` feeds it: the activated features that go into
``decoder.conv_out`` (after ``conv_norm_out`` and ``conv_act``), and with
``log_scale_head_sees_mean`` also ``conv_out``'s output, the mean, and with
``log_scale_head_sees_latent`` the decoder's input latent, each latent pixel repeated over its block
(a forward pre-hook on ``vae.decoder`` keeps it, tile by tile), and with ``log_scale_head_sees_edges``
the mean's :func:`hetvae.autoencoder.log_edge_magnitude`. A forward hook on the stock
``decoder.conv_out``, held only during :meth:`LogScaleDecoder.decode`, appends the head's raw maps to
``conv_out``'s output as extra channels, so the stock ``vae.decode`` runs unchanged (its slicing,
tiling and offloading hooks included; tiles blend the raw maps as they blend the image, as hetvae's
tiled decode does) and the maps are split off afterwards.

Relation to hetvae's own ``AutoencoderKL.decode`` of the same export: the raw head output ``r`` is
bounded as the likelihood bounds it, ``s = soft_clamp(r, *likelihood.bounds, likelihood.margin)``
(:func:`hetvae.functional.soft_clamp`; without a recorded likelihood the defaults ``(-7, 3)``,
margin 1), then corrected by a stored post-hoc calibration (:mod:`hetvae.calibration`) unless
``calibrated=False``. So ``log_scale`` here equals

* ``model.decode(z).log_scale`` for a calibrated export (hetvae's decode returns the bounded,
  calibrated map), and
* ``soft_clamp(model.decode(z).log_scale, *bounds, margin)`` for an uncalibrated one (hetvae's
  decode then returns the head's raw output, which its loss bounds),

up to float rounding (hetvae computes in its own memory layout).

An export trained with colour coupling (docs/math.md, "Coupled colour channels") carries its
coefficients: ``channel_coupling: global`` in the likelihood record (``out.coupling`` is then that
``(3,)`` vector), ``pixel`` as the head's last three maps (``out.coupling`` the bounded maps,
``hetvae.functional.bound_coupling`` of what hetvae's ``decode(z).coupling`` returns raw). The
log-scales are then each channel's given the earlier channels' values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hetvae.autoencoder import AutoencoderKL, log_edge_magnitude, log_scale_layers
from hetvae.convert import (
    CONFIG_KEY,
    DIFFUSERS_CONFIG,
    DIFFUSERS_HEAD_FILE,
    DIFFUSERS_LIKELIHOOD_KEY,
    HEAD_KEY,
    HEAD_PREFIX,
    TRUNK_PREFIX,
    config_from_metadata,
    expected_head_file,
    head_fields,
    head_inputs,
    head_settings,
    is_head_key,
    load_autoencoder,
    read_model_file,
    trunk_indices,
)
from hetvae.files import CheckpointError, write_atomically
from hetvae.functional import bound_coupling
from hetvae.hub import resolve_model
from hetvae.likelihood import Likelihood, grafted_record, likelihood_from_nll

__all__ = [
    "HeadFile",
    "LogScaleDecoder",
    "ScaledDecoderOutput",
    "attach_log_scale_head",
    "is_head_file",
    "load_with_head",
    "read_head_file",
    "save_log_scale_head",
    "store_head_likelihood",
]

_LDM_HEAD_SUFFIX = ".log_scale_head.safetensors"
HEAD_LIKELIHOOD_KEY = "hetvae_likelihood"
"""A head file's metadata key for its likelihood record (bounds, family, calibration), a JSON object."""
HEAD_BASE_KEY = "hetvae_base_model"
"""A head file's metadata key for the base model it was trained for: a JSON object with ``model``
(where it was loaded from), ``architecture`` and ``sha256`` (:func:`base_fingerprint`)."""


@dataclass
class ScaledDecoderOutput:
    """``sample``: the decoded image ``(B, C, H, W)`` (the stock VAE's output, the likelihood's
    mean); ``log_scale``: its bounded (and, where stored, calibrated) log-scale ``(B, C|1, H, W)``."""

    sample: Tensor
    log_scale: Tensor
    coupling: Tensor | None = None
    """The colour-coupling coefficients (``(C (C - 1) / 2,)`` or bounded maps ``(B, C (C - 1) / 2, H, W)``)
    of an export trained with coupling; None otherwise."""

    @property
    def mean(self) -> Tensor:
        """``sample``, under hetvae's name (:class:`hetvae.Reconstruction`)."""
        return self.sample


class _Head(nn.Module):
    """hetvae's head modules under their ``decoder.`` names: optional ``log_scale_trunk``
    (``layers`` x [3x3 conv, SiLU]) and the output conv ``log_scale_head``."""

    def __init__(self, *, in_channels: int, out_channels: int, layers: int, hidden: int) -> None:
        super().__init__()
        self.log_scale_trunk, self.log_scale_head = log_scale_layers(in_channels, out_channels, layers, hidden)

    def forward(self, h: Tensor) -> Tensor:
        if self.log_scale_trunk is not None:
            h = self.log_scale_trunk(h)
        return self.log_scale_head(h)


class LogScaleDecoder(nn.Module):
    """A stock ``diffusers.AutoencoderKL`` with hetvae's log-scale head attached (module docstring).
    Made by :func:`attach_log_scale_head`; ``vae`` is used as it is and left unchanged.

    ``likelihood``: the :class:`hetvae.Likelihood` whose bounds (and calibration) shape the map.
    ``use_calibration``: apply a stored calibration (default True; see :attr:`calibration`).
    ``sees_mean``: whether the head also reads the decoded image; ``sees_latent``: the decoder's
    input latent; ``sees_edges``: the decoded image's edge magnitude.
    """

    def __init__(self, vae: nn.Module, head: _Head, *, likelihood: Likelihood, sees_mean: bool,
                 use_calibration: bool = True, source: str = "", sees_latent: bool = False,
                 sees_edges: bool = False, coupling_maps: int = 0) -> None:
        super().__init__()
        self.coupling_maps = coupling_maps
        self.vae = vae
        self.head = head
        self.likelihood = likelihood
        self.sees_mean = sees_mean
        self.sees_latent = sees_latent
        self.sees_edges = sees_edges
        self._latent: Tensor | None = None
        self.use_calibration = use_calibration
        self.source = source
        self._calibration = likelihood.calibrator()

    @property
    def calibration(self):
        """The stored post-hoc correction (:class:`hetvae.calibration.Calibration`), or None."""
        return self._calibration

    @property
    def config(self) -> Any:
        """The stock VAE's config (``scaling_factor``, ``shift_factor``, ...)."""
        return self.vae.config

    @property
    def log_scale_channels(self) -> int:
        return self.head.log_scale_head.out_channels - self.coupling_maps

    def _follow_vae(self) -> None:
        ref = self.vae.decoder.conv_out.weight
        weight = self.head.log_scale_head.weight
        if weight.device != ref.device or weight.dtype != ref.dtype:
            self.head.to(device=ref.device, dtype=ref.dtype)

    def _append_maps(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        # hook on conv_out: inputs[0] are the features conv_out reads; output is the mean
        h = inputs[0]
        if self.sees_mean:
            h = torch.cat([h, output], dim=1)
        if self.sees_latent:
            up = nn.functional.interpolate(self._latent.to(h.dtype), size=output.shape[-2:], mode="nearest")
            h = torch.cat([h, up], dim=1)
        if self.sees_edges:
            h = torch.cat([h, log_edge_magnitude(output)], dim=1)
        return torch.cat([output, self.head(h.to(self.head.log_scale_head.weight.dtype)).to(output.dtype)], dim=1)

    def _keep_latent(self, module: nn.Module, args: tuple) -> None:
        self._latent = args[0]

    def bound(self, raw: Tensor, mean: Tensor | None = None) -> Tensor:
        """The head's raw output -> the likelihood's bounded log-scale (in float32 at least) ->
        calibrated when :attr:`use_calibration` and a calibration is stored (its chroma term, if
        any, reads ``mean``, the decoded image); in ``raw``'s dtype."""
        return self.likelihood.bound(raw, self._calibration if self.use_calibration else None, mean)

    def decode(self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """Decode unscaled latents ``(B, latent_channels, h, w)`` with the stock ``vae.decode`` and
        return :class:`ScaledDecoderOutput` (``return_dict=False``: the tuple ``(sample, log_scale)``,
        as diffusers' decode gives ``(sample,)``). ``generator`` is accepted as diffusers' is (unused)."""
        self._follow_vae()
        conv_out = self.vae.decoder.conv_out
        handles = [conv_out.register_forward_hook(self._append_maps)]
        if self.sees_latent:  # the latent each decoder call (each tile) reads, after post_quant_conv
            handles.append(self.vae.decoder.register_forward_pre_hook(self._keep_latent))
        try:
            decoded = self.vae.decode(z, return_dict=False)[0]
        finally:
            for handle in handles:
                handle.remove()
            self._latent = None
        channels = conv_out.out_channels
        maps = channels + self.log_scale_channels
        sample, raw = decoded[:, :channels], decoded[:, channels:maps]
        coupling = None
        if self.coupling_maps:
            coupling = bound_coupling(decoded[:, maps:]).to(decoded.dtype).contiguous()
        elif self.likelihood.coupling is not None:
            coupling = torch.tensor(self.likelihood.coupling, dtype=decoded.dtype, device=decoded.device)
        out = ScaledDecoderOutput(sample=sample.contiguous(), log_scale=self.bound(raw, sample).contiguous(), coupling=coupling)
        return out if return_dict else (out.sample, out.log_scale)

    def forward(self, z: Tensor) -> ScaledDecoderOutput:
        return self.decode(z)


# --- reading the head -----------------------------------------------------------------------------


def _error(path: Path, problem: str) -> ValueError:
    return CheckpointError(f"{path}: {problem}")


def _safetensors_keys(file: Path) -> tuple[list[str], dict[str, str]] | None:
    """Keys and metadata of a safetensors file, or None if ``file`` is not one."""
    if file.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _error(file, f"cannot read the safetensors file, it is truncated or corrupt ({e})") from e


def _likelihood_beside(head_file: Path) -> tuple[Likelihood | None, str]:
    """The likelihood recorded with the model a head file was exported beside: ``config.json``
    of a diffusers folder, or the metadata of the ldm weights ``<stem>.safetensors``."""

    config_file = head_file.parent / DIFFUSERS_CONFIG
    if head_file.name == DIFFUSERS_HEAD_FILE and config_file.is_file():
        try:
            record = json.loads(config_file.read_text()).get(DIFFUSERS_LIKELIHOOD_KEY)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise _error(config_file, f"cannot read the config ({e})") from e
        return _likelihood(record, config_file), str(config_file)
    if head_file.name.endswith(_LDM_HEAD_SUFFIX):
        weights = head_file.with_name(head_file.name[: -len(_LDM_HEAD_SUFFIX)] + ".safetensors")
        found = _safetensors_keys(weights) if weights.is_file() else None
        if found is not None and CONFIG_KEY in found[1]:
            return config_from_metadata(found[1][CONFIG_KEY], weights, "ldm").likelihood, str(weights)
    return None, ""


def _likelihood(record: Any, source: Path | str) -> Likelihood | None:
    if record is None or isinstance(record, Likelihood):
        return record
    try:
        if not isinstance(record, dict):
            raise ValueError(f"expected a mapping, got {type(record).__name__}")
        return Likelihood(**record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid {DIFFUSERS_LIKELIHOOD_KEY} ({e})") from e


def _recorded_likelihood(path: Path, metadata: dict[str, str]) -> Likelihood | None:
    """The likelihood a head file records itself (:data:`HEAD_LIKELIHOOD_KEY`), or None."""
    text = metadata.get(HEAD_LIKELIHOOD_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, f"invalid {HEAD_LIKELIHOOD_KEY} metadata ({e})") from None
    try:
        return _likelihood(record, path)
    except ValueError as e:
        raise _error(path, f"invalid {HEAD_LIKELIHOOD_KEY} metadata ({e})") from None


def _read(path: Path) -> tuple[dict[str, Tensor], Likelihood | None, str, Tensor | None, dict[str, Any]]:
    """``(head tensors, recorded likelihood or None, where it came from, the export's conv_out
    weight or None, the head's recorded inputs)`` from a head file or any model
    ``hetvae.load_autoencoder`` reads."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (expected a hetvae export folder or head file)")
    found = _safetensors_keys(path) if path.is_file() else None
    if found is not None and found[0] and all(is_head_key(k) for k in found[0]):
        likelihood, source = _recorded_likelihood(path, found[1]), str(path)
        if likelihood is None:
            likelihood, source = _likelihood_beside(path)
        try:
            settings = head_settings(found[1])
        except ValueError as e:
            raise _error(path, str(e)) from None
        return load_file(str(path)), likelihood, source, None, settings
    info, sd = read_model_file(path)
    head = {k: v for k, v in sd.items() if is_head_key(k)}
    if not head:
        try:
            where = f"; an exported head would be {expected_head_file(path)}, which is missing"
        except (CheckpointError, FileNotFoundError):
            where = ""
        raise _error(path, f"no log-scale head: the {info.format} model there has none{where}")
    return head, info.config.likelihood, str(info.weights_file), sd.get("decoder.conv_out.weight"), head_inputs(info.config)


def _build_head(tensors: dict[str, Tensor], decoder: nn.Module, path: Path,
                settings: dict[str, Any]) -> tuple[_Head, bool, bool, bool, int]:
    """The head modules with ``tensors`` loaded, checked against the stock decoder's ``conv_out`` (and
    ``conv_in``: the latent's channels), and whether the head reads the mean, the latent and the edges."""
    conv_out, conv_in = decoder.conv_out, getattr(decoder, "conv_in", None)
    features, image_channels = conv_out.in_channels, conv_out.out_channels
    latent = conv_in.in_channels if isinstance(conv_in, nn.Conv2d) else None
    weight = tensors.get(HEAD_PREFIX + "weight")
    if weight is None or HEAD_PREFIX + "bias" not in tensors:
        raise _error(path, f"no log-scale head: expected {HEAD_PREFIX}weight and bias; keys: {sorted(tensors)[:5]}")
    trunk = trunk_indices(tensors)
    first = tensors[f"{TRUNK_PREFIX}{trunk[0]}.weight"] if trunk else weight
    first_in, maps = int(first.shape[1]), int(weight.shape[0])
    shapes = {"decoder.conv_out.weight": conv_out.weight}
    if latent is not None:
        shapes["decoder.conv_in.weight"] = conv_in.weight
    try:
        fields = head_fields({**tensors, **shapes}, settings) if weight.ndim == 4 and first.ndim == 4 else None
    except ValueError:
        fields = None
    if fields is None:
        latent_text = f", or {latent} more for one that sees the latent" if latent is not None else ""
        raise _error(
            path,
            f"the head does not fit this VAE: its first layer reads {first_in} channels "
            f"({'decoder.log_scale_trunk.' + str(trunk[0]) if trunk else 'decoder.log_scale_head'}.weight "
            f"{tuple(first.shape)}), the VAE's decoder.conv_out reads {features} features and writes "
            f"{image_channels} channels (so {features}, {image_channels} more for a head that sees the mean"
            f"{latent_text}, {image_channels} more for one that sees the edges)",
        )
    coupling_maps = image_channels * (image_channels - 1) // 2 if fields.get("log_scale_coupling") else 0
    if maps - coupling_maps not in (1, image_channels):
        raise _error(path, f"the head does not fit this VAE: it predicts {maps} maps, expected 1 or "
                           f"{image_channels} (the VAE's out_channels), or {image_channels + coupling_maps} with "
                           "colour coupling")
    hidden = int(weight.shape[1])
    head = _Head(in_channels=first_in, out_channels=maps, layers=len(trunk), hidden=hidden)
    state = {k[len("decoder."):]: v for k, v in tensors.items()}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise _error(path, f"the head's tensors do not fit together: {'; '.join(lines[:3])}") from None
    return (head, fields["log_scale_head_sees_mean"], fields["log_scale_head_sees_latent"],
            fields["log_scale_head_sees_edges"], coupling_maps)


def attach_log_scale_head(vae: nn.Module, path: str | Path, *, calibrated: bool = True) -> LogScaleDecoder:
    """Attach the log-scale head of a hetvae export to a stock ``diffusers.AutoencoderKL``.

    Args:
        vae: a ``diffusers.AutoencoderKL`` (anything with ``decode(z, return_dict=False)`` and a
            ``decoder.conv_out`` convolution), typically loaded from the same export; not
            hetvae's own :class:`hetvae.AutoencoderKL`, which decodes its log-scale itself
            (``model.decode(z).log_scale``) and is refused.
        path: a hetvae export folder (diffusers, ldm or hetvae format), a model file, or a head
            file (``log_scale_head.safetensors`` / ``<stem>.log_scale_head.safetensors``); locally
            or as a Hugging Face Hub id (``org/name``, ``org/name/vae``,
            ``org/name/vae/log_scale_head.safetensors``, ``@revision``: :func:`hetvae.hub.resolve_model`).
        calibrated: apply a post-hoc calibration stored with the export (default); False gives
            the bounded map as trained.

    The likelihood (bounds, calibration) is the one recorded with the export: in ``config.json``
    (``_hetvae_likelihood``) or the file's metadata; for a head file alone, that of the model
    beside it, else the ``vae``'s own config, else the defaults (bounds (-7, 3), margin 1).

    Returns a :class:`LogScaleDecoder` (module docstring: how its map relates to hetvae's decode).
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` (a
    :class:`hetvae.CheckpointError`) naming the path for one without a head or a head whose
    shapes do not fit ``vae``; warns when the export's ``conv_out`` differs from ``vae``'s (the
    head was trained on other features).
    """
    if isinstance(vae, AutoencoderKL):  # its own head would read conv_out's output with the hooked maps appended
        raise ValueError(
            f"vae is hetvae's own AutoencoderKL, which decodes its log-scale itself: use model.decode(z).log_scale "
            f"(hetvae.load_autoencoder({str(path)!r}) loads the export with its head). attach_log_scale_head takes a "
            f"stock diffusers.AutoencoderKL (diffusers.AutoencoderKL.from_pretrained of a diffusers export)"
        )
    conv_out = getattr(getattr(vae, "decoder", None), "conv_out", None)
    if not isinstance(conv_out, nn.Conv2d) or not callable(getattr(vae, "decode", None)):
        raise ValueError(
            f"vae must be a diffusers AutoencoderKL (with decode() and a decoder.conv_out convolution), "
            f"got {type(vae).__name__}"
        )
    path = resolve_model(path)  # a local path or a Hugging Face Hub id (org/name/vae, org/name/file, @revision)
    tensors, likelihood, source, export_conv_out, settings = _read(path)
    try:
        head, sees_mean, sees_latent, sees_edges, coupling_maps = _build_head(tensors, vae.decoder, path, settings)
    except CheckpointError as e:
        trained_for = ((read_head_file(path).base or {}) if is_head_file(path) else {}).get("architecture")
        if not trained_for:
            raise
        raise CheckpointError(f"{e}. The head was trained for a VAE with {_describe(trained_for)}") from None
    if likelihood is None:
        config = getattr(vae, "config", None)
        record = config.get(DIFFUSERS_LIKELIHOOD_KEY) if hasattr(config, "get") else None
        likelihood = _likelihood(record, f"the vae's config ({DIFFUSERS_LIKELIHOOD_KEY})")
    likelihood = likelihood or Likelihood(granularity="pixel")
    if likelihood.granularity != "pixel":  # a global/channel record (and its calibration) is not the head's
        likelihood = grafted_record(likelihood, likelihood.init)
    if export_conv_out is not None:
        mine = conv_out.weight.detach().float().cpu()
        if mine.shape != export_conv_out.shape or not torch.allclose(mine, export_conv_out.float(), rtol=1e-2, atol=1e-3):
            warnings.warn(
                f"{path}: the export's decoder.conv_out differs from the vae's: the head was trained on another "
                "decoder's features, so its map may not describe this vae's images",
                stacklevel=2,
            )
    ref = conv_out.weight
    head.to(device=ref.device, dtype=ref.dtype).eval()
    return LogScaleDecoder(vae, head, likelihood=likelihood, sees_mean=sees_mean, sees_latent=sees_latent,
                           sees_edges=sees_edges, use_calibration=calibrated, source=source or str(path),
                           coupling_maps=coupling_maps)


# --- a head file of its own: the map for a VAE that stays as it is ---------------------------------


@dataclass
class HeadFile:
    """A head file read by :func:`read_head_file`: the head's tensors (``decoder.log_scale_*`` names),
    its recorded settings (``channels``, ``init``, ``detach``, ``sees_*``), the likelihood it records
    (None: none) and the base model it was trained for (None: not recorded; else a dict with
    ``model``, ``architecture`` and ``sha256``)."""

    path: Path
    tensors: dict[str, Tensor]
    settings: dict[str, Any]
    likelihood: Likelihood | None
    base: dict[str, Any] | None


def _architecture(model: AutoencoderKL) -> dict[str, Any]:
    c = model.config
    return {"block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "latent_channels": c.latent_channels, "out_channels": c.out_channels,
            "decoder.conv_out.weight": list(model.decoder.conv_out.weight.shape)}


def base_fingerprint(model: AutoencoderKL) -> str:
    """SHA-256 of ``model``'s weights but the log-scale head's (names and float32 values, in key
    order): which VAE a head was trained on, whatever file or format it was read from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if is_head_key(key):
            continue
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_log_scale_head(model: AutoencoderKL, path: str | Path, *, likelihood: Any = None,
                        base: str | None = None) -> Path:
    """Write ``model``'s log-scale head alone to ``path`` (a ``.safetensors`` file, written atomically),
    in the format of the head file a diffusers export carries (:data:`hetvae.convert.DIFFUSERS_HEAD_FILE`),
    which :func:`attach_log_scale_head` attaches to a stock diffusers VAE and :func:`load_with_head`
    joins to the base model for hetvae. Its metadata records the head's settings, ``likelihood`` (a
    :class:`hetvae.loss.HeteroscedasticNLL` or :class:`Likelihood`; None: ``model.config.likelihood``)
    and the base model: ``base`` (where it is loaded from, e.g. a diffusers folder), the
    architecture and :func:`base_fingerprint` of ``model`` without its head. Returns ``path``.

    ``ValueError`` when ``model`` has no head or ``path`` does not end in ``.safetensors``."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a head file is a .safetensors file; name it e.g. {path.name}.safetensors")
    if not model.has_log_scale_head:
        raise ValueError(f"the model has no log-scale head to write to {path}")
    head = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if is_head_key(k)}
    config = model.config
    record = config.likelihood if likelihood is None else (
        likelihood if isinstance(likelihood, Likelihood) else likelihood_from_nll(likelihood))
    settings = {"channels": config.head_channels, "init": config.log_scale_init, "detach": config.log_scale_detach,
                **head_inputs(config), **({"coupling": True} if config.log_scale_coupling else {})}
    metadata = {
        HEAD_KEY: json.dumps(settings),
        HEAD_BASE_KEY: json.dumps({"model": base, "architecture": _architecture(model),
                                   "sha256": base_fingerprint(model)}),
    }
    if record is not None:
        metadata[HEAD_LIKELIHOOD_KEY] = json.dumps(dataclasses.asdict(record))
    return write_atomically(path, lambda tmp: save_file(head, str(tmp), metadata=metadata))


def is_head_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file holding a log-scale head and nothing else."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    try:
        found = _safetensors_keys(path)
    except CheckpointError:  # a damaged file: its loader says what is wrong with it
        return False
    return found is not None and bool(found[0]) and all(is_head_key(k) for k in found[0])


def read_head_file(path: str | Path) -> HeadFile:
    """Read a head file (:func:`save_log_scale_head`, or the head file of a diffusers / ldm export,
    whose likelihood is then the one recorded beside it). ``ValueError`` naming the file when it is
    not one, or its metadata is damaged; ``FileNotFoundError`` when it is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a log-scale head file, .safetensors)")
    found = _safetensors_keys(path)
    if found is None or not found[0] or not all(is_head_key(k) for k in found[0]):
        keys = sorted(found[0])[:5] if found is not None else []
        raise _error(path, f"not a log-scale head file: expected only decoder.log_scale_head.* / "
                           f"decoder.log_scale_trunk.* tensors in a .safetensors file; keys: {keys}")
    keys, metadata = found
    try:
        settings = head_settings(metadata)
    except ValueError as e:
        raise _error(path, str(e)) from None
    likelihood = _recorded_likelihood(path, metadata)
    if likelihood is None:
        likelihood = _likelihood_beside(path)[0]
    base = None
    if HEAD_BASE_KEY in metadata:
        try:
            base = json.loads(metadata[HEAD_BASE_KEY])
        except json.JSONDecodeError as e:
            raise _error(path, f"invalid {HEAD_BASE_KEY} metadata ({e})") from None
        if not isinstance(base, dict):
            raise _error(path, f"invalid {HEAD_BASE_KEY} metadata: expected a JSON object")
    return HeadFile(path=path, tensors=load_file(str(path)), settings=settings, likelihood=likelihood, base=base)


def load_with_head(head_file: str | Path, base: str | Path | None = None) -> AutoencoderKL:
    """hetvae's :class:`AutoencoderKL`: the base VAE with the head of ``head_file`` in its decoder, the
    head file's likelihood (and calibration) as its record; a model :class:`hetvae.predictor.Predictor`
    scores and :func:`hetvae.calibrate` calibrates. Its mean is the base model's decode, unchanged.

    ``base``: the VAE the head was trained for, anything :func:`hetvae.load_autoencoder` reads; None:
    the one the head file records. A head stored in the base is replaced. Raises ``ValueError``
    naming both when the head does not fit the base's architecture (shapes of its first layer and of
    the base's ``decoder.conv_out``, and the architecture the head was trained for); warns when the
    base fits but is not the very model the head was trained on (another fingerprint)."""
    head = read_head_file(head_file)
    recorded = (head.base or {}).get("model")
    if base is None:
        if not recorded:
            raise ValueError(f"{head.path}: the head file records no base model; pass the VAE it was trained for "
                             "(base=..., a diffusers folder, SD file or hetvae run)")
        base = recorded
    model = load_autoencoder(base)
    if model.has_log_scale_head:
        model.remove_log_scale_head()
    try:
        module, sees_mean, sees_latent, sees_edges, coupling_maps = _build_head(
            head.tensors, model.decoder, head.path, head.settings)
    except CheckpointError as e:
        trained_for = (head.base or {}).get("architecture")
        mine = _architecture(model)
        raise CheckpointError(
            f"{e}. The head was trained for a VAE with {_describe(trained_for) if trained_for else 'an unrecorded architecture'}"
            f"{f' ({recorded})' if recorded else ''}; the base {base} has {_describe(mine)}"
        ) from None
    trunk = module.log_scale_trunk
    model.add_log_scale_head(
        channels=None if module.log_scale_head.out_channels - coupling_maps == model.config.out_channels else 1,
        init=float(head.settings.get("init", 0.0)), detach=bool(head.settings.get("detach", False)),
        layers=0 if trunk is None else len(trunk) // 2,
        hidden=None if trunk is None else module.log_scale_head.in_channels,
        sees_mean=sees_mean, sees_latent=sees_latent, sees_edges=sees_edges, coupling=coupling_maps > 0,
    )
    state = {k[len("decoder."):]: v for k, v in head.tensors.items()}
    missing, unexpected = model.decoder.load_state_dict(state, strict=False)
    wrong = [k for k in missing if k.startswith(("log_scale_head.", "log_scale_trunk."))] + list(unexpected)
    if wrong:
        raise _error(head.path, f"the head's tensors do not fit the head built from its settings: {wrong[:5]}")
    likelihood = head.likelihood or Likelihood(granularity="pixel", init=float(head.settings.get("init", 0.0)))
    if likelihood.granularity != "pixel":
        likelihood = grafted_record(likelihood, likelihood.init)
    model.config = dataclasses.replace(model.config, likelihood=likelihood)
    expected = (head.base or {}).get("sha256")
    if expected and expected != base_fingerprint(model):
        warnings.warn(
            f"{head.path}: the base {base} is not the VAE the head was trained on (its weights differ from those of "
            f"{recorded or 'the recorded base'}): the map may not describe this VAE's images", stacklevel=2,
        )
    return model.eval()


def _describe(architecture: dict[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v) if isinstance(v, list) else v}" for k, v in architecture.items())


def store_head_likelihood(path: str | Path, likelihood: Likelihood) -> Path:
    """Rewrite head file ``path`` with ``likelihood`` as its record (e.g. with a calibration that
    :func:`hetvae.calibrate` fitted); tensors and other metadata stay as they are. Atomic."""
    path = Path(path).expanduser()
    read_head_file(path)  # a head file, readable
    tensors = load_file(str(path))
    metadata = dict(_safetensors_keys(path)[1])
    metadata[HEAD_LIKELIHOOD_KEY] = json.dumps(dataclasses.asdict(likelihood))
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
