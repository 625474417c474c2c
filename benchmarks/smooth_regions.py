"""Error, scale and coverage in smooth and detailed regions; backs docs/results.md#where-the-map-is-right-and-where-it-is-not.

Where is the map over-confident? Smooth against detailed regions of the photograph.

For a trained model and a folder of held-out photographs, every pixel is put in one of two regions
by the detail of the *photograph itself* (:func:`hetvae.autoencoder.edge_magnitude` of the input,
the 5x5 average of ``|right - here| + |below - here|``, averaged over the colour channels):
``smooth`` below ``--threshold`` ([-1, 1] units; the default 0.02 is about 2.5 8-bit levels) and
``detailed`` above. For each image and region, and pooled over the images:

    share          the region's share of the image's pixels
    signed R/G/B   the mean signed error ``mean - photograph`` per channel, in 8-bit levels: a colour
                   shift of the region shows here (greyer: the strong channel lowered, the weak raised)
    |error|        the mean absolute error, in 8-bit levels
    low-pass       mean |signed error blurred by a Gaussian of 8 px| / mean |error|: near 1 when the
                   error is a shift of a whole region's colour or level, near 0 for pixel noise
    b              the mean predicted scale, in 8-bit levels (for a Laplace, the expected |error|)
    cov90          the share of elements inside the central 90% interval (0.90 when calibrated)

A map read from the decoder's output sees the detail the reconstruction draws. An error that is
low-pass inside a smooth region is a shift the reconstruction does not show, so there ``cov90``
falls below 0.90 while the detailed region stays calibrated (docs/results.md:
flower's background).

    python benchmarks/smooth_regions.py RUN HELDOUT_DIR [--threshold 0.02] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hetvae.autoencoder import edge_magnitude
from hetvae.predictor import load_predictor
from hetvae.metrics import interval_half_width
from map_ceiling import blur, read_folder  # this folder: run as `python benchmarks/smooth_regions.py`

LEVELS = 127.5  # [-1, 1] units to 8-bit levels
REGIONS = ("smooth", "detailed")
BLUR_SIGMA = 8.0  # px: the low-pass of the "low-pass" column


def region_stats(signed: torch.Tensor, low: torch.Tensor, scale: torch.Tensor,
                 inside: torch.Tensor) -> dict[str, float | list[float]] | None:
    """The table's columns for a region's pixels, each tensor ``(C, N)`` (``image[:, mask]``). None
    for an empty region."""
    n = signed.shape[1]
    if n == 0:
        return None
    return {
        "pixels": n,
        "signed_levels": (signed.mean(1) * LEVELS).tolist(),
        "abs_levels": signed.abs().mean().item() * LEVELS,
        "low_pass": (low.abs().mean() / signed.abs().mean().clamp_min(1e-12)).item(),
        "scale_levels": scale.mean().item() * LEVELS,
        "cov90": inside.double().mean().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder or model checkpoint")
    parser.add_argument("images", help="folder of held-out photographs (read as `hetvae eval --images` reads one)")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="the photograph's 5x5 edge magnitude ([-1, 1] units) below which a pixel is smooth")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args(argv)
    if not args.threshold > 0:
        parser.error(f"--threshold must be > 0, got {args.threshold}")
    torch.set_grad_enabled(False)
    predictor = load_predictor(args.run, calibrated=False)
    images = read_folder(parser, args.images)
    width = interval_half_width(0.9, predictor.family)
    rows, pooled = [], {r: [] for r in REGIONS}
    for name, x in images:
        if min(x.shape[-2:]) <= 3 * BLUR_SIGMA:
            parser.error(f"{name}: {x.shape[-1]}x{x.shape[-2]} is too small for the {BLUR_SIGMA:g} px low-pass "
                         f"(each side must exceed {3 * BLUR_SIGMA:g} px)")
        pr = predictor.predict(x)
        signed = (pr.mean - pr.target)[0]
        low = blur(signed[None], BLUR_SIGMA)[0]
        scale = pr.scale.expand_as(pr.mean)[0]
        inside = signed.abs() <= width * scale
        smooth = edge_magnitude(pr.target)[0].mean(0) < args.threshold
        for region, mask in zip(REGIONS, (smooth, ~smooth)):
            parts = tuple(t[:, mask] for t in (signed, low, scale, inside))
            stats = region_stats(*parts)
            if stats is not None:
                stats["share"] = stats["pixels"] / mask.numel()
                rows.append({"image": name, "region": region, **stats})
                pooled[region].append(parts)
    total = sum(r["pixels"] for r in rows)
    for region, parts in pooled.items():
        if parts:
            stats = region_stats(*(torch.cat(p, dim=1) for p in zip(*parts)))
            stats["share"] = stats["pixels"] / total
            rows.append({"image": "all", "region": region, **stats})
    print(f"# {args.run} on {len(images)} images of {args.images}; smooth: the photograph's edge magnitude < {args.threshold}")
    print("| image | region | share | signed R / G / B | abs error | low-pass | b | cov90 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        signed = " / ".join(f"{v:+.1f}" for v in r["signed_levels"])
        print(f"| {r['image']} | {r['region']} | {r['share']:.2f} | {signed} | {r['abs_levels']:.1f} | "
              f"{r['low_pass']:.2f} | {r['scale_levels']:.1f} | {r['cov90']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "threshold": args.threshold, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
