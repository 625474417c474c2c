"""Negative log-likelihoods of reconstructions, as plain functions of tensors.

Everything here is stateless; modules in :mod:`hetvae.heads` and :mod:`hetvae.loss` own the
parameters and call these functions.

Parameterisation
----------------
Both families are written in terms of a **log-scale** ``s``:

* Laplace, ``s = log b``::

      p(x | mu, b) = exp(-|x - mu| / b) / (2 b)
      -log p       = |x - mu| * exp(-s) + s + log 2

* Gaussian, ``s = log sigma``::

      p(x | mu, sigma) = exp(-(x - mu)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))
      -log p           = 0.5 (x - mu)^2 * exp(-2 s) + s + 0.5 log(2 pi)

Stable Diffusion's VAE loss ``rec / exp(logvar) + logvar`` is exactly the Laplace form without the
constant: its ``logvar`` is ``s = log b``, a log-*scale*.

Shapes and dtypes
-----------------
``target`` and ``mean`` are floating-point tensors of the same shape ``(B, C, *spatial)``; the
channel dimension is 1. Integer, bool and complex tensors are a :class:`ValueError`, not converted
(an 8-bit image would otherwise be scored on the 0..255 scale). ``log_scale`` is a floating-point
tensor or a real number, and may be

* a scalar ``()`` or a number (one scale for everything),
* a vector ``(C,)``, one per channel, broadcast along dimension 1 (not the last dimension),
* a tensor with ``target.ndim`` dimensions, each equal to the target's or 1, e.g. a per-pixel map
  ``(B, C, H, W)``, a shared map ``(B, 1, H, W)`` or a channel view ``(1, C, 1, 1)``.

Anything else is a :class:`ValueError` naming both shapes.

Precision
---------
Inputs in float16/bfloat16 are computed in float32 (float64 stays float64), so residuals of 1e4
with log-scales anywhere inside the heads' bounds (at most ``[-20, 20]``,
:data:`hetvae.heads.LOG_SCALE_LIMIT`) give finite values and gradients. These
functions do not bound ``log_scale`` themselves (:mod:`hetvae.heads` does): ``exp(-s)`` of an
unbounded ``s = -100`` overflows float32. One limit no upcast removes: a gradient is returned in
its input's dtype, and float16 holds at most 65504. The Gaussian at ``s = -7`` with a residual of
1e4 has ``d/dmu = r e^{14} ~ 1e10``; that is finite in float32 and bfloat16 but ``inf`` in a
float16 tensor, which is what AMP's ``GradScaler`` detects and backs off from.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

Family = Literal["laplace", "gaussian"]
FAMILIES: tuple[str, ...] = ("laplace", "gaussian")

LOG2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# 8-bit data on the [-1, 1] scale: 256 values -1 + 2k/255, bins of width 2/255 around each.
NUM_BINS = 256
BIN_WIDTH = 2.0 / (NUM_BINS - 1)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def check_float_tensor(name: str, value: object) -> Tensor:
    """``value`` itself if it is a floating-point tensor; otherwise a ``ValueError`` naming ``name``.

    Integer, bool and complex tensors are refused rather than converted: an 8-bit image would be
    scored on the 0..255 scale, a bool mask silently read as 0/1. The caller converts explicitly.
    """
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__} {_clip(repr(value))}")
    if not value.is_floating_point():
        how = "8-bit images to the [-1, 1] scale with x.float() / 127.5 - 1" if name in ("target", "mean") else "with .float()"
        raise ValueError(
            f"{name} has dtype {value.dtype}; the NLL needs a floating-point tensor (float16, bfloat16, "
            f"float32 or float64). Convert it explicitly, e.g. {how}"
        )
    return value


def _clip(text: str, size: int = 60) -> str:
    return text if len(text) <= size else text[: size - 3] + "..."


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, float64 if any input is float64."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def broadcast_log_scale(log_scale: Tensor, target: Tensor) -> Tensor:
    """Return a view of ``log_scale`` that broadcasts against ``target`` (B, C, *spatial).

    ``()`` stays as is, ``(C,)`` becomes ``(1, C, 1, ...)``, and a tensor of ``target.ndim``
    dimensions must match each target dimension or be 1. Anything else raises ``ValueError``.
    """
    shape, tshape = tuple(log_scale.shape), tuple(target.shape)
    if log_scale.ndim == 0:
        return log_scale
    if target.ndim < 2:
        raise ValueError(f"target must have a batch and a channel dimension (B, C, ...), got shape {tshape}")
    if log_scale.ndim == 1 and shape[0] == tshape[1]:
        return log_scale.view((1, -1) + (1,) * (target.ndim - 2))
    if log_scale.ndim == target.ndim and all(s in (1, t) for s, t in zip(shape, tshape)):
        return log_scale
    raise ValueError(
        f"log_scale of shape {shape} does not fit target of shape {tshape}: expected () for one scale, "
        f"({tshape[1]},) for one per channel, or a {target.ndim}-d tensor whose every dimension equals the "
        f"target's or 1, such as a per-pixel map {(tshape[0], tshape[1]) + tshape[2:]} or {(tshape[0], 1) + tshape[2:]}"
    )


def _prepare(target: Tensor, mean: Tensor, log_scale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    check_float_tensor("target", target)
    check_float_tensor("mean", mean)
    if target.shape != mean.shape:
        raise ValueError(f"mean of shape {tuple(mean.shape)} must have the shape of target {tuple(target.shape)}")
    if isinstance(log_scale, numbers.Real) and not isinstance(log_scale, bool):
        log_scale = torch.tensor(float(log_scale), device=target.device)
    elif not isinstance(log_scale, Tensor):
        raise ValueError(
            f"log_scale must be a floating-point tensor or a real number, got {type(log_scale).__name__} "
            f"{_clip(repr(log_scale))}"
        )
    log_scale = torch.as_tensor(check_float_tensor("log_scale", log_scale), device=target.device)
    log_scale = broadcast_log_scale(log_scale, target)
    dtype = compute_dtype(target, mean, log_scale)
    return target.to(dtype), mean.to(dtype), log_scale.to(dtype)


def nll_from_distance(distance: Tensor, log_scale: Tensor, family: Family) -> Tensor:
    """The NLL without its constant, from a precomputed non-negative data term.

    Laplace: ``distance * exp(-s) + s`` with ``distance = |x - mu|`` (SD adds LPIPS to it);
    Gaussian: ``distance * exp(-2 s) + s`` with ``distance = 0.5 (x - mu)^2``.
    ``distance`` and ``log_scale`` must already broadcast and share a float dtype.
    """
    if family == "laplace":
        return distance * torch.exp(-log_scale) + log_scale
    if family == "gaussian":
        return distance * torch.exp(-2.0 * log_scale) + log_scale
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def distance(target: Tensor, mean: Tensor, family: Family) -> Tensor:
    """The data term of the NLL: ``|x - mu|`` (Laplace) or ``0.5 (x - mu)^2`` (Gaussian)."""
    r = target - mean
    if family == "laplace":
        return r.abs()
    if family == "gaussian":
        return 0.5 * r * r
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def log_normalizer(family: Family) -> float:
    """The constant of the density: ``log 2`` (Laplace) or ``0.5 log(2 pi)`` (Gaussian)."""
    return LOG2 if check_family(family) == "laplace" else HALF_LOG_2PI


def nll(
    target: Tensor, mean: Tensor, log_scale: Tensor, family: Family, include_constant: bool = True
) -> Tensor:
    """Per-element negative log-likelihood of ``target`` under ``family(mean, exp(log_scale))``.

    Returns a tensor of ``target``'s shape in float32 (float64 for float64 inputs).
    """
    check_family(family)
    target, mean, log_scale = _prepare(target, mean, log_scale)
    out = nll_from_distance(distance(target, mean, family), log_scale, family)
    if include_constant:
        out = out + log_normalizer(family)
    return out


def laplace_nll(target: Tensor, mean: Tensor, log_scale: Tensor, include_constant: bool = True) -> Tensor:
    """Laplace NLL per element, ``s = log b``: ``|x - mu| exp(-s) + s (+ log 2)``.

    ``log_scale`` broadcasts from ``()``, ``(C,)`` or a map (see the module docstring).
    """
    return nll(target, mean, log_scale, "laplace", include_constant)


def gaussian_nll(target: Tensor, mean: Tensor, log_scale: Tensor, include_constant: bool = True) -> Tensor:
    """Gaussian NLL per element, ``s = log sigma``: ``0.5 (x - mu)^2 exp(-2s) + s (+ 0.5 log 2 pi)``.

    ``log_scale`` broadcasts from ``()``, ``(C,)`` or a map (see the module docstring).
    """
    return nll(target, mean, log_scale, "gaussian", include_constant)


def beta_weight(log_scale: Tensor, beta: float, family: Family) -> Tensor:
    """Stop-gradient weights of beta-NLL (Seitzer et al., ICLR 2022).

    Each element's NLL is multiplied by ``sg(b^beta)`` (Laplace) or ``sg(sigma^(2 beta))``
    (Gaussian), i.e. ``exp(beta * s)`` / ``exp(2 beta * s)`` with no gradient. Consequences:

    * ``beta = 0``: weight 1, the plain NLL;
    * ``beta = 1``: the gradient with respect to the mean is exactly that of ``|x - mu|`` (Laplace)
      or ``0.5 (x - mu)^2`` (Gaussian), so pixels with a large predicted scale are still fitted.

    Returns a detached tensor with ``log_scale``'s shape.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    power = beta if check_family(family) == "laplace" else 2.0 * beta
    return torch.exp(power * log_scale.detach())


