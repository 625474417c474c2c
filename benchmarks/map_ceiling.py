"""How much a per-pixel scale map can gain at all (in-sample and oracle maps); backs docs/results.md#how-much-any-map-can-gain.

How much can a per-pixel scale map gain on these photographs at all?

For a trained model and a folder of held-out photographs, the reconstruction's absolute error is
scored against several maps of the log-scale, each given the per-channel affine correction
``a * map + c`` that ``hetvae calibrate --method affine`` would fit *on the same images*
(:func:`hetvae.calibration.fit_calibration`: an in-sample fit, so every row but the model's is an
optimistic ceiling, not a result)::

    model                 the model's own map, as trained (no correction)
    model, affine         the model's map with the in-sample affine correction
    global (best)         one scale for all images: the mean absolute error (the Laplace optimum)
    per-image level       one scale per image, each image's own mean absolute error (an oracle)
    edges of the mean     log of the reconstruction's local gradient magnitude (5x5 box): what a
                          map computed from the decoder's output alone can see, with no training
    oracle blur s         log of the true absolute error blurred by a Gaussian of s px: a map that
                          knows the error but not its pixel-level noise

Spearman is between each map and the absolute error, pooled over all elements of all images, and
the mean of the per-image values; bits/dim is the discretized Laplace likelihood of the 8-bit
images (hetvae.metrics.nll_bpd). A predicted map cannot beat the oracle rows; if "edges of the
mean" ranks the errors about as well as the model's map, the head has learnt what the
reconstruction shows and the rest of the error is not visible in it.

    python benchmarks/map_ceiling.py RUN HELDOUT_DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hetvae.autoencoder import edge_magnitude
from hetvae.calibration import Calibration, fit_calibration
from hetvae.images import ImageList, load_images
from hetvae.predictor import load_predictor
from hetvae.metrics import nll_bpd, spearman_correlation

EPS = 1e-3  # floor (in [-1, 1] units, ~0.13 of an 8-bit level) before taking logs of hand-made maps


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def read_folder(parser: argparse.ArgumentParser, path: str) -> ImageList:
    """The images of ``path``, read as ``hetvae eval --images`` reads a folder; a missing or empty
    folder is the parser's usage error, naming it."""
    try:
        return load_images(path)
    except (OSError, ValueError) as error:
        parser.error(str(error))


def pooled(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Images of any sizes as one ``(1, C, N, 1)`` tensor, the pooled form fit_calibration takes."""
    return torch.cat([t.flatten(2) for t in tensors], dim=2).unsqueeze(-1)


def fit_affine(targets: list[torch.Tensor], means: list[torch.Tensor], maps: list[torch.Tensor]) -> Calibration:
    """The per-channel affine correction of ``maps`` fitted by discretized NLL on these images."""
    return fit_calibration(pooled(targets), pooled(means), pooled(maps), "laplace", "affine")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder or model checkpoint")
    parser.add_argument("images", help="folder of held-out photographs (read as `hetvae eval --images` reads one)")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    predictor = load_predictor(args.run, calibrated=False)
    images = read_folder(parser, args.images)
    targets, means, maps = [], [], {"model": [], "edges of the mean": [], "oracle blur 2": [], "oracle blur 4": []}
    for _, x in images:
        pr = predictor.predict(x)
        err = (pr.target - pr.mean).abs()
        targets.append(pr.target)
        means.append(pr.mean)
        maps["model"].append(pr.log_scale.expand_as(pr.mean))
        maps["edges of the mean"].append(torch.log(edge_magnitude(pr.mean) + EPS))
        maps["oracle blur 2"].append(torch.log(blur(err, 2.0) + EPS))
        maps["oracle blur 4"].append(torch.log(blur(err, 4.0) + EPS))
    errors = [(t - m).abs() for t, m in zip(targets, means)]
    level = torch.log(torch.cat([e.flatten() for e in errors]).mean())
    rows = {"model": maps["model"]}
    with torch.enable_grad():
        fitted = {name: fit_affine(targets, means, ms) for name, ms in maps.items()}
    for name, ms in maps.items():
        rows[f"{name}, affine" if name == "model" else name] = [fitted[name].apply(m) for m in ms]
    rows["global (best)"] = [torch.full_like(m, level.item()) for m in means]
    rows["per-image level"] = [torch.full_like(m, torch.log(e.mean()).item()) for m, e in zip(means, errors)]
    table = []
    for name, ms in rows.items():
        bpd = sum(nll_bpd(t, m, s) * t.numel() for t, m, s in zip(targets, means, ms)) / sum(t.numel() for t in targets)
        constant = name in ("global (best)", "per-image level")
        together = float("nan") if name == "global (best)" else spearman_correlation(
            torch.cat([s.flatten()[::3] for s in ms]), torch.cat([e.flatten()[::3] for e in errors]))
        per_image = float("nan") if constant else sum(
            spearman_correlation(s.flatten()[::3], e.flatten()[::3]) for s, e in zip(ms, errors)) / len(ms)
        cal = fitted.get(name.removesuffix(", affine")) if name != "model" else None
        table.append({"map": name, "bits_per_dim": bpd, "spearman_pooled": together, "spearman_per_image": per_image,
                      "affine": None if cal is None else {"slope": cal.slope.tolist(), "offset": cal.offset.tolist()}})
    print(f"# {args.run} on {len(images)} images of {args.images}; affine fits in-sample (ceilings)")
    print("| map | bits/dim | Spearman pooled | Spearman per image (mean) |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['map']} | {r['bits_per_dim']:.3f} | {r['spearman_pooled']:.3f} | {r['spearman_per_image']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "images": images.names, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
