"""Reconstruction and uncertainty metrics, as pure functions of tensors.

Conventions: ``target`` and ``mean`` are images ``(B, C, H, W)`` on the [-1, 1] scale;
``log_scale`` is the bounded log-scale the model uses (``log b`` for Laplace, ``log sigma`` for
Gaussian), broadcastable to the target (``()``, ``(C,)``, ``(1, C, 1, 1)``, ``(B, C|1, H, W)``).
The same metrics apply to global, channel and pixel models; where a metric needs the scale to vary
(Spearman), a constant scale gives NaN ("undefined"), not a number that pretends to mean something.

* :func:`psnr` - peak signal-to-noise ratio in dB of images in [0, 1], per image.
* :func:`nll_bpd` - discretized 8-bit NLL in bits per dimension.
* :func:`coverage` - fraction of values inside the central ``p``-interval of the predicted distribution.
* :func:`calibration_error` - mean ``|coverage(p) - p|`` over ``p = 0.1 ... 0.9``.
* :func:`spearman` - rank correlation between predicted scale and absolute error.
* :func:`ause` - area under the sparsification-error curve (Ilg et al., ECCV 2018).
* :func:`chroma_kept` - how much of a colour image's chroma its reconstruction keeps (1 = all).

With colour coupling (docs/math.md, "Coupled colour channels") the scale is each channel's given the
earlier channels: coverage, calibration error, Spearman and AUSE then take the *conditional*
residual ``x_k - m_k`` (``m = `` :func:`hetvae.functional.coupled_mean`, passed as ``mean``), and
:func:`nll_bpd` takes the coefficients to give the exact bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hetvae.functional import (
    Family,
    bits_per_dim,
    broadcast_log_scale,
    check_family,
    coupled_discretized_nll,
    discretized_nll,
    quantize_8bit,
)

CALIBRATION_LEVELS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))


def _flat(target: Tensor, mean: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Absolute errors and scales as two float64 vectors of equal length."""
    if target.shape != mean.shape:
        raise ValueError(f"mean of shape {tuple(mean.shape)} must have the shape of target {tuple(target.shape)}")
    s = torch.broadcast_to(broadcast_log_scale(torch.as_tensor(log_scale), target), target.shape)
    error = (target.double() - mean.double()).abs().flatten()
    return error, s.double().exp().flatten()