def soft_clamp(x: Tensor, low: float, high: float, margin: float = 1.0) -> Tensor:
    """Bound ``x`` to the open interval ``(low, high)``, exactly the identity on ``[low + m, high - m]``.

    Outside the identity band the value approaches the bound exponentially::

        x < low + m :  low  + m * exp((x - low - m) / m)
        x > high - m:  high - m * exp((high - m - x) / m)

    The function is continuous with a continuous first derivative (slope 1 at the joins), strictly
    increasing, and its gradient never becomes exactly zero. Because it is the identity in the
    interior, a log-scale initialised inside the band (such as SD's 0) is reproduced exactly.
    """
    if not high - low > 2.0 * margin > 0.0:
        raise ValueError(f"soft_clamp needs high - low > 2 * margin > 0, got low={low}, high={high}, margin={margin}")
    a, b = low + margin, high - margin
    # clamp the exponents to <= 0 so the branch not taken never overflows (inf * 0 grad = NaN)
    below = low + margin * torch.exp(torch.clamp(x - a, max=0.0) / margin)
    above = high - margin * torch.exp(torch.clamp(b - x, max=0.0) / margin)
    return torch.where(x < a, below, torch.where(x > b, above, x))


def reduction_dims(granularity: str, ndim: int) -> tuple[int, ...]:
    """Dimensions a log-scale of this granularity is shared over: all (global) or all but 1 (channel)."""
    if granularity == "global":
        return tuple(range(ndim))
    if granularity == "channel":
        return (0,) + tuple(range(2, ndim))
    raise ValueError(f"a closed-form scale exists for 'global' and 'channel' granularity, got {granularity!r}")


