"""SD-compatible ``AutoencoderKL`` with an optional per-pixel log-scale head.

The architecture is the Stable Diffusion VAE (ldm ``AutoencoderKL``; diffusers ``AutoencoderKL``
with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``), parameter names as in the original SD
checkpoints. The decoder can carry ``decoder.log_scale_head``: a 3x3 convolution on the same
activated features ``conv_out`` sees, with zero weights and bias ``log_scale_init``, so grafting it
onto a pretrained VAE leaves the mean output bit-identical and predicts ``log_scale_init``
everywhere until trained.

Shapes: images ``(B, in_channels, H, W)`` with ``H, W`` multiples of ``downsample_factor``
(``2 ** (len(block_out_channels) - 1)``, 8 for SD); latents ``(B, latent_channels, H/f, W/f)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetvae.distributions import DiagonalGaussian
from hetvae.hub import resolve_model
from hetvae.layers import Level, MidBlock, ResnetBlock, activation_layout, group_norm, run_maybe_checkpointed
from hetvae.likelihood import CalibrationDropped, Likelihood, finite_numbers, grafted_record, is_int, is_number

LOG_SCALE_KINDS = (None, "pixel")


# diffusers config.json keys that AutoencoderConfig derives rather than stores
DIFFUSERS_CONFIG_ALIASES = ("down_block_types", "up_block_types", "act_fn", "mid_block_add_attention")

_PROXIES = "huggingface_hub reads its proxy from the environment: set HTTPS_PROXY instead"
_CPU = "hetvae loads the whole model on the CPU: move it with model.to(device) once loaded"
# The rest of diffusers.AutoencoderKL.from_pretrained's arguments, as AutoencoderKL.from_pretrained
# takes them: name -> (the values it accepts, which ask for nothing hetvae does not do anyway;
# why any other value is refused)
_DIFFUSERS_LOADING_ARGUMENTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "proxies": ((None,), _PROXIES),
    "low_cpu_mem_usage": ((True, False), _CPU),
    "disable_mmap": ((True, False), "hetvae reads the weights in full"),
    "use_flashpack": ((None, False), "hetvae reads safetensors or pickled weights"),
    "device_map": ((None,), _CPU),
    "max_memory": ((None,), _CPU),
    "offload_folder": ((None,), _CPU),
    "offload_state_dict": ((None, False), _CPU),
    "ignore_mismatched_sizes": ((False,), "the weights must fit the architecture (a mismatch is a CheckpointError naming the keys)"),
    "output_loading_info": ((False,), "loading is strict (a missing or unexpected key is an error): there is no loading info to return"),
    "quantization_config": ((None,), "quantised loading is not supported; torch_dtype casts the model"),
}


@dataclass
class AutoencoderConfig:
    """Architecture and latent statistics; the defaults are the SD 1.x VAE (kl-f8, 4 latent channels).

    ``log_scale``: None (no head) or ``"pixel"`` (``decoder.log_scale_head``).
    ``log_scale_channels``: None means ``out_channels`` maps, 1 means one map shared by all channels.
    ``log_scale_init``: the head's bias at creation, i.e. the log-scale predicted everywhere at step 0.
    ``log_scale_detach``: feed the head detached features, so the variance branch cannot move the
    mean's parameters ("faithful" heteroscedastic training, Stirn et al. 2023).
    ``log_scale_head_layers``: hidden 3x3 conv + SiLU layers (``decoder.log_scale_trunk``) before the
    head's output conv; 0 is the single conv. The error's size is a *magnitude* of local detail, a
    nonlinear function of the decoder's features, which one linear conv can only approximate.
    ``log_scale_head_channels``: their width (None: the decoder's full-resolution width).
    ``log_scale_head_sees_mean``: the head also reads the decoder's mean output (detached: the head
    reads the reconstruction, it never shapes it), where edges and texture are plain to see.
    ``log_scale_head_sees_latent``: the head also reads the decoder's input latent (after
    ``post_quant_conv``), repeated over each latent pixel's ``downsample_factor`` x
    ``downsample_factor`` block (detached with ``log_scale_detach``): what the code holds about a
    region, including detail the decoder cannot draw, which its last features need not keep.
    ``log_scale_head_sees_edges``: the head also reads :func:`log_edge_magnitude` of the (detached)
    mean, the log of its local gradient magnitude: the level of detail drawn around each pixel, on a
    log scale that carries over to images with more or less detail than the training crops.
    ``log_scale_coupling``: the head also predicts the ``C (C - 1) / 2`` colour-coupling coefficient
    maps (``channel_coupling: pixel``, docs/math.md "Coupled colour channels"): its output conv has
    that many more maps after the log-scales, zero-initialised, so a fresh head couples nothing.
    Needs one log-scale map per channel.

    Not architecture, kept so that nothing read is lost on the way out: ``sample_size``,
    ``force_upcast``, ``latents_mean``, ``latents_std`` are diffusers ``config.json`` keys (diffusers'
    tile size, half-precision upcast switch and per-channel latent statistics); ``likelihood`` is the
    reconstruction likelihood the model was trained with (:class:`Likelihood`; None: not recorded).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    log_scale: str | None = None
    log_scale_channels: int | None = None
    log_scale_init: float = 0.0
    log_scale_detach: bool = False
    log_scale_head_layers: int = 0
    log_scale_head_channels: int | None = None
    log_scale_head_sees_mean: bool = False
    log_scale_head_sees_latent: bool = False
    log_scale_head_sees_edges: bool = False
    log_scale_coupling: bool = False
    sample_size: int | tuple[int, ...] = 512
    force_upcast: bool = True
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    likelihood: Likelihood | None = None

    def __post_init__(self) -> None:
        # Strict types, no silent coercion: a config read from a file names the field at fault.
        # JSON and YAML hand back lists; the config compares and hashes as a tuple.
        channels = self.block_out_channels
        if isinstance(channels, (str, bytes)) or not isinstance(channels, (list, tuple)) or not all(
            is_int(c) and c >= 1 for c in channels
        ):
            raise ValueError(f"block_out_channels must be a list of positive integers, got {channels!r}")
        self.block_out_channels = tuple(channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "latent_channels"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of block_out_channels "
                f"{self.block_out_channels} (GroupNorm splits the channels into equal groups)"
            )
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_attention", "force_upcast", "log_scale_detach",
                     "log_scale_head_sees_mean", "log_scale_head_sees_latent", "log_scale_head_sees_edges",
                     "log_scale_coupling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("scaling_factor", "shift_factor", "log_scale_init"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))
        size = self.sample_size
        if isinstance(size, list):
            size = self.sample_size = tuple(size)
        if not (is_int(size) and size >= 1) and not (
            isinstance(size, tuple) and size and all(is_int(s) and s >= 1 for s in size)
        ):
            raise ValueError(f"sample_size must be a positive integer or a list of them, got {self.sample_size!r}")
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, finite_numbers(name, getattr(self, name), self.latent_channels))
        if isinstance(self.likelihood, dict):
            known = {f.name for f in dataclasses.fields(Likelihood)}
            unknown = sorted(set(self.likelihood) - known)
            if unknown:
                raise ValueError(f"unknown likelihood key(s) {unknown}; valid keys: {sorted(known)}")
            self.likelihood = Likelihood(**self.likelihood)
        if self.likelihood is not None:
            if not isinstance(self.likelihood, Likelihood):
                raise ValueError(f"likelihood must be a mapping or null, got {self.likelihood!r}")
            free = self.likelihood.free
            if self.likelihood.granularity == "channel" and free is not None and len(free) != self.out_channels:
                raise ValueError(
                    f"likelihood.free of a channel scale must hold out_channels={self.out_channels} values, got {len(free)}"
                )
        if self.log_scale not in LOG_SCALE_KINDS:
            raise ValueError(f"log_scale must be one of {LOG_SCALE_KINDS}, got {self.log_scale!r}")
        if self.log_scale_channels not in (None, 1, self.out_channels):
            raise ValueError(
                f"log_scale_channels must be None, 1 or out_channels={self.out_channels}, "
                f"got {self.log_scale_channels!r}"
            )
        if not is_int(self.log_scale_head_layers) or self.log_scale_head_layers < 0:
            raise ValueError(f"log_scale_head_layers must be an integer >= 0, got {self.log_scale_head_layers!r}")
        if self.log_scale_head_channels is not None and not (
            is_int(self.log_scale_head_channels) and self.log_scale_head_channels >= 1
        ):
            raise ValueError(f"log_scale_head_channels must be None or >= 1, got {self.log_scale_head_channels!r}")
        if self.log_scale_coupling and (self.log_scale != "pixel" or self.head_channels != self.out_channels
                                        or self.out_channels < 2):
            raise ValueError(
                f"log_scale_coupling needs a per-pixel head (log_scale='pixel') with one map per channel of at least "
                f"2 channels; got log_scale={self.log_scale!r}, log_scale_channels={self.log_scale_channels!r}, "
                f"out_channels={self.out_channels}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def head_channels(self) -> int:
        return self.log_scale_channels or self.out_channels

    @property
    def coupling_maps(self) -> int:
        """The head's coefficient maps after its log-scales: ``C (C - 1) / 2`` with ``log_scale_coupling``, else 0."""
        return self.out_channels * (self.out_channels - 1) // 2 if self.log_scale_coupling else 0

    def without_head(self) -> "AutoencoderConfig":
        """This config with every ``log_scale*`` field at its no-head default; a per-pixel
        ``likelihood`` lives in the head, so it goes too."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("log_scale")}
        if self.likelihood is not None and self.likelihood.granularity == "pixel":
            defaults["likelihood"] = None
        return dataclasses.replace(self, **defaults)

    # diffusers reads a model's config as a mapping too (``vae.config["sample_size"]``,
    # ``vae.config.get(...)``), and under its own names for what the ldm layout fixes.

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return ("DownEncoderBlock2D",) * len(self.block_out_channels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * len(self.block_out_channels)

    @property
    def act_fn(self) -> str:
        return "silu"

    @property
    def mid_block_add_attention(self) -> bool:
        return self.mid_block_attention

    def keys(self) -> list[str]:
        """Every field, then diffusers' names for what the architecture fixes
        (``down_block_types``, ``up_block_types``, ``act_fn``, ``mid_block_add_attention``)."""
        return [f.name for f in dataclasses.fields(self)] + list(DIFFUSERS_CONFIG_ALIASES)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{key!r} is not an AutoencoderConfig key; valid keys: {self.keys()}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists once serialised; ``from_dict`` restores them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoencoderConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an AutoencoderConfig must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)


def _head_arguments(config: AutoencoderConfig) -> dict[str, Any]:
    """``Decoder.add_log_scale_head`` arguments from a config with ``log_scale == "pixel"``."""
    return dict(
        channels=config.head_channels, init=config.log_scale_init, detach=config.log_scale_detach,
        layers=config.log_scale_head_layers, hidden=config.log_scale_head_channels,
        sees_mean=config.log_scale_head_sees_mean, sees_latent=config.log_scale_head_sees_latent,
        sees_edges=config.log_scale_head_sees_edges, coupling_maps=config.coupling_maps,
    )


def _check_batch(method: str, name: str, t: Any, channels: int, field: str) -> None:
    """A ``ValueError`` naming the argument and its shape unless ``t`` is ``(B, channels, H, W)``."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{method}: {name} must be a torch.Tensor (B, {channels}, H, W), got {type(t).__name__}")
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(
            f"{method}: {name} must have shape (B, {channels}, H, W) ({field}={channels}), got {tuple(t.shape)}"
        )


