"""Log-scale heads: where the scale of the reconstruction likelihood comes from.

Three granularities behind one call, ``head(target, mean, predicted=None, weights=None)``, which
returns the bounded log-scale, broadcastable to ``target`` (B, C, *spatial):

============  ==================  =====================================================
granularity   returned shape      source
============  ==================  =====================================================
``global``    ``()``              one learnable scalar (SD's ``logvar``) or the closed form
``channel``   ``(1, C, 1, ...)``  one learnable value per channel or the closed form
``pixel``     ``(B, C|1, ...)``   the decoder's predicted map (``Reconstruction.log_scale``)
============  ==================  =====================================================

Bounding: learned values live unconstrained (``free``, zero-initialised) and are mapped through
:func:`hetvae.functional.soft_clamp` as ``s = soft_clamp(init + free, *bounds, margin)``. The soft
clamp is the identity on ``[low + margin, high - margin]``, so a zero free parameter *is* the
configured ``init`` and SD's loss is reproduced exactly; towards the bounds the value saturates
smoothly, so no ``exp`` can overflow. The pixel head applies the same map to the decoder's raw map.

Two rules keep those promises true, and a constructor that would break one raises ``ValueError``:
the bounds are finite and inside ``[-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT]`` (see there), and a learned
``init`` lies in the identity band ``[low + margin, high - margin]`` (outside it the soft clamp
would move it: ``init=-6.5`` with the default bounds would start at -6.39).

``trainable=False`` (global / channel) freezes the learned value at ``init``: Stable Diffusion's
``LPIPSWithDiscriminator`` declared ``logvar`` a parameter but its optimiser never held it, so SD's
VAE trained with ``logvar = 0`` throughout (``configs/sd-reference.yaml``).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor, nn

from hetvae.functional import Family, check_family, check_float_tensor, optimal_log_scale, soft_clamp

DEFAULT_BOUNDS: tuple[float, float] = (-7.0, 3.0)
"""Default log-scale bounds: ``b`` in (9e-4, 20) on images in [-1, 1]. An 8-bit level is 2/255 wide
(log ~ -4.8), so scales far below it only reward over-fitting quantisation noise; the largest
residual is 2, so scales far above it explain nothing."""
DEFAULT_MARGIN = 1.0
LOG_SCALE_LIMIT = 20.0
"""Bounds must lie inside ``[-20, 20]``: there ``exp(-k s)`` and beta-NLL's ``exp(k beta s)`` stay below
``e^40 ~ 2.4e17`` (``k = 2`` for the Gaussian), so with residuals up to 1e4 (a Gaussian data term of
5e7) every element, gradient and sum over up to 1e12 elements is finite in float32. Bounds of
+-100 would give ``e^200``, which overflows. On images in [-1, 1] that still allows ``b`` from 2e-9
(far below float32's resolution of 1) to 5e8."""

Fit = Literal["learned", "optimal"]


class _BoundedLogScale(nn.Module):
    """Shared machinery: bounds, soft clamp, closed-form fit."""

    granularity: str = ""

    def __init__(
        self,
        *,
        init: float,
        bounds: tuple[float, float],
        margin: float,
        family: Family,
        fit: Fit,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(trainable, bool):
            raise ValueError(f"trainable must be True or False, got {type(trainable).__name__} {trainable!r}")
        low, high = check_bounds(bounds)
        margin = check_real("margin", margin)
        if not margin > 0.0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if not high - low > 2.0 * margin:
            raise ValueError(
                f"bounds {(low, high)} with margin {margin}: need high - low > 2 * margin > 0"
            )
        if fit not in ("learned", "optimal"):
            raise ValueError(f"fit must be 'learned' or 'optimal', got {fit!r}")
        if fit == "optimal" and self.granularity == "pixel":
            raise ValueError("fit='optimal' exists for 'global' and 'channel' granularity only")
        init = check_real("init", init)
        if not low < init < high:
            raise ValueError(f"init={init} must lie inside bounds {(low, high)}")
        if fit == "learned" and not low + margin <= init <= high - margin:
            # The soft clamp is the identity only on the band: elsewhere a zero free parameter (or the
            # pixel head's bias) would not give init, and "reproduces SD exactly" would silently fail.
            moved = float(soft_clamp(torch.tensor(init, dtype=torch.float64), low, high, margin))
            raise ValueError(
                f"init={init} lies within margin {margin} of bounds {(low, high)}, where the soft clamp is not "
                f"the identity: the log-scale would start at {moved:.4g}, not {init}. Keep init in "
                f"[{low + margin}, {high - margin}], widen the bounds, or lower margin to at most "
                f"{min(init - low, high - init):.4g}"
            )
        self.init = init
        self.bounds = (low, high)
        self.margin = margin
        self.family = check_family(family)
        self.fit = fit
        self.trainable = trainable

    def _free(self, shape: tuple[int, ...]) -> nn.Parameter | None:
        """The zero-initialised free parameter of a learned scale (None for ``fit="optimal"``). Frozen
        (``trainable=False``) it stays a parameter, so checkpoints keep their keys, but it takes no
        gradient and no optimiser holds it: the log-scale stays ``init`` exactly, as SD's ``logvar``,
        which its optimiser never included."""
        if self.fit != "learned":
            return None
        return nn.Parameter(torch.zeros(shape), requires_grad=self.trainable)

    def bound(self, raw: Tensor) -> Tensor:
        return soft_clamp(raw, *self.bounds, self.margin)

    def _refuse_map(self, predicted: Tensor | None) -> None:
        """Global and channel scales are parameters of the loss: a predicted map is a caller error."""
        if predicted is not None:
            raise ValueError(
                f"granularity '{self.granularity}' takes no predicted log_scale map; drop log_scale=..., "
                "or use granularity='pixel' to train the decoder's map"
            )

    def _check_channels(self, target: Tensor) -> None:
        if target.ndim < 2:
            raise ValueError(f"target must have a batch and a channel dimension (B, C, ...), got shape {tuple(target.shape)}")
        if target.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} has {self.channels} channels but target of shape {tuple(target.shape)} "
                f"has {target.shape[1]} in dimension 1"
            )

    def extra_repr(self) -> str:
        frozen = "" if self.trainable else ", trainable=False"
        return f"init={self.init}, bounds={self.bounds}, margin={self.margin}, family={self.family!r}, fit={self.fit!r}{frozen}"