def optimal_log_scale(
    target: Tensor,
    mean: Tensor,
    granularity: Literal["global", "channel"],
    family: Family,
    weights: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Closed-form maximum-likelihood log-scale for a shared scale (Rybkin et al. 2021, sigma-VAE).

    With ``r = x - mu`` over the granularity's reduction axes (all elements for ``global``; all but
    the channel dimension for ``channel``), the NLL is minimised by

    * Laplace:  ``b* = mean |r|``        -> ``s* = log mean |r|``
    * Gaussian: ``sigma*^2 = mean r^2``  -> ``s* = 0.5 log mean r^2``

    With ``weights`` the means are weighted means. Returned detached (at the optimum the NLL is
    stationary in ``s``, so no gradient would flow through it anyway): shape ``()`` for global,
    ``(C,)`` for channel. ``eps`` keeps a perfect reconstruction from giving ``-inf``.
    """
    check_family(family)
    dims = reduction_dims(granularity, target.ndim)
    dtype = compute_dtype(target, mean)
    with torch.no_grad():
        d = distance(target.to(dtype), mean.to(dtype), family) * (2.0 if family == "gaussian" else 1.0)
        if weights is None:
            m = d.mean(dim=dims)
        else:
            w = torch.broadcast_to(weights.to(dtype), d.shape)
            m = (w * d).sum(dim=dims) / w.sum(dim=dims).clamp_min(eps)
        m = m.clamp_min(eps)
        return torch.log(m) if family == "laplace" else 0.5 * torch.log(m)


# ----------------------------------------------------------------------------------------------
# Discretized likelihood of 8-bit data


def _log_diff_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) - exp(b)) for a >= b, stable; -inf-free down to the float's tiny."""
    one_minus = -torch.expm1(torch.clamp(b - a, max=0.0))
    return a + torch.log(one_minus.clamp_min(torch.finfo(a.dtype).tiny))