@dataclass
class Reconstruction:
    """Decoder output. ``mean``: ``(B, out_channels, H, W)``. ``log_scale``: the raw head output
    ``(B, out_channels or 1, H, W)`` (no bounding applied; bounded then corrected when the model
    carries a calibration, see :meth:`AutoencoderKL.decode`), or None when the model has no head.
    ``coupling``: the head's raw colour-coupling coefficient maps ``(B, C (C - 1) / 2, H, W)``
    (``log_scale_coupling``; the loss bounds them), None otherwise.
    ``sample``: the mean again, under the name of diffusers' ``DecoderOutput.sample``."""

    mean: Tensor
    log_scale: Tensor | None = None
    coupling: Tensor | None = None

    @property
    def sample(self) -> Tensor:
        return self.mean


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)`` moments (mean, log-variance)."""

    def __init__(
        self,
        *,
        in_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        latent_channels: int,
        mid_block_attention: bool,
    ) -> None:
        super().__init__()
        channels, groups, last = block_out_channels, norm_num_groups, len(block_out_channels) - 1
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            Level(
                in_channels=channels[max(i - 1, 0)],
                out_channels=channels[i],
                num_blocks=layers_per_block,
                groups=groups,
                resample="down" if i < last else None,
            )
            for i in range(len(channels))
        )
        self.mid = MidBlock(channels=channels[-1], groups=groups, attention=mid_block_attention)
        self.norm_out = group_norm(channels=channels[-1], groups=groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False
        self.channels_last_on_cpu = True  # see activation_layout

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(activation_layout(x, self.channels_last_on_cpu))
        for level in self.down:
            h = run_maybe_checkpointed(level, h, self.gradient_checkpointing)
        h = run_maybe_checkpointed(self.mid, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # callers get the usual layout


EDGE_FLOOR = 0.01
"""Added to the gradient magnitude before its log in :func:`log_edge_magnitude` ([-1, 1] units: about
1.3 levels of an 8-bit image): below it, a flat region's error is noise and quantisation, not detail."""


