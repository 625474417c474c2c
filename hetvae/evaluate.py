"""Measuring a model's uncertainty on whole images: :func:`evaluate` pools every element of every
image and returns the metrics of :mod:`hetvae.metrics` under the keys ``hetvae eval`` writes;
:func:`compare` does so for several models on the same images.

Images are streamed (:func:`hetvae.predictor.iter_predictions`), and the pooled metrics keep only
what they need of each prediction (the additive ones as sums; Spearman and AUSE, which rank every
element, its float32 |error| and log-scale: 8 bytes per pixel and channel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hetvae import metrics as M
from hetvae.calibration import Calibration
from hetvae.functional import coupled_mean, quantize_8bit
from hetvae.outputs import COMPARISON_HEADER
from hetvae.predictor import Prediction, Predictor, iter_predictions

COLOUR_KEYS = ("chroma_kept", "chroma_kept_min", "chroma_kept_max")
"""Also in every result of :func:`summarize`: the share of the images' chroma their reconstructions
keep (:func:`hetvae.metrics.chroma_kept`), mean / least / most over the RGB images that have colour;
``None`` when there are none. Not part of :data:`hetvae.outputs.METRIC_KEYS`, which recognises older results too."""


class _Pool:
    """What the pooled metrics need, gathered one prediction at a time: per-image PSNR, the summed
    bits and interval hits (additive), and for the rank metrics each element's float32 |error|
    and log-scale. The images and reconstructions themselves are not kept."""

    def __init__(self, family: str, calibration: Calibration | None = None) -> None:
        self.family = family
        self.calibration = calibration
        self.psnr: list[float] = []
        self.chroma_kept: list[float] = []
        self.bits = 0.0
        self.count = 0
        self.hits = [0] * len(M.CALIBRATION_LEVELS)
        self.errors: list[Tensor] = []
        self.log_scales: list[Tensor] = []
        self.marginal_error = self.conditional_error = 0.0

    def add(self, p: Prediction) -> None:
        target, mean, log_scale = p.target, p.mean, p.log_scale
        n = target.numel()
        shown, truth = (mean.clamp(-1, 1) + 1) / 2, (target + 1) / 2
        self.psnr.extend(M.psnr(shown, truth).tolist())
        if target.ndim == 4 and target.shape[1] == 3:
            self.chroma_kept.extend(k for k in M.chroma_kept(shown, truth).tolist() if math.isfinite(k))
        # with colour coupling the scale is each channel's given the earlier ones: the intervals, the
        # ranks and the bits are of the conditional residual x - centre (the mean without coupling)
        centre, bits_centre = mean, mean
        if p.coupling is not None:
            centre = p.centre
            self.marginal_error += (target.double() - mean.double()).abs().sum().item()
            self.conditional_error += (target.double() - centre.double()).abs().sum().item()
            # the bits: each channel's 8-bit bin given the earlier channels' 8-bit values
            bits_centre = coupled_mean(quantize_8bit(target.double()), mean.double(), p.coupling.double(), p.coupling_order)
        cal = self.calibration
        if cal is None:
            self.bits += M.nll_bpd(target, bits_centre, log_scale, self.family) * n
            curve = M.coverage_curve(target, centre, log_scale, self.family)
        else:  # the calibrated distribution, from the uncalibrated scale (isotonic: not one scale)
            if p.raw_log_scale is None:
                raise ValueError("a calibrated pool needs predictions of a calibrated predictor (raw_log_scale)")
            # a chroma term reads the reconstruction (mean), never the coupled centre
            self.bits += cal.bits_per_dim(target, bits_centre, p.raw_log_scale, chroma_of=mean) * n
            curve = cal.coverage_curve(target, centre, p.raw_log_scale, M.CALIBRATION_LEVELS, chroma_of=mean)
        self.hits = [h + round(c * n) for h, c in zip(self.hits, curve)]
        self.count += n
        self.errors.append((target.double() - centre.double()).abs().float().flatten().cpu())
        self.log_scales.append(torch.broadcast_to(log_scale, target.shape).float().flatten().cpu())

    def coverage_curve(self) -> list[float]:
        return [h / self.count for h in self.hits]

    def _rank_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(|error|, 0, log_scale)`` as ``(1, 1, N, 1)``, for the metrics of target, mean, log-scale."""
        error = torch.cat(self.errors).view(1, 1, -1, 1)
        return error, torch.zeros(()).expand_as(error), torch.cat(self.log_scales).view(1, 1, -1, 1)

    def sparsification_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        return M.sparsification_curves(*self._rank_inputs())

    def summary(self, granularity: str) -> dict:
        if not self.count:
            raise ValueError("no images to evaluate")
        ranked = self._rank_inputs()
        rho = M.spearman(*ranked)
        levels = M.CALIBRATION_LEVELS
        observed = self.coverage_curve()
        kept = self.chroma_kept
        return {
            "psnr": sum(self.psnr) / len(self.psnr),
            "nll_bpd": self.bits / self.count,
            "coverage_50": observed[levels.index(0.5)],
            "coverage_90": observed[levels.index(0.9)],
            "calibration_error": sum(abs(o - p) for o, p in zip(observed, levels)) / len(levels),
            "spearman": None if math.isnan(rho) else rho,
            "ause": M.ause(*ranked),
            "n_images": len(self.psnr),
            "granularity": granularity,
            "chroma_kept": sum(kept) / len(kept) if kept else None,
            "chroma_kept_min": min(kept) if kept else None,
            "chroma_kept_max": max(kept) if kept else None,
            **(self._coupling_summary() if self.marginal_error or self.conditional_error else {}),
        }

    def _coupling_summary(self) -> dict:
        """With colour coupling: the mean marginal error ``|x - mu|`` (what PSNR sees) beside the
        mean conditional one ``|x - centre|`` (what the scales and the rank metrics are of)."""
        return {"marginal_mae": self.marginal_error / self.count, "conditional_mae": self.conditional_error / self.count}