def _laplace_log_cdf(z: Tensor) -> Tensor:
    """log P(Z <= z) for a standard Laplace variable."""
    # z < 0: 0.5 exp(z); z >= 0: 1 - 0.5 exp(-z)
    neg = LOG2 * -1.0 + torch.clamp(z, max=0.0)
    pos = torch.log1p(-0.5 * torch.exp(-torch.clamp(z, min=0.0)))
    return torch.where(z < 0, neg, pos)


def _log_cdf(z: Tensor, family: Family) -> Tensor:
    return _laplace_log_cdf(z) if family == "laplace" else torch.special.log_ndtr(z)


def _log_bin_mass(lo: Tensor, hi: Tensor, family: Family) -> Tensor:
    """log(F(hi) - F(lo)) for a standard, symmetric distribution, with lo <= hi (may be +-inf).

    Uses the symmetry F(hi) - F(lo) = F(-lo) - F(-hi) to stay in the lower tail, where log-CDFs
    are accurate.
    """
    flip = (lo + hi) > 0
    lo2 = torch.where(flip, -hi, lo)
    hi2 = torch.where(flip, -lo, hi)
    return _log_diff_exp(_log_cdf(hi2, family), _log_cdf(lo2, family))


def discretized_log_likelihood(target: Tensor, mean: Tensor, log_scale: Tensor, family: Family) -> Tensor:
    """Per-element log-probability of 8-bit data under a discretized Laplace or Gaussian.

    ``target`` holds 8-bit values on the [-1, 1] scale (``-1 + 2k/255``; other values are rounded to
    the nearest). Each value owns the bin ``[x - 1/255, x + 1/255]``; the two edge bins are open,
    ``(-inf, -1 + 1/255]`` and ``[1 - 1/255, inf)``, so the 256 probabilities sum to 1 for any mean
    and scale. Computed in log space (at least float32). Returns ``target``'s shape.
    """
    check_family(family)
    target, mean, log_scale = _prepare(target, mean, log_scale)
    k = torch.round((target.clamp(-1.0, 1.0) + 1.0) / BIN_WIDTH)
    inv_scale = torch.exp(-log_scale)
    inf = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    # edges from the same expression for both neighbours, so adjacent bins share identical floats
    lo = torch.where(k <= 0, -inf, (-1.0 + (k - 0.5) * BIN_WIDTH - mean) * inv_scale)
    hi = torch.where(k >= NUM_BINS - 1, inf, (-1.0 + (k + 0.5) * BIN_WIDTH - mean) * inv_scale)
    return _log_bin_mass(lo, hi, family)


def discretized_nll(target: Tensor, mean: Tensor, log_scale: Tensor, family: Family) -> Tensor:
    """``-discretized_log_likelihood``: per-element NLL in nats of 8-bit data (see there)."""
    return -discretized_log_likelihood(target, mean, log_scale, family)


def bits_per_dim(nll_nats: Tensor) -> Tensor:
    """Mean of a per-element NLL in nats, converted to bits per dimension.

    Use it on :func:`discretized_nll` for a number comparable across models and with the 8 bits of
    raw 8-bit data. (A continuous NLL on the [-1, 1] scale converts approximately by adding
    ``log(2/255)`` nats per dimension, valid only when the scale is much larger than a bin.)
    """
    return nll_nats.mean() / LOG2


