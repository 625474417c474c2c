"""The one loss interface: a heteroscedastic reconstruction NLL at any granularity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hetvae import fused
from hetvae.functional import Family, broadcast_log_scale, check_family, compute_dtype
from hetvae.heads import DEFAULT_BOUNDS, DEFAULT_MARGIN, Fit, PixelLogScale, create_head

Reduction = Literal["batch", "mean"]


@dataclass
class NLLOutput:
    """What :class:`HeteroscedasticNLL` returns.

    ``loss``: the reduced scalar. ``nll``: the per-element NLL, target's shape, before ``weights``
    and beta weighting (float32, or float64 for float64 inputs). ``log_scale``: the bounded
    log-scale used, broadcastable to the target (``()``, ``(1, C, 1, 1)`` or ``(B, C|1, H, W)``).
    ``mean_nll``: with ``faithful=True``, the per-element NLL whose gradient the mean follows (one
    shared scale); None otherwise (the mean follows ``nll``).
    """

    loss: Tensor
    nll: Tensor
    log_scale: Tensor
    mean_nll: Tensor | None = None


class HeteroscedasticNLL(nn.Module):
    """Reconstruction NLL with a global, per-channel or per-pixel log-scale.

    ``nll = d(x, mu) * exp(-k s) + s (+ const)`` with, for ``family="laplace"``, ``k = 1``,
    ``d = |x - mu|`` and ``s = log b``; for ``family="gaussian"``, ``k = 2``,
    ``d = 0.5 (x - mu)^2`` and ``s = log sigma`` (see :mod:`hetvae.functional`).

    ``granularity`` picks where ``s`` comes from (:mod:`hetvae.heads`): ``"global"`` (one
    learnable scalar: Stable Diffusion's ``logvar``), ``"channel"`` (one per channel) or
    ``"pixel"`` (the decoder's predicted map, passed as ``log_scale=``). ``fit="optimal"`` replaces
    the learned global/channel parameter with the closed-form maximum-likelihood scale.

    ``beta`` in [0, 1] applies beta-NLL (Seitzer et al. 2022): each element is weighted by a
    stop-gradient ``b^beta`` / ``sigma^(2 beta)``; 0 is the plain NLL, 1 gives the mean exactly the
    L1 / L2 gradient, so a per-pixel head cannot buy its way out of hard pixels.

    ``faithful=True`` (``"pixel"`` only; Stirn et al. 2023, "Faithful heteroscedastic regression"):
    the loss *value* is the per-pixel NLL, but the mean receives the gradient of the NLL with one
    scale for all elements, ``s_bar = log mean(exp(s))`` (stopped), i.e. exactly the gradient a
    global scale gives it (SD's L1 / b), and the map receives the per-pixel NLL's gradient around the
    stopped mean (and stopped ``extra_distance``). The mean is then trained as with a global scale,
    and the head cannot trade its fit for a larger scale.

    Reductions: ``"batch"`` (default) sums over all elements and divides by the batch size, exactly
    as SD's ``LPIPSWithDiscriminator``; ``"mean"`` averages over all elements.

    With ``granularity="global"``, ``family="laplace"``, ``init=s``, ``include_constant=False`` the
    loss is SD's ``sum(weights * (rec / exp(s) + s)) / B``.
    """

    def __init__(
        self,
        granularity: str = "global",
        *,
        channels: int = 3,
        family: Family = "laplace",
        init: float = 0.0,
        include_constant: bool = False,
        beta: float = 0.0,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
        margin: float = DEFAULT_MARGIN,
        fit: Fit = "learned",
        reduction: Reduction = "batch",
        faithful: bool = False,
    ) -> None:
        super().__init__()
        if faithful and (granularity != "pixel" or beta > 0):
            raise ValueError(
                f"faithful=True needs granularity 'pixel' and beta 0, got {granularity!r} and beta={beta} "
                "(a shared scale already gives the mean that gradient; beta reweights it again)"
            )
        if reduction not in ("batch", "mean"):
            raise ValueError(f"reduction must be 'batch' or 'mean', got {reduction!r}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.family = check_family(family)
        self.head = create_head(
            granularity, channels=channels, init=init, bounds=bounds, margin=margin, family=family, fit=fit
        )
        self.granularity = granularity
        self.include_constant = include_constant
        self.beta = float(beta)
        self.reduction = reduction
        self.faithful = bool(faithful)
        self._checked_shapes: set[tuple] = set()

    def log_scale(self, target: Tensor, mean: Tensor, log_scale: Tensor | None = None) -> Tensor:
        """The bounded log-scale this loss would use, broadcastable to ``target`` (for maps and metrics)."""
        return self.head(target, mean, log_scale)

    def forward(
        self,
        target: Tensor,
        mean: Tensor,
        log_scale: Tensor | None = None,
        weights: Tensor | None = None,
        extra_distance: Tensor | None = None,
    ) -> NLLOutput:
        """Compute the NLL of ``target`` (B, C, *spatial) given the reconstruction ``mean``.

        ``log_scale``: the decoder's raw map (B, C|1, *spatial), required for ``"pixel"`` and
        refused otherwise. ``weights``: optional, broadcastable to the target, multiplies each
        element's NLL (SD's ``weights``). ``extra_distance``: optional non-negative term,
        broadcastable to the target, added to the data term ``d`` inside the NLL so the scale
        discounts it too (SD adds ``perceptual_weight * LPIPS`` to the L1 there).
        """
        if target.shape != mean.shape:
            raise ValueError(f"mean of shape {tuple(mean.shape)} must have the shape of target {tuple(target.shape)}")
        dtype = compute_dtype(target, mean)
        target, mean = target.to(dtype), mean.to(dtype)
        s = self._bounded_log_scale(target, mean, None if log_scale is None else log_scale.to(dtype), weights)
        s = broadcast_log_scale(s.to(dtype), target)
        spec = fused.NLLSpec(self.family, self.beta, self.include_constant, self.reduction)
        weights = None if weights is None else weights.to(dtype)
        extra_distance = None if extra_distance is None else extra_distance.to(dtype)
        # Same values either way: the fused path computes the loss, the map and both gradients in
        # a few passes (hetvae.fused); HETVAE_FUSED=0 runs the eager reference, e.g. for double backward.
        compute = fused.fused_nll if fused.enabled() else fused.reference
        if not self.faithful:
            loss, nll = compute(target, mean, s, weights, extra_distance, spec)
            return NLLOutput(loss=loss, nll=nll, log_scale=s)
        # the map's NLL around the stopped mean, and the mean's NLL under one stopped scale
        stopped_extra = None if extra_distance is None else extra_distance.detach()
        loss, nll = compute(target, mean.detach(), s, weights, stopped_extra, spec)
        with torch.no_grad():
            s_bar = torch.logsumexp(s.flatten(), 0) - math.log(s.numel())
        s_bar = broadcast_log_scale(s_bar.to(dtype), target)
        mean_loss, mean_nll = compute(target, mean, s_bar, weights, extra_distance, spec)
        return NLLOutput(loss=loss + (mean_loss - mean_loss.detach()), nll=nll, log_scale=s, mean_nll=mean_nll)

    def _bounded_log_scale(
        self, target: Tensor, mean: Tensor, log_scale: Tensor | None, weights: Tensor | None
    ) -> Tensor:
        """The head's log-scale. A predicted map that lies inside the soft clamp's identity band
        (the usual case) is its own bounded value, so the full-size eager clamp, a dozen passes
        forward and backward, is skipped; the head still checks the map's shape."""
        head = self.head
        if isinstance(head, PixelLogScale) and log_scale is not None and fused.enabled():
            if fused.in_identity_band(log_scale, head.bounds, head.margin):
                self._check_shapes(target, log_scale)
                return log_scale
        return head(target, mean, log_scale, weights)

    def _check_shapes(self, target: Tensor, log_scale: Tensor) -> None:
        # The head's checks depend on shapes only: run them on data-free meta tensors, once per
        # pair of shapes (a meta call costs milliseconds, more than the fused loss itself).
        key = (tuple(target.shape), tuple(log_scale.shape), self.head.channels)
        if key not in self._checked_shapes:
            meta = target.to("meta")
            self.head(meta, meta, log_scale.to("meta"))
            self._checked_shapes.add(key)

    def extra_repr(self) -> str:
        return (
            f"granularity={self.granularity!r}, family={self.family!r}, include_constant={self.include_constant}, "
            f"beta={self.beta}, reduction={self.reduction!r}" + (", faithful=True" if self.faithful else "")
        )
