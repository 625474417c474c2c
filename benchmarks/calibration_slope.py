"""The affine slope of a per-image constant scale, fitted or not, on unseen photographs; backs docs/math.md#post-hoc-calibration.

A model scored with the per-image best constant scale (``log_scale.fit: optimal``, or a VAE with
neither a head nor a recorded likelihood) has one log-scale per image and channel. This fits the
calibration on some photographs and scores it on others, three ways: no correction, the slope
and the offset fitted (``fit_calibration(..., slope=True)``), and the offset only (the default
for a scale constant over each image), for the affine and the isotonic method:

    hetvae train configs/tiny.yaml --set log_scale.granularity=global --set log_scale.fit=optimal \\
        --set train.steps=400 --set train.final_steps=100 --out runs/tiny-optimal
    python benchmarks/calibration_slope.py runs/tiny-optimal --fit ../shared/data/photos/kodak \\
        --score ../shared/data/photos/wikipedia [--first 5]

``--fit`` left out fits on scikit-image's held-out sample photographs; ``--first N`` fits on the
first N photographs of the fitting folder. Every element of every scored photograph is pooled.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hetvae.calibration import Calibration, calibrated_metrics, fit_calibration, pooled
from hetvae.images import load_images
from hetvae.predictor import iter_predictions, load_predictor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders or model files")
    parser.add_argument("--fit", nargs="*", default=None, help="photographs to fit on (default: the held-out samples)")
    parser.add_argument("--score", nargs="+", required=True, help="photographs to score on")
    parser.add_argument("--first", type=int, default=None, help="fit on the first N fitting photographs only")
    args = parser.parse_args(argv)
    print("| run | calibration | slopes | bits/dim (fit) | bits/dim | coverage 90% | calib. error |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        predictor = load_predictor(run, calibrated=False)
        fit_images = load_images(args.fit or None)
        count = len(fit_images) if args.first is None else min(args.first, len(fit_images))
        fit = pooled([p for k, (_, p) in zip(range(count), iter_predictions(predictor, fit_images))])
        score = pooled([p for _, p in iter_predictions(predictor, load_images(args.score))])
        channels = fit[0].shape[1]
        rows = {"none": Calibration("affine", predictor.family, torch.ones(channels), torch.zeros(channels))}
        for method in ("affine", "isotonic"):
            rows[f"{method}, slope and offset"] = fit_calibration(*fit, predictor.family, method, slope=True)
            rows[f"{method}, offset only"] = fit_calibration(*fit, predictor.family, method, slope=False)
        for name, cal in rows.items():
            on_fit, m = calibrated_metrics(*fit, cal), calibrated_metrics(*score, cal)
            slopes = ", ".join(f"{a:.2f}" for a in cal.slope.tolist())
            print(f"| {run} | {name} | {slopes} | {on_fit['nll_bpd']:.4f} | {m['nll_bpd']:.4f} | "
                  f"{m['coverage_90']:.3f} | {m['calibration_error']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