def edge_magnitude(image: Tensor) -> Tensor:
    """The local gradient magnitude of ``image`` ``(B, C, H, W)``, per channel:
    ``|x[i, j+1] - x[i, j]| + |x[i+1, j] - x[i, j]|`` (0 past the last column and row) averaged over
    the 5 x 5 window around each pixel (the window cut at the border, not padded); same shape."""
    gx = F.pad((image[..., :, 1:] - image[..., :, :-1]).abs(), (0, 1))
    gy = F.pad((image[..., 1:, :] - image[..., :-1, :]).abs(), (0, 0, 0, 1))
    return F.avg_pool2d(gx + gy, 5, stride=1, padding=2, count_include_pad=False)


def log_edge_magnitude(image: Tensor) -> Tensor:
    """``log(EDGE_FLOOR + edge_magnitude(image))``: what the per-pixel head reads with
    ``log_scale_head_sees_edges``."""
    return torch.log(edge_magnitude(image) + EDGE_FLOOR)


def log_scale_layers(in_channels: int, maps: int, layers: int, hidden: int) -> tuple[nn.Sequential | None, nn.Conv2d]:
    """The per-pixel head's modules: ``log_scale_trunk`` (``layers`` x [3x3 conv to ``hidden``
    channels, SiLU], None for 0 layers) and the output 3x3 conv ``log_scale_head`` to ``maps``
    maps, default-initialised. Shared by :meth:`Decoder.add_log_scale_head` and
    :func:`hetvae.attach_log_scale_head`, so an attached head is hetvae's own."""
    trunk = None
    width = in_channels
    if layers > 0:
        parts: list[nn.Module] = []
        for i in range(layers):
            parts += [nn.Conv2d(width if i == 0 else hidden, hidden, kernel_size=3, padding=1), nn.SiLU()]
        trunk = nn.Sequential(*parts)
        width = hidden
    return trunk, nn.Conv2d(width, maps, kernel_size=3, padding=1)