def psnr(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image, ``10 log10(range^2 / MSE)``, for ``(B, ...)`` images in [0, range].

    Returns ``(B,)`` (float64); a perfect image gives ``inf``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    mse = (prediction.double() - target.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B: the grey that :func:`chroma` measures colour against."""
MIN_CHROMA = 1.0 / 255.0
"""Mean chroma (on the [0, 1] scale) below which :func:`chroma_kept` treats an image as grey."""


def chroma(images: Tensor) -> Tensor:
    """Mean chroma per image of RGB ``(B, 3, H, W)`` images in [0, 1]: the mean absolute difference
    between each channel and the pixel's BT.601 luma, ``(B,)`` float64 (0 for a grey image)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"chroma needs RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    x = images.double()
    luma = (x * x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return (x - luma).abs().flatten(1).mean(dim=1)


def chroma_kept(prediction: Tensor, target: Tensor) -> Tensor:
    """``chroma(prediction) / chroma(target)`` per image (RGB in [0, 1]), ``(B,)`` float64.

    1: the reconstruction is as colourful as the image; below 1 washed out (0: grey), above 1
    over-saturated. NaN for a target whose mean chroma is under :data:`MIN_CHROMA` (a grey image
    has no colour to keep). Whole-image colour faults that PSNR averages away show here.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    reference = chroma(target)
    ratio = chroma(prediction) / reference.clamp_min(MIN_CHROMA)
    return torch.where(reference < MIN_CHROMA, torch.full_like(ratio, float("nan")), ratio)


def nll_bpd(
    target: Tensor, mean: Tensor, log_scale: Tensor, family: Family = "laplace",
    coupling: Tensor | None = None, order: tuple[int, ...] | None = None,
) -> float:
    """Bits per dimension of ``target`` (quantized to 8 bits) under the discretized predicted
    distribution (:func:`hetvae.functional.discretized_nll`); 8.0 is the cost of raw bytes.
    ``coupling`` (and ``order``): colour-coupling coefficients, ``(P,)`` or ``(B, P, H, W)``; each
    channel is then scored given the earlier channels' 8-bit values
    (:func:`hetvae.functional.coupled_discretized_nll`), still the exact bits/dim."""
    x = quantize_8bit(target.double())
    s = torch.as_tensor(log_scale).double()
    if coupling is None:
        return bits_per_dim(discretized_nll(x, mean.double(), s, family)).item()
    return bits_per_dim(coupled_discretized_nll(x, mean.double(), s, coupling.double(), family, order=order)).item()


def half_width(u: Tensor, family: Family) -> Tensor:
    """Half-width, in units of the scale, of the central ``u``-interval of a standard distribution,
    elementwise for a tensor of levels ``u`` in [0, 1).

    Laplace: ``-log(1 - u)``; Gaussian: ``sqrt(2) erfinv(u)``.
    """
    if check_family(family) == "laplace":
        return -torch.log1p(-u)
    return math.sqrt(2.0) * torch.special.erfinv(u)


def interval_half_width(p: float, family: Family) -> float:
    """:func:`half_width` of one level ``p`` in (0, 1), as a float (computed in float64)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"coverage level p must be in (0, 1), got {p}")
    return half_width(torch.tensor(p, dtype=torch.float64), family).item()


def coverage(target: Tensor, mean: Tensor, log_scale: Tensor, p: float, family: Family = "laplace") -> float:
    """Fraction of elements with ``|x - mu| <= w_p * scale``, the central ``p``-interval.

    For a calibrated model this is ``p``: less means over-confident, more under-confident.
    """
    error, scale = _flat(target, mean, log_scale)
    return (error <= interval_half_width(p, family) * scale).double().mean().item()


def coverage_curve(
    target: Tensor, mean: Tensor, log_scale: Tensor, family: Family = "laplace", levels=CALIBRATION_LEVELS
) -> list[float]:
    """Observed coverage at each nominal level (a reliability diagram's points)."""
    error, scale = _flat(target, mean, log_scale)
    return [(error <= interval_half_width(p, family) * scale).double().mean().item() for p in levels]


def calibration_error(
    target: Tensor, mean: Tensor, log_scale: Tensor, family: Family = "laplace", levels=CALIBRATION_LEVELS
) -> float:
    """Mean absolute gap ``|coverage(p) - p|`` over ``p = 0.1, 0.2, ..., 0.9`` (0 is calibrated)."""
    observed = coverage_curve(target, mean, log_scale, family, levels)
    return sum(abs(o - p) for o, p in zip(observed, levels)) / len(levels)


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of a vector, ties sharing their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, counts = torch.unique_consecutive(sorted_x, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() + 1.0) / 2.0  # mean of ranks start..end-1 of each tie group
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return ranks


def spearman_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two vectors (ties averaged); NaN if either is constant."""
    ra, rb = _average_ranks(a.flatten().double()), _average_ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denom == 0:
        return float("nan")
    return ((ra * rb).sum() / denom).item()


def spearman(target: Tensor, mean: Tensor, log_scale: Tensor) -> float:
    """Rank correlation between the predicted scale and the absolute error, over all elements.

    1: the scale orders the errors perfectly; 0: no relation; NaN for a constant (global) scale.
    """
    error, scale = _flat(target, mean, log_scale)
    return spearman_correlation(scale, error)


def _removed_error(error_sorted: Tensor, key_sorted: Tensor) -> Tensor:
    """Cumulative error removed after removing 0..n elements in order, ties removed "on average".

    Elements sharing a key have no order; within a tie group the removed error grows linearly, the
    expectation over random orders of that group.
    """
    n = error_sorted.numel()
    cum = torch.cat([error_sorted.new_zeros(1), torch.cumsum(error_sorted, 0)])
    _, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # group of element i
    idx = torch.arange(1, n + 1)  # removing idx elements: the last removed is element idx - 1
    g = group[idx - 1]
    s, e = starts[g], ends[g]
    frac = (idx - s).double() / (e - s).double()
    return torch.cat([cum[:1], cum[s] + frac * (cum[e] - cum[s])])


def sparsification_curves(
    target: Tensor, mean: Tensor, log_scale: Tensor, steps: int = 100
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparsification curves of the absolute error.

    Remove the fraction ``f`` of elements with the largest predicted scale and take the mean
    absolute error of the rest; the oracle removes by the true error instead. Both curves are
    divided by the mean error at ``f = 0`` so models of different accuracy compare. Returns
    ``(fractions, by_scale, oracle)``, each ``(steps,)``, at ``f = 0, 1/steps, ..., (steps-1)/steps``.
    """
    error, scale = _flat(target, mean, log_scale)
    n = error.numel()
    total = error.sum()
    if total == 0:
        raise ValueError("sparsification is undefined for a perfect reconstruction (all errors are 0)")
    fractions = torch.arange(steps, dtype=torch.float64) / steps
    removed_count = torch.floor(fractions * n).long()
    remaining = (n - removed_count).double()

    order = torch.argsort(scale, descending=True, stable=True)
    by_scale = (total - _removed_error(error[order], scale[order])[removed_count]) / remaining
    oracle_sorted = torch.sort(error, descending=True).values
    oracle = (total - torch.cumsum(torch.cat([error.new_zeros(1), oracle_sorted]), 0)[removed_count]) / remaining
    norm = total / n
    return fractions, by_scale / norm, oracle / norm


def ause(target: Tensor, mean: Tensor, log_scale: Tensor, steps: int = 100) -> float:
    """Area under the sparsification-error curve: mean over ``f`` of (by scale - oracle), normalised.

    0 when the scale orders the errors exactly like the errors themselves; a constant scale removes
    elements at random (in expectation) and gets the full area between the flat curve and the oracle.
    """
    _, by_scale, oracle = sparsification_curves(target, mean, log_scale, steps)
    return (by_scale - oracle).mean().item()