def quantize_8bit(x: Tensor) -> Tensor:
    """Round values on the [-1, 1] scale to the nearest of the 256 8-bit levels ``-1 + 2k/255``."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) / BIN_WIDTH) * BIN_WIDTH - 1.0


# ----------------------------------------------------------------------------------------------
# Coupled colour channels
#
# With a channel order (default 0 -> 1 -> 2, i.e. R -> G -> B), channel k is centred at
#
#     m_k = mu_k + sum_{j before k} a_kj (x_j - mu_j)
#
# with its own scale b_k = exp(s_k), in the same family: the earlier channels' true values inform
# the later ones' centres. The NLL of channel k is the plain one with mu_k replaced by m_k, so every
# function below is the uncoupled one applied to the coupled centre, and zero coefficients give it
# bit for bit. The coefficients fill the strict lower triangle row by row: for positions p, q in
# the order (q < p) the pair (p, q) is entry p (p - 1) / 2 + q; for three channels (a_10, a_20, a_21).


def coupling_size(channels: int) -> int:
    """The number of coupling coefficients of ``channels`` channels: ``C (C - 1) / 2`` (3 for RGB)."""
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {type(channels).__name__} {channels!r}")
    return int(channels) * (int(channels) - 1) // 2


def check_channel_order(order: object, channels: int) -> tuple[int, ...]:
    """``order`` as a tuple: a permutation of ``range(channels)`` (None: ``(0, 1, ..., C - 1)``)."""
    if order is None:
        return tuple(range(channels))
    if isinstance(order, Tensor):
        order = order.tolist()
    if isinstance(order, (str, bytes)) or not isinstance(order, (tuple, list)) or any(
        isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in order
    ):
        raise ValueError(f"order must be a sequence of channel indices, got {_clip(repr(order))}")
    result = tuple(int(c) for c in order)
    if sorted(result) != list(range(channels)):
        raise ValueError(
            f"order {result} is not a permutation of the {channels} channels {tuple(range(channels))}: name each "
            "channel once, earliest first"
        )
    return result


def coupling_pairs(channels: int, order: object = None) -> tuple[tuple[int, int], ...]:
    """The ``(k, j)`` channel indices of each coefficient, in storage order: coefficient ``i``
    shifts channel ``k``'s centre by ``a_i (x_j - mu_j)``. Three channels, default order:
    ``((1, 0), (2, 0), (2, 1))``."""
    order = check_channel_order(order, channels)
    return tuple((order[p], order[q]) for p in range(1, channels) for q in range(p))


def _check_coefficients(coefficients: object, target: Tensor) -> Tensor:
    """``coefficients`` as a tensor of ``target.ndim`` dimensions with the pairs along dimension 1:
    a vector ``(P,)`` becomes ``(1, P, 1, ...)``; a map must have ``P`` in dimension 1 and every
    other dimension the target's size or 1. Anything else is a ``ValueError`` naming both shapes."""
    check_float_tensor("coefficients", coefficients)
    if target.ndim < 2:
        raise ValueError(f"target must have a batch and a channel dimension (B, C, ...), got shape {tuple(target.shape)}")
    size = coupling_size(target.shape[1])
    shape, tshape = tuple(coefficients.shape), tuple(target.shape)
    if coefficients.ndim == 1 and shape[0] == size:
        coefficients = coefficients.view((1, size) + (1,) * (target.ndim - 2))
    elif not (
        coefficients.ndim == target.ndim
        and shape[1] == size
        and all(c in (1, t) for i, (c, t) in enumerate(zip(shape, tshape)) if i != 1)
    ):
        raise ValueError(
            f"coefficients of shape {shape} do not fit target of shape {tshape}: {tshape[1]} channels have "
            f"{size} coupling coefficients, so expected ({size},) for one set, or a {target.ndim}-d tensor with "
            f"{size} in dimension 1 and every other dimension the target's or 1, such as the per-pixel map "
            f"{(tshape[0], size) + tshape[2:]}"
        )
    if coefficients.device != target.device:
        raise ValueError(
            f"coefficients are on {coefficients.device} but target on {target.device}: move them to one device"
        )
    return coefficients


COUPLING_LIMIT = 2.0
"""Per-pixel coupling coefficients are bounded to ``(-COUPLING_LIMIT, COUPLING_LIMIT)``
(:func:`bound_coupling`): twice a channel's residual, beyond any regression of one colour's error on
another's seen in photographs (0.3-0.9), yet no runaway centre where a head's raw output is large."""


def bound_coupling(raw: Tensor, limit: float = COUPLING_LIMIT) -> Tensor:
    """A head's raw coefficient maps -> ``limit * tanh(raw / limit)``, in ``(-limit, limit)``.

    Zero stays exactly zero (a zero-initialised head couples nothing) and the slope at zero is 1,
    so small coefficients are learned as if unbounded. Computed in at least float32."""
    check_float_tensor("coupling", raw)
    if not limit > 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
    return limit * torch.tanh(raw / limit)