class Decoder(nn.Module):
    """``(B, latent_channels, h, w) -> (mean (B, out_channels, fh, fw), head output or None)``; the
    head's output is its log-scale maps, then its coupling maps if it has any (``coupling_maps``).

    ``up[i]`` is resolution level ``i`` (0 = full resolution), run from the last to the first, as
    in the ldm layout.
    """

    def __init__(
        self,
        *,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        latent_channels: int,
        mid_block_attention: bool,
    ) -> None:
        super().__init__()
        channels, groups, last = block_out_channels, norm_num_groups, len(block_out_channels) - 1
        self.conv_in = nn.Conv2d(latent_channels, channels[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(channels=channels[-1], groups=groups, attention=mid_block_attention)
        self.up = nn.ModuleList(
            Level(
                in_channels=channels[min(i + 1, last)],
                out_channels=channels[i],
                num_blocks=layers_per_block + 1,
                groups=groups,
                resample="up" if i > 0 else None,
            )
            for i in range(len(channels))
        )
        self.norm_out = group_norm(channels=channels[0], groups=groups)
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)
        self.log_scale_head: nn.Conv2d | None = None
        self.log_scale_trunk: nn.Sequential | None = None
        self.log_scale_detach = False
        self.log_scale_sees_mean = False
        self.log_scale_sees_latent = False
        self.log_scale_sees_edges = False
        self.gradient_checkpointing = False
        self.channels_last_on_cpu = True  # see activation_layout

    def add_log_scale_head(
        self,
        *,
        channels: int,
        init: float,
        detach: bool,
        layers: int = 0,
        hidden: int | None = None,
        sees_mean: bool = False,
        sees_latent: bool = False,
        sees_edges: bool = False,
        coupling_maps: int = 0,
    ) -> None:
        """Create ``log_scale_head`` (zero weights, bias ``init``; ``coupling_maps`` more output
        maps after the ``channels`` log-scales, weights and bias zero) and, with ``layers`` > 0, the
        ``log_scale_trunk`` before it (``layers`` x [3x3 conv to ``hidden`` channels, SiLU], default
        init), on ``conv_out``'s device and dtype. The zero output conv makes the map ``init``
        everywhere at creation, whatever the trunk computes. The head reads the last features, then
        the mean (``sees_mean``), then the up-sampled latent (``sees_latent``), then the mean's
        :func:`log_edge_magnitude` (``sees_edges``), in that channel order."""
        if self.log_scale_head is not None:
            raise ValueError("the decoder already has a log_scale_head")
        ref = self.conv_out.weight
        width = (self.conv_out.in_channels + (self.conv_out.out_channels if sees_mean else 0)
                 + (self.conv_in.in_channels if sees_latent else 0)
                 + (self.conv_out.out_channels if sees_edges else 0))
        trunk, head = log_scale_layers(width, channels + coupling_maps, layers, hidden or self.conv_out.in_channels)
        self.log_scale_trunk = None if trunk is None else trunk.to(device=ref.device, dtype=ref.dtype)
        head.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(init)
            head.bias[channels:] = 0.0  # coefficient maps: zero, no coupling until trained
        self.log_scale_head = head
        self.log_scale_detach = detach
        self.log_scale_sees_mean = sees_mean
        self.log_scale_sees_latent = sees_latent
        self.log_scale_sees_edges = sees_edges

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.conv_in(activation_layout(z, self.channels_last_on_cpu))
        h = run_maybe_checkpointed(self.mid, h, self.gradient_checkpointing)
        for level in reversed(self.up):
            h = run_maybe_checkpointed(level, h, self.gradient_checkpointing)
        features = F.silu(self.norm_out(h))
        mean = self.conv_out(features).contiguous()  # a few channels: cheap to give back in the usual layout
        if self.log_scale_head is None:
            return mean, None
        h = features.detach() if self.log_scale_detach else features
        extra = [mean.detach()] if self.log_scale_sees_mean else []
        if self.log_scale_sees_latent:
            up = F.interpolate(z, size=mean.shape[-2:], mode="nearest")  # each latent pixel over its block
            extra.append(up.detach() if self.log_scale_detach else up)
        if self.log_scale_sees_edges:
            extra.append(log_edge_magnitude(mean.detach()))
        if extra:
            h = torch.cat([h, *(activation_layout(e, self.channels_last_on_cpu) for e in extra)], dim=1)
        if self.log_scale_trunk is not None:
            h = self.log_scale_trunk(h)
        return mean, self.log_scale_head(h).contiguous()


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    # Every tile is full-sized: the last one is moved back to end at the border instead of being cut.
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _blend_window(starts: list[int], length: int, *, like: Tensor) -> list[Tensor]:
    """One ``(length,)`` weight vector per tile of an axis whose tiles start at ``starts``.

    Across the whole overlap ``[a, b)`` of neighbours ``k-1`` and ``k`` (the actual one: the last
    tile, moved back to end at the border, overlaps more than the others), tile ``k`` rises as
    ``p(u) = 3u^2 - 2u^3`` and tile ``k-1`` falls as ``1 - p(u)``, ``u = (x + 0.5 - a) / (b - a)``;
    elsewhere a tile weighs 1. Where two tiles overlap the weights sum to exactly 1 (a partition of
    unity), and ``p`` has zero slope at both ends, so the blend has no kink at a band's edge and a
    tile's own border pixels, the ones its convolutions zero-padded, weigh almost nothing
    (``~3 / (4 L^2)`` for a band of ``L`` pixels). Where three tiles meet (tiles much smaller than the
    image's remainder) :func:`tiled_apply` divides by the sum. Strictly positive within a tile."""
    pos = torch.arange(length, device=like.device, dtype=torch.float64) + 0.5
    windows = []
    for k, s in enumerate(starts):
        w = torch.ones(length, device=like.device, dtype=torch.float64)
        if k > 0 and starts[k - 1] + length > s:  # rise across the overlap with the previous tile
            u = (pos / (starts[k - 1] + length - s)).clamp(0, 1)
            w = w * u * u * (3 - 2 * u)
        if k + 1 < len(starts) and s + length > starts[k + 1]:  # fall across the overlap with the next
            a = starts[k + 1] - s
            u = ((pos - a) / (length - a)).clamp(0, 1)
            w = w * (1 - u * u * (3 - 2 * u))
        windows.append(w.to(like.dtype))
    return windows


def tiled_apply(
    fn: Callable[[Tensor], tuple[Tensor | None, ...]],
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    scale: tuple[int, int],
) -> tuple[Tensor | None, ...]:
    """Apply ``fn`` to overlapping ``tile x tile`` crops of ``x`` ``(B, C, H, W)`` and blend.

    ``fn`` maps a crop ``(B, C, t, t)`` to tensors ``(B, C_k, t*n/d, t*n/d)`` (``scale = (n, d)``)
    or None. Crops start every ``tile - overlap`` pixels (the last one moved back to end at the
    border); each output is the weighted average of the tiles covering it, with the smooth
    partition-of-unity weights of :func:`_blend_window` spanning each whole overlap, so the result
    is continuous, with a continuous slope, across tile borders and equals the tile's own output
    away from the overlaps. Every output (the mean and the log-scale map alike) is blended with the
    same weights in the space ``fn`` returns it in: log-scales linearly, i.e. a weighted geometric
    mean of the scales. Matching the moments of the tiles' mixture instead would add the tiles'
    disagreement about the mean to the scale exactly along the overlaps, drawing the seams into the
    map; blending like the mean keeps a constant map constant and the map's tiled-vs-untiled
    difference as small as the mean's (``docs/performance.md``, ``tests/test_tiling_seams.py``).
    """
    num, den = scale
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    rows = _tile_starts(height, th, tile - overlap)
    cols = _tile_starts(width, tw, tile - overlap)
    oh, ow = th * num // den, tw * num // den
    acc: list[Tensor | None] | None = None
    weight_sum: Tensor | None = None
    for row, i in enumerate(rows):
        for col, j in enumerate(cols):
            outs = fn(x[..., i : i + th, j : j + tw])
            ref = next(o for o in outs if o is not None)
            if acc is None:
                out_hw = (height * num // den, width * num // den)
                acc = [None if o is None else o.new_zeros(*o.shape[:2], *out_hw) for o in outs]
                weight_sum = ref.new_zeros(out_hw)
                wys = _blend_window([r * num // den for r in rows], oh, like=ref)
                wxs = _blend_window([c * num // den for c in cols], ow, like=ref)
            w = wys[row][:, None] * wxs[col][None, :]
            oi, oj = i * num // den, j * num // den
            for a, o in zip(acc, outs):
                if a is not None:
                    a[..., oi : oi + oh, oj : oj + ow] += o * w
            weight_sum[oi : oi + oh, oj : oj + ow] += w
    return tuple(None if a is None else a / weight_sum for a in acc)


class AutoencoderKL(nn.Module):
    """The SD VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> Reconstruction``.

    Large inputs: ``enable_tiling()`` (overlapping tiles, smoothly blended; the log-scale map too),
    ``enable_slicing()`` (one sample at a time), ``enable_gradient_checkpointing()``. On the CPU the
    activations run channels_last (see :func:`activation_layout`); inputs and outputs keep the
    usual layout.
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        config = dataclasses.replace(config) if config is not None else AutoencoderConfig()
        self.config = config
        common = dict(
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            latent_channels=config.latent_channels,
            mid_block_attention=config.mid_block_attention,
        )
        self.encoder = Encoder(in_channels=config.in_channels, **common)
        self.decoder = Decoder(out_channels=config.out_channels, **common)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)
            if config.use_post_quant_conv
            else None
        )
        if config.log_scale == "pixel":
            self.decoder.add_log_scale_head(**_head_arguments(config))
        self.use_slicing = False
        self.use_tiling = False
        self.use_calibration = True
        """Whether :meth:`decode` returns the calibrated log-scale when the model carries a
        calibration (then bounded and corrected, see :mod:`hetvae.calibration`); when False, or
        without one, ``log_scale`` is the head's raw output (what the loss bounds)."""
        self.tile_sample_size = 512
        self.tile_overlap = 0.25

    # --- head ------------------------------------------------------------------------------

    def add_log_scale_head(
        self,
        channels: int | None = None,
        init: float = 0.0,
        detach: bool = False,
        *,
        layers: int = 0,
        hidden: int | None = None,
        sees_mean: bool = False,
        sees_latent: bool = False,
        sees_edges: bool = False,
        coupling: bool = False,
    ) -> None:
        """Graft a per-pixel log-scale head (zero output weights, bias ``init``): the mean output is
        unchanged bit for bit and ``log_scale == init`` everywhere until the head is trained.
        ``channels``: None for ``out_channels`` maps, 1 for one shared map. ``layers``, ``hidden``,
        ``sees_mean``, ``sees_latent``, ``sees_edges``: the head's hidden layers, their width and
        whether it reads the mean output, the latent and the mean's edge magnitude
        (``AutoencoderConfig.log_scale_head_*``); ``coupling``: it also predicts the colour-coupling
        coefficient maps (``AutoencoderConfig.log_scale_coupling``), zero until trained.

        The head changes the likelihood: a recorded ``global`` / ``channel`` likelihood becomes the
        per-pixel one (:meth:`hetvae.likelihood.Likelihood.with_grafted_head`: family, bounds and
        margin kept), and a calibration fitted for that scale is dropped with a
        :class:`hetvae.likelihood.CalibrationDropped` warning. A per-pixel record is kept: it
        describes the head being added (a model built from its config first)."""
        record = self.config.likelihood
        if record is not None and record.granularity != "pixel":
            record = grafted_record(record, init)
        config = dataclasses.replace(
            self.config, likelihood=record, log_scale="pixel", log_scale_channels=channels, log_scale_init=float(init),
            log_scale_detach=bool(detach), log_scale_head_layers=int(layers), log_scale_head_channels=hidden,
            log_scale_head_sees_mean=bool(sees_mean), log_scale_head_sees_latent=bool(sees_latent),
            log_scale_head_sees_edges=bool(sees_edges), log_scale_coupling=bool(coupling),
        )
        self.decoder.add_log_scale_head(**_head_arguments(config))
        self.config = config

    def remove_log_scale_head(self) -> None:
        """Drop the per-pixel head (output conv and hidden layers); the config says there is none."""
        self.decoder.log_scale_head = None
        self.decoder.log_scale_trunk = None
        self.decoder.log_scale_detach = False
        self.decoder.log_scale_sees_mean = False
        self.decoder.log_scale_sees_latent = False
        self.decoder.log_scale_sees_edges = False
        self.config = self.config.without_head()

    def _coupling_head(self, want: bool) -> nn.Conv2d:
        """The head's output conv, once checked that it can gain (``want``) or lose its coupling maps."""
        head, c = self.decoder.log_scale_head, self.config
        verb = "add colour-coupling maps to" if want else "remove colour-coupling maps from"
        if head is None:
            raise ValueError(f"cannot {verb} the log-scale head: the model has none (add_log_scale_head first)")
        if want and c.head_channels != c.out_channels:
            raise ValueError(
                f"cannot {verb} a shared log-scale head (log_scale_channels={c.log_scale_channels}, one map for "
                f"all {c.out_channels} channels): coupling needs one conditional log-scale map per channel"
            )
        if want and c.out_channels < 2:
            raise ValueError(f"cannot {verb} the log-scale head: out_channels={c.out_channels} has no pair of channels "
                             "to couple (needs at least 2)")
        if want == c.log_scale_coupling:
            has = "already predicts" if want else "does not predict"
            raise ValueError(f"cannot {verb} the log-scale head: it {has} them (log_scale_coupling={c.log_scale_coupling})")
        return head

    def _replace_head_conv(self, head: nn.Conv2d, rows: int) -> None:
        """Swap the output conv for one with ``rows`` output maps: the first ``min(rows, old)``
        rows copied bit for bit, any new ones zero (weight and bias); same device, dtype and
        ``requires_grad``. A new module, so an optimizer built afterwards holds its parameters."""
        new = nn.Conv2d(head.in_channels, rows, kernel_size=head.kernel_size, padding=head.padding)
        new.to(device=head.weight.device, dtype=head.weight.dtype)
        keep = min(rows, head.out_channels)
        with torch.no_grad():
            new.weight.zero_()
            new.bias.zero_()
            new.weight[:keep] = head.weight[:keep]
            new.bias[:keep] = head.bias[:keep]
        new.weight.requires_grad_(head.weight.requires_grad)
        new.bias.requires_grad_(head.bias.requires_grad)
        new.train(head.training)
        self.decoder.log_scale_head = new

    def add_coupling_maps(self) -> None:
        """Widen the per-pixel head into one that also predicts the ``C (C - 1) / 2`` colour-coupling
        coefficient maps (``AutoencoderConfig.log_scale_coupling``; docs/math.md "Coupled colour
        channels"): its output conv gains that many rows after its ``C`` log-scale rows, weight and
        bias zero, the old rows copied bit for bit. The coefficients are then zero everywhere, where
        the coupled NLL is the uncoupled one: the mean, the log-scales and the loss are unchanged
        until the new rows are trained. The conv is a new module: build the optimizer after.

        A per-pixel ``likelihood`` record becomes ``channel_coupling: "pixel"`` (a ``"global"``
        record's coefficients are dropped, as the head's maps replace them; its channel order and any
        calibration are kept: at zero coefficients the scales are the calibrated ones).

        Raises:
            ValueError: no head, a shared (one-map) head, fewer than 2 output channels, or a head that
                already predicts the maps.
        """
        head = self._coupling_head(True)
        config = dataclasses.replace(self.config, log_scale_coupling=True)
        record = config.likelihood
        if record is not None and record.granularity == "pixel":
            config.likelihood = dataclasses.replace(record, channel_coupling="pixel", coupling=None)
        self._replace_head_conv(head, config.head_channels + config.coupling_maps)
        self.config = config

    def remove_coupling_maps(self) -> None:
        """The inverse of :meth:`add_coupling_maps`: drop the head's colour-coupling rows, keeping its
        log-scale rows bit for bit. The log-scales it predicts were trained as each channel's scale
        *given the earlier channels*, not as the unconditional scale (wider where the channels'
        errors are correlated): score or fine-tune the model knowing that.

        A per-pixel ``likelihood`` record becomes ``channel_coupling: "none"``; a calibration in it
        was fitted on the conditional residuals and is dropped with a
        :class:`hetvae.likelihood.CalibrationDropped` warning.

        Raises:
            ValueError: no head, or a head without coupling maps.
        """
        head = self._coupling_head(False)
        config = dataclasses.replace(self.config, log_scale_coupling=False)
        record = config.likelihood
        if record is not None and record.channel_coupling == "pixel":
            if record.calibration is not None:
                warnings.warn(
                    "the model's post-hoc calibration was fitted on the residuals given the coupled colour channels; "
                    "without the coupling maps it no longer applies, so it is dropped (fit one for the new model "
                    "with hetvae calibrate)", CalibrationDropped, stacklevel=2,
                )
            config.likelihood = dataclasses.replace(
                record, channel_coupling="none", coupling=None, coupling_order=None, calibration=None)
        self._replace_head_conv(head, config.head_channels)
        self.config = config

    @torch.no_grad()
    def zero_init_residual(self) -> None:
        """Zero the last convolution of every ResNet block (weight and bias), so each block starts
        as the identity (its shortcut). For training from scratch; the mean output stays a
        function of the input through the shortcuts, and every parameter still gets gradients."""
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()

    @torch.no_grad()
    def amplify_input_chroma(self, gain: float) -> None:
        """Make the encoder's first convolution read the input's chroma ``gain`` times amplified:
        its weight ``W`` (over the RGB inputs) becomes ``W @ T`` with ``T = P + gain * (I - P)``,
        ``P`` the projection onto the grey axis ``(1, 1, 1) / sqrt(3)``. Luminance is read as
        before. For training from scratch: chroma is a small share of a photograph's variance, so
        a randomly initialised encoder starts nearly blind to it and learns colour last (the model
        reconstructs grey first and saturated colours washed out; CHANGELOG.md)."""
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be finite and > 0, got {gain}")
        weight = self.encoder.conv_in.weight
        if weight.shape[1] != 3:
            raise ValueError(f"amplify_input_chroma needs 3 input channels (RGB), the encoder has {weight.shape[1]}")
        grey = torch.full((3, 3), 1.0 / 3.0, dtype=weight.dtype, device=weight.device)
        transform = grey + gain * (torch.eye(3, dtype=weight.dtype, device=weight.device) - grey)
        weight.copy_(torch.einsum("oikl,ij->ojkl", weight, transform))

    @torch.no_grad()
    def init_posterior_logvar(self, value: float) -> None:
        """Start the posterior's log-variance near ``value``: the bias of the layer that outputs
        the moments (``quant_conv``, or the encoder's ``conv_out`` without one) is set to ``value``
        for the log-variance half. For training from scratch: a default init gives every latent
        noise of std ~1, which the decoder has to learn through for hundreds of steps."""
        layer = self.quant_conv if self.quant_conv is not None else self.encoder.conv_out
        half = layer.out_channels // 2
        layer.bias[half:] = value

    @property
    def has_log_scale_head(self) -> bool:
        return self.decoder.log_scale_head is not None

    @property
    def last_layer(self) -> Tensor:
        """``decoder.conv_out.weight``: the layer the adaptive GAN weight differentiates (never the head)."""
        return self.decoder.conv_out.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter, as diffusers' ``ModelMixin.dtype``."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """The device of the first parameter, as diffusers' ``ModelMixin.device``."""
        return next(self.parameters()).device

    # --- switches --------------------------------------------------------------------------

    def enable_tiling(
        self, use_tiling: bool = True, *, tile_sample_size: int | None = None, overlap: float | None = None
    ) -> None:
        """Encode/decode inputs larger than ``tile_sample_size`` pixels in overlapping tiles.

        Callable as diffusers' ``AutoencoderKL.enable_tiling()`` is (no argument, as pipelines call
        it; ``use_tiling``, positional or keyword, as older diffusers releases took it: False turns
        tiling off). ``tile_sample_size``: tile size in pixels, a multiple of ``downsample_factor``;
        ``overlap``: fraction of a tile shared with its neighbour, in ``[0, 0.5)``; None keeps the
        current setting (512 and 0.25 at creation, diffusers' ``tile_sample_min_size`` and
        ``tile_overlap_factor`` for SD). Tiles are normalised separately (GroupNorm statistics and
        attention are per tile), so the result differs from the untiled one, the mean and the
        log-scale map alike; the blend itself adds no seam (see :func:`tiled_apply`).
        """
        if not isinstance(use_tiling, bool):
            raise ValueError(
                f"enable_tiling: use_tiling must be True or False, got {use_tiling!r}; pass a tile size by "
                f"keyword: enable_tiling(tile_sample_size={use_tiling!r})"
            )
        tile = self.tile_sample_size if tile_sample_size is None else tile_sample_size
        overlap = self.tile_overlap if overlap is None else overlap
        f = self.config.downsample_factor
        if not is_int(tile) or tile <= 0 or tile % f:
            raise ValueError(f"tile_sample_size must be a positive multiple of {f}, got {tile!r}")
        if not is_number(overlap) or not 0.0 <= overlap < 0.5:
            raise ValueError(f"overlap must be in [0, 0.5), got {overlap!r}")
        self.use_tiling, self.tile_sample_size, self.tile_overlap = use_tiling, tile, float(overlap)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Run encode/decode one sample at a time (lower peak memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute level activations in the backward pass instead of storing them."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    # --- encode / decode -------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        f = self.config.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"encode: height and width must be multiples of {f}, got {height}x{width}: the encoder "
                f"halves the resolution {len(self.config.block_out_channels) - 1} times, and a remainder "
                f"would be dropped, making the decoded image smaller than the input. Pad the image, or "
                f"call the model itself (forward), which pads to a multiple of {f} and crops back."
            )

    def _encode_tile(self, x: Tensor) -> tuple[Tensor]:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return (moments,)

    def _encode_moments(self, x: Tensor) -> Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            f = self.config.downsample_factor
            overlap = int(self.tile_sample_size * self.tile_overlap) // f * f
            (moments,) = tiled_apply(
                self._encode_tile, x, tile=self.tile_sample_size, overlap=overlap, scale=(1, f)
            )
            return moments
        return self._encode_tile(x)[0]

    def encode(self, x: Tensor, return_dict: bool = True) -> DiagonalGaussian | tuple[DiagonalGaussian]:
        """``(B, in_channels, H, W)`` with ``H, W`` multiples of ``downsample_factor`` ->
        posterior over ``(B, latent_channels, H/f, W/f)``.

        diffusers' face: the posterior is its own ``.latent_dist`` (``encode(x).latent_dist.sample(
        generator)``, ``retrieve_latents``); ``return_dict=False`` gives the 1-tuple ``(posterior,)``.
        """
        _check_batch("encode", "x", x, self.config.in_channels, "in_channels")
        self._check_size(*x.shape[-2:])
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_moments(s) for s in x.split(1)])
        else:
            moments = self._encode_moments(x)
        posterior = DiagonalGaussian(moments)
        return posterior if return_dict else (posterior,)

    def _decode_tile(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_one(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        f = self.config.downsample_factor
        tile = self.tile_sample_size // f
        if self.use_tiling and max(z.shape[-2:]) > tile:
            return tiled_apply(self._decode_tile, z, tile=tile, overlap=int(tile * self.tile_overlap), scale=(f, 1))
        return self._decode_tile(z)

    def decode(
        self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> Reconstruction | tuple[Tensor]:
        """``(B, latent_channels, h, w) -> Reconstruction`` at ``(fh, fw)``. Pass unscaled latents
        (divide diffusion latents by ``scaling_factor`` and add ``shift_factor`` first).

        diffusers' face: ``.sample`` is the mean (``DecoderOutput.sample``), ``.log_scale`` stays;
        ``return_dict=False`` gives the 1-tuple ``(mean,)`` as diffusers does (the log-scale is
        only in the ``Reconstruction``); ``generator`` is accepted and unused, as in diffusers'
        ``AutoencoderKL``: decoding draws nothing.
        """
        _check_batch("decode", "z", z, self.config.latent_channels, "latent_channels")
        if self.use_slicing and z.shape[0] > 1:
            parts = [self._decode_one(s) for s in z.split(1)]
            mean = torch.cat([p[0] for p in parts])
            log_scale = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        else:
            mean, log_scale = self._decode_one(z)
        coupling = None
        if log_scale is not None and self.config.coupling_maps:  # the head's coefficient maps follow its log-scales
            maps = self.config.head_channels
            log_scale, coupling = log_scale[:, :maps].contiguous(), log_scale[:, maps:].contiguous()
        if log_scale is not None and self.use_calibration:
            cal = self.calibration
            if cal is not None:
                log_scale = self.config.likelihood.bound(log_scale, cal, mean)
        rec = Reconstruction(mean=mean, log_scale=log_scale, coupling=coupling)
        return rec if return_dict else (rec.mean,)

    @property
    def calibration(self):
        """The post-hoc scale correction stored with the model
        (``config.likelihood.calibration`` as a :class:`hetvae.calibration.Calibration`), or None."""
        lik = self.config.likelihood
        if lik is None or lik.calibration is None:
            return None
        cached = getattr(self, "_calibration_cache", None)
        if cached is None or cached[0] is not lik.calibration:
            cal = lik.calibrator()  # ValueError for a damaged record (a model holding one still loads)
            if cal.slope.numel() != self.config.out_channels:
                raise ValueError(f"likelihood.calibration has {cal.slope.numel()} channel(s), the model "
                                 f"out_channels={self.config.out_channels}")
            cached = (lik.calibration, cal)
            self._calibration_cache = cached
        return cached[1]

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Reconstruction, DiagonalGaussian]:
        """Reconstruct ``x`` ``(B, C, H, W)``. Any ``H, W`` is accepted: the image is padded
        (edge replication, bottom/right) to a multiple of ``downsample_factor`` and the
        reconstruction cropped back to ``H x W``; the posterior is that of the padded image."""
        height, width = x.shape[-2:]
        f = self.config.downsample_factor
        pad_h, pad_w = -height % f, -width % f
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        rec = self.decode(z)
        if pad_h or pad_w:
            rec = Reconstruction(
                mean=rec.mean[..., :height, :width],
                log_scale=None if rec.log_scale is None else rec.log_scale[..., :height, :width],
                coupling=None if rec.coupling is None else rec.coupling[..., :height, :width],
            )
        return rec, posterior

    # --- files -----------------------------------------------------------------------------

    def save_pretrained(
        self,
        path: str | Path,
        format: str = "hetvae",
        *,
        likelihood: Any = None,
        overwrite: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> Path:
        """Write the model in ``format`` ("hetvae", "diffusers" or "ldm"), with ``likelihood`` (a
        ``HeteroscedasticNLL`` or ``Likelihood``) recorded in its config when given; ``overwrite=False``
        refuses to replace an existing model. diffusers' arguments, for ``format="diffusers"``:
        ``variant="fp16"`` names the weights ``diffusion_pytorch_model.fp16.safetensors`` (the
        weights keep their dtype, as in diffusers: call ``.half()`` first for fp16 weights),
        ``safe_serialization=False`` writes ``diffusion_pytorch_model.bin``. See
        ``hetvae.convert.save_autoencoder``."""
        from hetvae.convert import save_autoencoder  # convert imports this module

        return save_autoencoder(
            self, path, format=format, likelihood=likelihood, overwrite=overwrite,
            safe_serialization=safe_serialization, variant=variant,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        log_scale: str | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> "AutoencoderKL":
        """``hetvae.convert.load_autoencoder(path / subfolder, log_scale, **overrides)``: a hetvae,
        diffusers or ldm folder or file, at a local path or a Hugging Face Hub id (``org/name``,
        ``org/name/vae``, ``org/name/file.safetensors``, ``@revision``: :func:`hetvae.hub.resolve_model`).
        diffusers' arguments: ``subfolder`` (e.g. ``"vae"`` in a pipeline), ``revision`` (of a Hub
        repository), ``variant`` (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``),
        ``use_safetensors`` (True: only ``.safetensors`` weights, False: only ``.bin``),
        ``torch_dtype`` or its newer name ``dtype`` (the model is cast to it; float32 otherwise),
        ``cache_dir``, ``token``, ``force_download``, ``local_files_only`` (for a Hub id, as
        ``huggingface_hub.snapshot_download`` takes them) and ``low_cpu_mem_usage`` (either value:
        hetvae reads the weights in full). Those hetvae cannot honour (device maps, quantisation:
        :data:`_DIFFUSERS_LOADING_ARGUMENTS`) raise ``ValueError`` naming what to do instead, unless
        given the value that asks for nothing."""
        from hetvae.convert import load_autoencoder

        refused = [
            f"{name}={overrides[name]!r} is not supported: {why}"
            for name, (neutral, why) in _DIFFUSERS_LOADING_ARGUMENTS.items()
            if name in overrides and not any(overrides[name] is v for v in neutral)
        ]
        if refused:
            raise ValueError("AutoencoderKL.from_pretrained: " + "; ".join(refused))
        overrides = {k: v for k, v in overrides.items() if k not in _DIFFUSERS_LOADING_ARGUMENTS}
        fields = {f.name for f in dataclasses.fields(AutoencoderConfig)} - {"log_scale"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown override(s) {unknown}: from_pretrained takes diffusers' subfolder, variant, revision, "
                f"use_safetensors, torch_dtype (dtype), cache_dir, token, force_download, local_files_only and "
                f"low_cpu_mem_usage, and "
                f"AutoencoderConfig fields: {sorted(fields)}"
            )
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"torch_dtype and dtype are one argument (diffusers' old and new name), got {torch_dtype!r} "
                             f"and {dtype!r}: pass one")
        name, cast = ("torch_dtype", torch_dtype) if dtype is None else ("dtype", dtype)
        if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
            raise ValueError(f"{name} must be a floating-point torch.dtype, got {cast!r}")
        for name, value in (("force_download", force_download), ("local_files_only", local_files_only)):
            if value is not True and value is not False:
                raise ValueError(f"AutoencoderKL.from_pretrained: {name} must be True or False, got {value!r}")
        path = resolve_model(path, subfolder=subfolder, revision=revision, variant=variant, cache_dir=cache_dir,
                             token=token, force_download=force_download, local_files_only=local_files_only)
        model = load_autoencoder(path, log_scale=log_scale, variant=variant, use_safetensors=use_safetensors, **overrides)
        return model if cast is None else model.to(cast)