class GlobalLogScale(_BoundedLogScale):
    """One log-scale for every element: SD's learnable ``logvar`` (a log-*scale* ``log b``)."""

    granularity = "global"

    def __init__(
        self,
        *,
        init: float = 0.0,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
        margin: float = DEFAULT_MARGIN,
        family: Family = "laplace",
        fit: Fit = "learned",
        trainable: bool = True,
    ) -> None:
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit, trainable=trainable)
        self.free = self._free(())

    def forward(
        self, target: Tensor, mean: Tensor, predicted: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Returns a scalar log-scale ``()``."""
        self._refuse_map(predicted)
        if self.fit == "optimal":
            return self.bound(optimal_log_scale(target, mean, "global", self.family, weights))
        return self.bound(self.init + self.free)


class ChannelLogScale(_BoundedLogScale):
    """One log-scale per channel, ``(C,)``, returned as a ``(1, C, 1, ...)`` view."""

    granularity = "channel"

    def __init__(
        self,
        *,
        channels: int,
        init: float = 0.0,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
        margin: float = DEFAULT_MARGIN,
        family: Family = "laplace",
        fit: Fit = "learned",
        trainable: bool = True,
    ) -> None:
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit, trainable=trainable)
        self.channels = check_channels(channels)
        self.free = self._free((self.channels,))

    def forward(
        self, target: Tensor, mean: Tensor, predicted: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Returns ``(1, C, 1, ...)`` with ``target.ndim`` dimensions."""
        self._refuse_map(predicted)
        self._check_channels(target)
        if self.fit == "optimal":
            s = optimal_log_scale(target, mean, "channel", self.family, weights)
        else:
            s = self.init + self.free
        return self.bound(s).view((1, -1) + (1,) * (target.ndim - 2))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, " + super().extra_repr()


class PixelLogScale(_BoundedLogScale):
    """Bounds a log-scale map predicted by the decoder's head; owns no parameters.

    The map must be ``(B, C, *spatial)`` (one per channel) or ``(B, 1, *spatial)`` (shared), with
    the target's batch and spatial sizes; ``channels`` is C, the target's channel count. ``init`` is
    the decoder head's bias, kept here so the bounds can be checked against it.
    """

    granularity = "pixel"

    def __init__(
        self,
        *,
        channels: int = 3,
        init: float = 0.0,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
        margin: float = DEFAULT_MARGIN,
        family: Family = "laplace",
        fit: Fit = "learned",
        trainable: bool = True,
    ) -> None:
        if trainable is False:
            raise ValueError(
                "trainable=False is for granularity 'global' or 'channel': the per-pixel log-scale is the "
                "decoder's head, whose parameters belong to the model (freeze them there)"
            )
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit, trainable=trainable)
        self.channels = check_channels(channels)

    def forward(
        self, target: Tensor, mean: Tensor, predicted: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Returns the bounded map, shape of ``predicted``."""
        if predicted is None:
            raise ValueError(
                "granularity 'pixel' needs the decoder's predicted map: pass log_scale=reconstruction.log_scale "
                "(build the autoencoder with log_scale='pixel' so its decoder has a log-scale head)"
            )
        check_float_tensor("log_scale", predicted)
        self._check_channels(target)
        t, p = tuple(target.shape), tuple(predicted.shape)
        if predicted.ndim != target.ndim or p[0] != t[0] or p[2:] != t[2:] or p[1] not in (t[1], 1):
            raise ValueError(
                f"predicted log_scale map of shape {p} does not fit target of shape {t}: expected "
                f"{(t[0], t[1]) + t[2:]} (one map per channel) or {(t[0], 1) + t[2:]} (one shared map)"
            )
        return self.bound(predicted)


def check_real(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_bounds(bounds: object) -> tuple[float, float]:
    """``(low, high)`` as floats: a pair of finite numbers inside ``[-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT]``;
    otherwise a ``ValueError`` naming them. (Their order is checked with the margin.)"""
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (low, high) of numbers, got {bounds!r}")
    if any(isinstance(b, bool) or not isinstance(b, numbers.Real) for b in bounds):
        raise ValueError(f"bounds must be a pair (low, high) of numbers, got {bounds!r}")
    low, high = (float(b) for b in bounds)
    if not all(-LOG_SCALE_LIMIT <= b <= LOG_SCALE_LIMIT for b in (low, high)):  # NaN fails too
        raise ValueError(
            f"bounds {(low, high)} must be finite and inside [{-LOG_SCALE_LIMIT}, {LOG_SCALE_LIMIT}]: "
            "beyond them exp(-s) (exp(-2 s) for the Gaussian) can overflow float32"
        )
    return low, high


def check_channels(channels: object) -> int:
    """``channels`` if it is an integer >= 1 (not a bool, not a float)."""
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {type(channels).__name__} {channels!r}")
    return int(channels)


_HEADS: dict[str, type[_BoundedLogScale]] = {
    "global": GlobalLogScale,
    "channel": ChannelLogScale,
    "pixel": PixelLogScale,
}
GRANULARITIES: tuple[str, ...] = tuple(_HEADS)


def create_head(
    granularity: str,
    *,
    channels: int = 3,
    init: float = 0.0,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    margin: float = DEFAULT_MARGIN,
    family: Family = "laplace",
    fit: Fit = "learned",
    trainable: bool = True,
) -> _BoundedLogScale:
    """Build the head for ``granularity`` (one of :data:`GRANULARITIES`). ``trainable=False`` freezes a
    learned global / channel scale at ``init`` (SD's ``logvar``); the pixel head refuses it."""
    if not isinstance(granularity, str) or granularity not in _HEADS:
        raise ValueError(f"unknown granularity {granularity!r}; valid names: {', '.join(GRANULARITIES)}")
    check_channels(channels)  # also for "global", which does not use it: a bad value is still a mistake
    kwargs = dict(init=init, bounds=bounds, margin=margin, family=family, fit=fit, trainable=trainable)
    if granularity != "global":
        kwargs["channels"] = channels
    return _HEADS[granularity](**kwargs)