def summarize(
    predictions: Iterable[Prediction], family: str, granularity: str, calibration: Calibration | None = None
) -> dict:
    """The metrics of ``hetvae eval`` over all elements of all predictions (under ``calibration``
    when given: predictions then carry ``raw_log_scale``)."""
    pool = _Pool(family, calibration)
    for p in predictions:
        pool.add(p)
    return pool.summary(granularity)


def _uncalibrated(p: Prediction) -> Prediction:
    if p.raw_log_scale is None:
        return p
    return Prediction(p.target, p.mean, p.raw_log_scale, coupling=p.coupling, coupling_order=p.coupling_order)


PER_IMAGE_KEYS = (
    "psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause", "chroma_kept",
)
"""The metrics of each image in ``evaluate(..., per_image=True)["images"]`` (with ``"image"``, its
source). The pooled PSNR and ``chroma_kept`` are the means of these, the pooled bits/dim their mean
weighted by the images' element counts; coverage and the rank metrics pool elements instead."""


def _alone(p: Prediction, family: str, granularity: str, calibration: Calibration | None = None) -> dict:
    """The :data:`PER_IMAGE_KEYS` of one prediction, measured as if it were the only image."""
    pool = _Pool(family, calibration)
    pool.add(p)
    summary = pool.summary(granularity)
    return {k: summary[k] for k in PER_IMAGE_KEYS}


def evaluate(predictor: Predictor, images: Iterable, progress: bool = False, per_image: bool = False,
             batch_size: int = 1) -> dict:
    """Predict every image (``(C, H, W)`` in [-1, 1], ``(name, image)`` pairs or an
    :class:`ImageList`), one at a time (``batch_size``: up to that many of one size together,
    :func:`hetvae.predictor.iter_predictions`), and :func:`summarize` them.

    With a calibrated predictor the metrics are the calibrated ones, plus ``"calibration"`` (its
    description) and ``"uncalibrated"``: the same metrics without the correction (one pass).
    ``per_image``: also ``"images"``, one dict per image in order: ``"image"`` (its file, or its
    name or ``#k`` for images given in memory) and the :data:`PER_IMAGE_KEYS`, measured as if it
    were the only image (so a reader finds which photograph is washed out or badly covered); with a
    calibrated predictor also ``"uncalibrated"``, the same keys without the correction."""
    cal = predictor.calibration
    pool = _Pool(predictor.family, cal)
    raw = _Pool(predictor.family) if cal is not None else None
    rows: list[dict] | None = [] if per_image else None
    for source, p in iter_predictions(predictor, images, progress, batch_size=batch_size):
        pool.add(p)
        if raw is not None:
            raw.add(_uncalibrated(p))
        if rows is not None:
            name = source if source is not None else f"#{len(rows)}"
            rows.append({"image": name, **_alone(p, predictor.family, predictor.granularity, cal)})
            if cal is not None:
                rows[-1]["uncalibrated"] = _alone(_uncalibrated(p), predictor.family, predictor.granularity)
    result = pool.summary(predictor.granularity)
    if rows is not None:
        result["images"] = rows
    if raw is not None:
        result["calibration"] = cal.describe()
        result["uncalibrated"] = raw.summary(predictor.granularity)
    return result


@dataclass
class Comparison:
    """Metrics and curves of several models on the same images."""

    results: dict[str, dict]
    reliability: dict[str, list[float]]
    sparsification: dict[str, tuple[Tensor, Tensor, Tensor]]

    def markdown(self) -> str:
        """A markdown table, one row per model."""

        def fmt(value, digits):
            return "n/a" if value is None else f"{value:.{digits}f}"

        lines = [
            COMPARISON_HEADER,
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in self.results.items():
            lines.append(
                f"| {name} | {r['granularity']} | {fmt(r['psnr'], 2)} | {fmt(r['nll_bpd'], 3)} | "
                f"{fmt(r['coverage_50'], 3)} | {fmt(r['coverage_90'], 3)} | {fmt(r['calibration_error'], 3)} | "
                f"{fmt(r['spearman'], 3)} | {fmt(r['ause'], 3)} |"
            )
        return "\n".join(lines) + "\n"


def compare(predictors: dict[str, Predictor], images: Iterable, progress: bool = False,
            batch_size: int = 1) -> Comparison:
    """Evaluate each predictor on the same images; keep the reliability and sparsification curves.
    An :class:`ImageList` is read again for each predictor (one image in memory at a time, or one
    batch of ``batch_size``)."""
    if not isinstance(images, Sequence):
        images = list(images)  # a one-shot iterator would be empty for the second predictor
    results, reliability, sparsification = {}, {}, {}
    for name, predictor in predictors.items():
        pool = _Pool(predictor.family, predictor.calibration)
        for _, p in iter_predictions(predictor, images, progress, desc=str(name), batch_size=batch_size):
            pool.add(p)
        results[name] = pool.summary(predictor.granularity)
        reliability[name] = pool.coverage_curve()
        sparsification[name] = pool.sparsification_curves()
    return Comparison(results, reliability, sparsification)