def coupled_mean(target: Tensor, mean: Tensor, coefficients: Tensor, order: object = None) -> Tensor:
    """The conditional centre of each channel given the earlier channels' true values::

        m_k = mu_k + sum_{j before k} a_kj (x_j - mu_j)

    ``coefficients``: ``(P,)``, ``P = C (C - 1) / 2``, or a map ``(B, P, *spatial)`` (any of its
    dimensions but the pairs' may be 1), in the storage order of :func:`coupling_pairs`.
    ``order``: a permutation of the channels, earliest first (default ``0, 1, ..., C - 1``).

    Returns ``target``'s shape, computed like the NLLs (at least float32; float64 if any input is):
    the first channel of the order is ``mean`` itself, and zero coefficients give ``mean`` exactly
    (for finite residuals: ``0 * inf`` is NaN). Differentiable in ``target``, ``mean`` and
    ``coefficients``.
    """
    check_float_tensor("target", target)
    check_float_tensor("mean", mean)
    if target.shape != mean.shape:
        raise ValueError(f"mean of shape {tuple(mean.shape)} must have the shape of target {tuple(target.shape)}")
    a = _check_coefficients(coefficients, target)
    channels = target.shape[1]
    order = check_channel_order(order, channels)
    dtype = compute_dtype(target, mean, a)
    x, mu, a = target.to(dtype), mean.to(dtype), a.to(dtype)
    if channels == 1:
        return mu
    residuals = [x[:, c : c + 1] - mu[:, c : c + 1] for c in order[:-1]]
    parts: list[Tensor] = [mu[:, c : c + 1] for c in range(channels)]
    for p in range(1, channels):
        base = p * (p - 1) // 2
        shift = a[:, base : base + 1] * residuals[0]
        for q in range(1, p):
            shift = shift + a[:, base + q : base + q + 1] * residuals[q]
        parts[order[p]] = parts[order[p]] + shift
    return torch.cat(parts, dim=1)


def coupled_nll(
    target: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    coefficients: Tensor,
    family: Family,
    include_constant: bool = True,
    *,
    order: object = None,
) -> Tensor:
    """Per-element NLL of channel ``k`` given the earlier channels: :func:`nll` of ``target`` under
    ``family(m_k, exp(s_k))``, ``m`` the :func:`coupled_mean`. Summed over the channels it is the
    NLL of the joint density (the coupling has a unit Jacobian). ``log_scale`` broadcasts as in
    :func:`nll`; it is the *conditional* scale. Zero coefficients give :func:`nll` bit for bit."""
    check_family(family)
    centre = coupled_mean(target, mean, coefficients, order)
    return nll(target, centre, log_scale, family, include_constant)


def coupled_discretized_log_likelihood(
    target: Tensor, mean: Tensor, log_scale: Tensor, coefficients: Tensor, family: Family, *, order: object = None
) -> Tensor:
    """Per-element log-probability of 8-bit data, channel ``k`` given the earlier channels' 8-bit values.

    ``target`` is rounded to the 8-bit levels ``-1 + 2i/255`` first; the rounded earlier channels
    give the centre ``m_k`` (:func:`coupled_mean`), and channel ``k``'s bin ``[x_k - 1/255, x_k + 1/255]``
    (open at the two edge levels) has the mass of :func:`discretized_log_likelihood` under
    ``family(m_k, exp(s_k))``. Given the earlier channels the 256 masses of channel ``k`` sum to 1, so
    the channels' sum is the exact log-probability of the pixel's 8-bit values. Zero coefficients
    give :func:`discretized_log_likelihood` bit for bit.
    """
    check_family(family)
    check_float_tensor("target", target)
    check_float_tensor("mean", mean)
    scale = log_scale if isinstance(log_scale, Tensor) and log_scale.is_floating_point() else target
    dtype = compute_dtype(target, mean, scale, check_float_tensor("coefficients", coefficients))
    x = quantize_8bit(target.to(dtype))
    centre = coupled_mean(x, mean, coefficients, order)
    return discretized_log_likelihood(x, centre, log_scale, family)


def coupled_discretized_nll(
    target: Tensor, mean: Tensor, log_scale: Tensor, coefficients: Tensor, family: Family, *, order: object = None
) -> Tensor:
    """``-coupled_discretized_log_likelihood``: per-element NLL in nats of 8-bit data (see there)."""
    return -coupled_discretized_log_likelihood(target, mean, log_scale, coefficients, family, order=order)
