"""The one loss interface: a heteroscedastic reconstruction NLL at any granularity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hetvae import fused
from hetvae.functional import (
    Family,
    bound_coupling,
    broadcast_log_scale,
    check_channel_order,
    check_family,
    check_float_tensor,
    compute_dtype,
    coupled_discretized_nll,
    coupled_mean,
    coupling_size,
    discretized_nll,
    quantize_8bit,
)
from hetvae.heads import DEFAULT_BOUNDS, DEFAULT_MARGIN, Fit, PixelLogScale, check_real, create_head

Reduction = Literal["batch", "mean"]
CHANNEL_COUPLINGS: tuple[str, ...] = ("none", "global", "pixel")
"""Accepted ``channel_coupling`` values: independent channels, one learned set of coefficients, or
coefficient maps predicted by the decoder's per-pixel head."""


@dataclass
class NLLOutput:
    """What :class:`HeteroscedasticNLL` returns.

    ``loss``: the reduced scalar. ``nll``: the per-element NLL, target's shape, before ``weights``
    and beta weighting (float32, or float64 for float64 inputs). ``log_scale``: the bounded
    log-scale used, broadcastable to the target (``()``, ``(1, C, 1, 1)`` or ``(B, C|1, H, W)``).
    ``mean_nll``: with ``faithful=True``, the per-element NLL whose gradient the mean follows (one
    shared scale); None otherwise (the mean follows ``nll``). ``coupling``: with
    ``channel_coupling="global"``, the coefficients used, ``(C (C - 1) / 2,)`` in the storage order of
    :func:`hetvae.functional.coupling_pairs` (``nll`` and ``log_scale`` are then those of each channel
    given the earlier ones); with ``"pixel"``, the bounded coefficient maps ``(B, C (C - 1) / 2, *spatial)``;
    None without coupling.
    """

    loss: Tensor
    nll: Tensor
    log_scale: Tensor
    mean_nll: Tensor | None = None
    coupling: Tensor | None = None


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

    ``faithful=True`` (``"pixel"`` or ``"channel"``; Stirn et al. 2023, "Faithful heteroscedastic
    regression"): the loss *value* is the per-pixel (per-channel) NLL, but the mean receives the
    gradient of the NLL with one scale for all elements, ``s_bar = log mean(exp(s))`` (stopped),
    i.e. exactly the gradient a global scale gives it (SD's L1 / b), and the map (the channel
    scales) receives the NLL's gradient around the stopped mean (and stopped ``extra_distance``).
    The mean is then trained as with a global scale, and the scale cannot trade its fit for a
    larger one: without it a channel scale weights each channel's L1 by ``1 / b_c``, so the
    channel the model reconstructs worst is trained least.

    ``mean_scale="global"`` (with ``faithful``): the mean's scale is not the map's level but a
    learned global log-scale of its own (``mean_head``, initialised at ``mean_scale_init``, default
    ``init``), which the mean's NLL trains exactly as ``granularity="global"`` trains its scale.
    The mean and that scale then receive the very gradients of a global-scale model, so a model
    whose map is trained beside them (and clipped apart from them) keeps the global model's mean
    step for step, and the map is fitted around it.

    ``trainable=False`` (``"global"`` / ``"channel"``): the log-scale stays ``init`` exactly; its
    parameter takes no gradient, as SD's ``logvar``, which SD's optimiser never held.

    ``channel_coupling="global"``: the channels inform each other. In ``coupling_order`` (default
    ``0, 1, ..., C - 1``: R, G, B) channel ``k`` is centred at ``mu_k + sum_{j before k} a_kj (x_j - mu_j)``
    with its own scale, the ``x_j`` the true values of the earlier channels; the ``C (C - 1) / 2``
    coefficients are a parameter of the loss, ``coupling`` (zero-initialised, so training starts
    exactly where ``"none"`` is; not bounded). The log-scale is then each channel's *conditional*
    scale. The coupling only shapes the likelihood: the coefficients (and the scales) are fitted
    around the stopped mean, and the mean follows the uncoupled NLL, under the same scale (with
    ``faithful``: its branch's one scale), so it trains as it does without coupling.
    ``"none"`` (default) registers no parameter and computes exactly what it did before.

    ``channel_coupling="pixel"`` (granularity ``"pixel"`` only): the same likelihood with a set of
    coefficients per pixel, predicted by the decoder's head and passed as ``coupling=`` (its raw
    output ``(B, C (C - 1) / 2, *spatial)``), bounded by :func:`hetvae.functional.bound_coupling` to
    ``(-2, 2)``; a zero map (a fresh head) gives ``"none"``'s values bit for bit. The loss then has no
    coupling parameter; with ``faithful`` the maps, like the global coefficients, are fitted around
    the stopped mean.

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
        trainable: bool = True,
        mean_scale: str = "map",
        mean_scale_init: float | None = None,
        channel_coupling: str = "none",
        coupling_order: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        for name, flag in (("include_constant", include_constant), ("faithful", faithful), ("trainable", trainable)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
        beta = check_real("beta", beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if faithful and (granularity not in ("pixel", "channel") or beta > 0):
            raise ValueError(
                f"faithful=True needs granularity 'pixel' or 'channel' and beta 0, got {granularity!r} and "
                f"beta={beta} (a global scale already gives the mean that gradient; beta reweights it again)"
            )
        if reduction not in ("batch", "mean"):
            raise ValueError(f"reduction must be 'batch' or 'mean', got {reduction!r}")
        if mean_scale not in ("map", "global"):
            raise ValueError(f"mean_scale must be 'map' or 'global', got {mean_scale!r}")
        if mean_scale == "global" and not faithful:
            raise ValueError(
                "mean_scale='global' needs faithful=True: it names the scale the mean's gradient sees, "
                "which only a faithful loss keeps apart from the map"
            )
        if not isinstance(channel_coupling, str) or channel_coupling not in CHANNEL_COUPLINGS:
            raise ValueError(f"channel_coupling must be one of {CHANNEL_COUPLINGS}, got {channel_coupling!r}")
        if channel_coupling == "pixel" and granularity != "pixel":
            raise ValueError(
                f"channel_coupling='pixel' takes its coefficients from the decoder's per-pixel head, which needs "
                f"granularity='pixel'; got granularity={granularity!r} (use channel_coupling='global')"
            )
        self.family = check_family(family)
        self.head = create_head(
            granularity, channels=channels, init=init, bounds=bounds, margin=margin, family=family, fit=fit,
            trainable=trainable,
        )
        # mean_scale="global": the mean's scale is a learned global log-scale of its own, built and
        # trained exactly as granularity="global"'s, instead of the map's stopped level
        self.mean_head = (
            create_head(
                "global", channels=channels, init=init if mean_scale_init is None else mean_scale_init,
                bounds=bounds, margin=margin, family=family, fit=fit, trainable=trainable,
            )
            if mean_scale == "global"
            else None
        )
        self.granularity = granularity
        self.include_constant = include_constant
        self.beta = float(beta)
        self.reduction = reduction
        self.faithful = bool(faithful)
        self.channel_coupling = channel_coupling
        self.coupling_order: tuple[int, ...] | None = None
        # a parameter only when coupled, so a "none" loss keeps the state_dict keys it always had
        self.coupling: nn.Parameter | None = None
        if channel_coupling != "none":
            if channels < 2:
                raise ValueError(f"channel_coupling={channel_coupling!r} needs at least 2 channels, got channels={channels}")
            self.coupling_order = check_channel_order(coupling_order, channels)
            if channel_coupling == "global":
                self.coupling = nn.Parameter(torch.zeros(coupling_size(channels)))
        elif coupling_order is not None:
            raise ValueError(
                "coupling_order needs channel_coupling='global' or 'pixel'; without coupling there is no order"
            )
        self._checked_shapes: set[tuple] = set()

    def log_scale(self, target: Tensor, mean: Tensor, log_scale: Tensor | None = None) -> Tensor:
        """The bounded log-scale this loss would use, broadcastable to ``target`` (for maps and metrics)."""
        _check_inputs(target, mean, log_scale, None, None)
        if self.coupling is not None and getattr(self.head, "fit", None) == "optimal":
            # a closed-form scale is that of the conditional residuals
            mean = self._centre(target, mean, compute_dtype(target, mean))
        return self.head(target, mean, log_scale)

    def discretized_nll(
        self, target: Tensor, mean: Tensor, log_scale: Tensor | None = None, coupling: Tensor | None = None
    ) -> Tensor:
        """Per-element NLL in nats of ``target`` rounded to 8-bit levels under this loss's likelihood
        (the channel coupling included; :func:`hetvae.functional.coupled_discretized_nll`). Its
        :func:`hetvae.functional.bits_per_dim` is the model's exact bits/dim. ``coupling``: the
        head's raw coefficient maps, for ``channel_coupling="pixel"``."""
        s = self.log_scale(target, mean, log_scale)
        x = quantize_8bit(target.to(compute_dtype(target, mean)))
        a = self.coefficients(coupling)
        if a is None:
            return discretized_nll(x, mean, s, self.family)
        return coupled_discretized_nll(x, mean, s, a.to(x.dtype), self.family, order=self.coupling_order)

    def coefficients(self, coupling: Tensor | None = None) -> Tensor | None:
        """The coupling coefficients this loss uses: the parameter ``(C (C - 1) / 2,)`` for
        ``"global"``, the bounded maps of the head's raw ``coupling`` output for ``"pixel"``
        (``ValueError`` without it), None for ``"none"`` (a ``coupling`` given then is refused)."""
        if self.channel_coupling == "global":
            if coupling is not None:
                raise ValueError("coupling maps are for channel_coupling='pixel'; this loss learns one set ('global')")
            return self.coupling
        if self.channel_coupling == "pixel":
            if coupling is None:
                raise ValueError(
                    "channel_coupling='pixel' needs the head's coefficient maps, coupling=(B, C (C - 1) / 2, H, W): "
                    "the decoder's Reconstruction.coupling"
                )
            return bound_coupling(coupling)
        if coupling is not None:
            raise ValueError("coupling maps were given but channel_coupling is 'none': the loss would ignore them")
        return None

    def _centre(self, target: Tensor, mean: Tensor, dtype: torch.dtype, a: Tensor | None = None) -> Tensor:
        """The coupled centre, differentiable in ``mean`` and the coefficients."""
        a = self.coupling if a is None else a
        return coupled_mean(target, mean, a.to(dtype), self.coupling_order)

    def forward(
        self,
        target: Tensor,
        mean: Tensor,
        log_scale: Tensor | None = None,
        weights: Tensor | None = None,
        extra_distance: Tensor | None = None,
        coupling: Tensor | None = None,
    ) -> NLLOutput:
        """Compute the NLL of ``target`` (B, C, *spatial) given the reconstruction ``mean``.

        ``log_scale``: the decoder's raw map (B, C|1, *spatial), required for ``"pixel"`` and
        refused otherwise. ``weights``: optional, multiplies each element's NLL (SD's ``weights``).
        ``extra_distance``: optional, ``>= 0``, added to the data term ``d`` inside the NLL so the
        scale discounts it too (SD adds ``perceptual_weight * LPIPS`` to the L1 there).
        ``weights`` and ``extra_distance`` are ``()`` (or all ones) or have the target's number of
        dimensions, each the target's size or 1 (``(B, 1, 1, 1)`` per image, ``(1, C, 1, 1)`` per
        channel, ...): a shorter shape would broadcast along the last dimensions, not the channels,
        so it is refused. ``coupling``: the head's raw coefficient maps ``(B, C (C - 1) / 2, *spatial)``,
        required for ``channel_coupling="pixel"`` and refused otherwise.

        Every tensor must be floating-point (integer, bool and complex ones are refused, not
        converted) and the target non-empty; anything else is a ``ValueError`` naming the argument.
        """
        _check_inputs(target, mean, log_scale, weights, extra_distance)
        dtype = compute_dtype(target, mean)
        target, mean = target.to(dtype), mean.to(dtype)
        # With coupling each channel's distribution is centred at the coupled centre; the NLL is the
        # plain one around it, so the fused path takes the centre as its mean and autograd carries the
        # centre's gradient on to the coefficients; the centre is built on the stopped mean, whose
        # gradient is the uncoupled NLL's (below).
        if coupling is not None:
            _check_device("coupling", check_float_tensor("coupling", coupling), target)
        a = self.coefficients(coupling)
        a = None if a is None else a.to(dtype)
        centre = mean if a is None else self._centre(target, mean.detach(), dtype, a)
        s = self._bounded_log_scale(target, centre, None if log_scale is None else log_scale.to(dtype), weights)
        s = broadcast_log_scale(s.to(dtype), target)
        spec = fused.NLLSpec(self.family, self.beta, self.include_constant, self.reduction)
        weights = None if weights is None else weights.to(dtype)
        extra_distance = None if extra_distance is None else extra_distance.to(dtype)
        # Same values either way: the fused path computes the loss, the map and both gradients in
        # a few passes (hetvae.fused); HETVAE_FUSED=0 runs the eager reference, e.g. for double backward.
        compute = fused.fused_nll if fused.enabled() else fused.reference
        if not self.faithful and a is None:
            loss, nll = compute(target, centre, s, weights, extra_distance, spec)
            return NLLOutput(loss=loss, nll=nll, log_scale=s, coupling=a)
        if not self.faithful:
            # the coupling only shapes the likelihood: the scale and the coefficients follow the coupled
            # NLL around the stopped mean, and the mean the uncoupled NLL under the same (stopped)
            # scale, the gradient it gets without coupling; the loss's value is the coupled NLL
            # (the per-element nll too, whose gradient SD's adaptive weight takes)
            loss, nll = compute(target, centre, s, weights, extra_distance, spec)
            mean_loss, mean_nll = compute(target, mean, s.detach(), weights, extra_distance, spec)
            return NLLOutput(loss=loss + (mean_loss - mean_loss.detach()), nll=nll + (mean_nll - mean_nll.detach()),
                             log_scale=s, coupling=a)
        # the map's NLL around the stopped mean, and the mean's NLL under one scale: the map's
        # stopped level, or (mean_scale='global') the mean's own learned global scale. The coupling
        # is the map's: its coefficients are fitted around the stopped mean, and the mean's branch
        # is the uncoupled NLL, so the mean is trained exactly as with one scale.
        stopped_extra = None if extra_distance is None else extra_distance.detach()
        loss, nll = compute(target, centre.detach() if a is None else centre, s, weights, stopped_extra, spec)
        if self.mean_head is not None:  # the mean's own learned scale, which this NLL trains too
            s_bar = self.mean_head(target, mean, None, weights)
        else:
            with torch.no_grad():
                s_bar = torch.logsumexp(s.flatten(), 0) - math.log(s.numel())
        s_bar = broadcast_log_scale(s_bar.to(dtype), target)
        mean_loss, mean_nll = compute(target, mean, s_bar, weights, extra_distance, spec)
        return NLLOutput(
            loss=loss + (mean_loss - mean_loss.detach()), nll=nll, log_scale=s, mean_nll=mean_nll, coupling=a
        )

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
            + (", mean_scale='global'" if self.mean_head is not None else "")
            + ("" if self.head.trainable else ", trainable=False")
            + ("" if self.channel_coupling == "none"
               else f", channel_coupling={self.channel_coupling!r}, coupling_order={self.coupling_order}")
        )


def _check_inputs(
    target: Tensor, mean: Tensor, log_scale: Tensor | None, weights: Tensor | None, extra: Tensor | None
) -> None:
    """Refuse, naming the argument, what the loss would otherwise coerce or break on with a raw error.

    Shapes and dtypes cost nothing; the one data-dependent check, ``extra_distance >= 0``, reduces a
    tensor that is usually per image (LPIPS, ``(B, 1, 1, 1)``). On a GPU reading it synchronises once,
    before the objective's own read of its scalars in the same step.
    """
    check_float_tensor("target", target)
    check_float_tensor("mean", mean)
    shape = tuple(target.shape)
    if target.ndim < 2:
        raise ValueError(f"target must have a batch and a channel dimension (B, C, ...), got shape {shape}")
    if target.shape != mean.shape:
        raise ValueError(f"mean of shape {tuple(mean.shape)} must have the shape of target {shape}")
    if target.numel() == 0:
        raise ValueError(
            f"target of shape {shape} has no elements: nothing to score (the loss is a sum divided by the "
            "batch size or the element count)"
        )
    _check_device("mean", mean, target)
    if log_scale is not None:
        _check_device("log_scale", check_float_tensor("log_scale", log_scale), target)
    for name, value in (("weights", weights), ("extra_distance", extra)):
        if value is None:
            continue
        check_float_tensor(name, value)
        ones_only = value.ndim <= target.ndim and all(v == 1 for v in value.shape)  # a scalar in effect
        if not (ones_only or (value.ndim == target.ndim and all(v in (1, t) for v, t in zip(value.shape, shape)))):
            ones = (1,) * (target.ndim - 2)
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not fit target of shape {shape}: expected () or "
                f"{target.ndim} dimensions, each the target's size or 1, such as {(shape[0], 1) + ones} per image, "
                f"{(1, shape[1]) + ones} per channel or {(shape[0], 1) + shape[2:]} per pixel"
            )
        _check_device(name, value, target)
    if extra is not None:
        low = extra.detach().amin()
        if bool(low < 0):
            raise ValueError(
                f"extra_distance must be >= 0 (it is added to the distance |x - mu| or (x - mu)^2 / 2), got a "
                f"minimum of {float(low):.4g}"
            )


def _check_device(name: str, value: Tensor, target: Tensor) -> None:
    # a 0-d tensor broadcasts from any device (torch allows a CPU scalar with a GPU tensor)
    if value.ndim and value.device != target.device:
        raise ValueError(f"{name} is on {value.device} but target on {target.device}: move them to one device")
