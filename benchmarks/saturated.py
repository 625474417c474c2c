"""Coverage over the most saturated pixels beside the whole image; backs docs/results.md#saturated-colour.

    python benchmarks/saturated.py RUN [RUN ...] --photos ../shared/data/photos/kodak \
        ../shared/data/photos/wikipedia --exclude-shipped

A per-pixel map tends to light edges and texture and to stay low over smooth, strongly coloured
regions, where a model that washes colour out errs the most. For each run this pools every element
of every photograph and reports the 90% coverage (of the conditional residuals ``|x - centre|``
against the conditional scales, as ``hetvae eval`` scores a coupled model; the marginal ones
without coupling) over all pixels and over the most saturated fraction of pixels (``--top``, 0.1:
the tenth with the largest chroma of the *input*, the mean absolute difference of R, G, B from the
pixel's BT.601 luma, ranked over the pooled photographs), with the mean standardized error
``|x - centre| / scale`` on both. Scores use the model's stored calibration, if any (``--uncalibrated``: not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hetvae.images import calibration_photos, list_images, load_images
from hetvae.metrics import LUMA_WEIGHTS, interval_half_width
from hetvae.predictor import iter_predictions, load_predictor


def pixel_chroma(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel chroma ``(H * W,)`` of one RGB image ``(1, 3, H, W)`` in [-1, 1], on the [0, 1] scale."""
    x = (x.double() + 1) / 2
    luma = (x * x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return (x - luma).abs().mean(dim=1).flatten()


def score(run: str, files: list[Path], top: float, calibrated: bool) -> dict:
    predictor = load_predictor(run, calibrated=calibrated)
    chroma, inside, standardized = [], [], []
    for _, p in iter_predictions(predictor, load_images(files), progress=True, desc=Path(run).name):
        width = interval_half_width(0.9, predictor.family)
        scale = p.log_scale.double().exp().expand_as(p.target)
        z = (p.conditional_error.double() / scale)[0].flatten(1)  # (C, H * W)
        chroma.append(pixel_chroma(p.target))
        inside.append((z <= width).double().mean(dim=0))  # the fraction of a pixel's channels covered
        standardized.append(z.mean(dim=0))
    chroma, inside, standardized = torch.cat(chroma), torch.cat(inside), torch.cat(standardized)
    k = max(1, round(top * chroma.numel()))
    saturated = torch.topk(chroma, k).indices
    return {"coverage_90": inside.mean().item(), "coverage_90_saturated": inside[saturated].mean().item(),
            "standardized": standardized.mean().item(), "standardized_saturated": standardized[saturated].mean().item(),
            "chroma_threshold": chroma[saturated].min().item(), "pixels": chroma.numel()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or model files")
    parser.add_argument("--photos", nargs="+", required=True, help="folders (or files) pooled")
    parser.add_argument("--top", type=float, default=0.1, help="the most saturated fraction of pixels (default 0.1)")
    parser.add_argument("--exclude-shipped", action="store_true",
                        help="leave out the photographs of hetvae's shipped calibration set")
    parser.add_argument("--uncalibrated", action="store_true", help="ignore a stored calibration")
    args = parser.parse_args(argv)
    if not 0.0 < args.top <= 1.0:
        parser.error(f"--top must be in (0, 1], got {args.top}")
    files = list_images(args.photos)
    if args.exclude_shipped:
        shipped = {p.stem for p in calibration_photos()}
        files = [f for f in files if f.stem not in shipped]
    if not files:
        parser.error("no photographs to score")
    print(f"{len(files)} photographs; the most saturated {args.top:.0%} of pixels by the input's chroma", file=sys.stderr)
    print("| run | coverage 90% (all) | coverage 90% (saturated) | mean |x - m| / b (all) | (saturated) | chroma above |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = score(run, files, args.top, not args.uncalibrated)
        print(f"| {run} | {r['coverage_90']:.3f} | {r['coverage_90_saturated']:.3f} | {r['standardized']:.3f} | "
              f"{r['standardized_saturated']:.3f} | {r['chroma_threshold']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
