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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from hetvae.functional import Family, check_family, optimal_log_scale, soft_clamp

DEFAULT_BOUNDS: tuple[float, float] = (-7.0, 3.0)
"""Default log-scale bounds: ``b`` in (9e-4, 20) on images in [-1, 1]. An 8-bit level is 2/255 wide
(log ~ -4.8), so scales far below it only reward over-fitting quantisation noise; the largest
residual is 2, so scales far above it explain nothing."""
DEFAULT_MARGIN = 1.0

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
    ) -> None:
        super().__init__()
        low, high = (float(b) for b in bounds)
        if not high - low > 2.0 * margin > 0.0:
            raise ValueError(
                f"bounds {tuple(bounds)} with margin {margin}: need high - low > 2 * margin > 0"
            )
        if fit not in ("learned", "optimal"):
            raise ValueError(f"fit must be 'learned' or 'optimal', got {fit!r}")
        if fit == "optimal" and self.granularity == "pixel":
            raise ValueError("fit='optimal' exists for 'global' and 'channel' granularity only")
        if not low < init < high:
            raise ValueError(f"init={init} must lie inside bounds {tuple(bounds)}")
        self.init = float(init)
        self.bounds = (low, high)
        self.margin = float(margin)
        self.family = check_family(family)
        self.fit = fit

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
        if target.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} has {self.channels} channels but target of shape {tuple(target.shape)} "
                f"has {target.shape[1]} in dimension 1"
            )

    def extra_repr(self) -> str:
        return f"init={self.init}, bounds={self.bounds}, margin={self.margin}, family={self.family!r}, fit={self.fit!r}"


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
    ) -> None:
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit)
        self.free = nn.Parameter(torch.zeros(())) if fit == "learned" else None

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
    ) -> None:
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = int(channels)
        self.free = nn.Parameter(torch.zeros(channels)) if fit == "learned" else None

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
    ) -> None:
        super().__init__(init=init, bounds=bounds, margin=margin, family=family, fit=fit)
        self.channels = int(channels)

    def forward(
        self, target: Tensor, mean: Tensor, predicted: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Returns the bounded map, shape of ``predicted``."""
        if predicted is None:
            raise ValueError(
                "granularity 'pixel' needs the decoder's predicted map: pass log_scale=reconstruction.log_scale "
                "(build the autoencoder with log_scale='pixel' so its decoder has a log-scale head)"
            )
        self._check_channels(target)
        t, p = tuple(target.shape), tuple(predicted.shape)
        if predicted.ndim != target.ndim or p[0] != t[0] or p[2:] != t[2:] or p[1] not in (t[1], 1):
            raise ValueError(
                f"predicted log_scale map of shape {p} does not fit target of shape {t}: expected "
                f"{(t[0], t[1]) + t[2:]} (one map per channel) or {(t[0], 1) + t[2:]} (one shared map)"
            )
        return self.bound(predicted)


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
) -> _BoundedLogScale:
    """Build the head for ``granularity`` (one of :data:`GRANULARITIES`)."""
    if granularity not in _HEADS:
        raise ValueError(f"unknown granularity {granularity!r}; valid names: {', '.join(GRANULARITIES)}")
    kwargs = dict(init=init, bounds=bounds, margin=margin, family=family, fit=fit)
    if granularity != "global":
        kwargs["channels"] = channels
    return _HEADS[granularity](**kwargs)
