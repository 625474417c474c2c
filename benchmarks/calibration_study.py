"""hetvae calibrate on unseen images: none, a validation-split fit, leave-one-out; backs docs/results.md#calibration.

Post-hoc calibration on unseen photographs: before, after a fit on the built-in held-out split
(what ``hetvae calibrate`` does without ``--images``), and leave-one-image-out on the evaluation
photographs themselves (what a user calibrating on photos like theirs gets).

    python benchmarks/heldout_photos.py ~/heldout                   # six unseen photographs
    python benchmarks/calibration_study.py ~/heldout RUN [RUN ...] --jsonl cal.jsonl
    python benchmarks/calibration_study.py --render cal.jsonl --out docs/results   # table + diagrams

For each run and method (affine, isotonic) it records bits/dim, 90% coverage, calibration error
and the reliability curve, all pooled over every element of every image. Leave-one-out fits on
all evaluation images but one and scores the one left out, for each in turn (pooled).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from hetvae import metrics as M
from hetvae.calibration import calibrated_metrics, fit_calibration, pooled
from hetvae.images import load_images
from hetvae.predictor import load_predictor, predict_all

LEVELS = M.CALIBRATION_LEVELS
METHODS = ("affine", "isotonic")


def _row(curve: list[float], bpd: float) -> dict:
    return {"bpd": bpd, "c90": curve[LEVELS.index(0.9)],
            "cal": sum(abs(c - p) for c, p in zip(curve, LEVELS)) / len(LEVELS), "curve": curve}


def study(run: str, evaluation, fitting) -> dict:
    predictor = load_predictor(run, calibrated=False)
    family = predictor.family
    ev, fit = predict_all(predictor, evaluation), predict_all(predictor, fitting)
    et, em, es = pooled(ev)
    out = {"run": run, "before": _row(M.coverage_curve(et, em, es, family), M.nll_bpd(et, em, es, family))}
    for method in METHODS:
        cal = fit_calibration(*pooled(fit), family, method)
        m = calibrated_metrics(et, em, es, cal)
        out[f"default-{method}"] = _row(m["coverage_curve"], m["nll_bpd"])
        nats, count, hits = 0.0, 0, [0.0] * len(LEVELS)
        for i in range(len(ev)):
            cal = fit_calibration(*pooled([p for j, p in enumerate(ev) if j != i]), family, method)
            t, mu, s = pooled([ev[i]])
            nats += cal.discretized_nll(t, mu, s).sum().item()
            count += t.numel()
            hits = [h + c * t.numel() for h, c in zip(hits, cal.coverage_curve(t, mu, s, LEVELS))]
        out[f"loo-{method}"] = _row([h / count for h in hits], nats / count / math.log(2))
    return out


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def render(rows: list[dict], out: Path) -> str:
    from hetvae.viz import save_reliability_diagram

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(Path(r["run"]).parent.name, []).append(r)
    lines = ["| granularity | calibration | bits/dim | coverage 90% | calib. error |", "|---|---|---|---|---|"]
    names = {"before": "none", "default-affine": "affine, built-in held-out", "default-isotonic": "isotonic, built-in held-out",
             "loo-affine": "affine, leave-one-out", "loo-isotonic": "isotonic, leave-one-out"}
    out.mkdir(parents=True, exist_ok=True)
    for g, rs in groups.items():
        for key, label in names.items():
            lines.append(f"| {g} | {label} | {_mean_std([r[key]['bpd'] for r in rs])} | "
                         f"{_mean_std([r[key]['c90'] for r in rs])} | {_mean_std([r[key]['cal'] for r in rs])} |")
        first = rs[0]
        save_reliability_diagram(out / f"reliability_calibration_{g}.png",
                                 {label: first[key]["curve"] for key, label in names.items()})
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", help="folder of unseen photographs")
    parser.add_argument("runs", nargs="*", help="run folders")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per run here")
    parser.add_argument("--render", default=None, metavar="JSONL", help="write the table and diagrams of a finished study")
    parser.add_argument("--out", default="docs/results", help="folder for the reliability diagrams (--render)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        print(render(rows, Path(args.out)))
        return 0
    if not args.images or not args.runs:
        parser.error("give an image folder and at least one run (or --render)")
    evaluation, fitting = load_images(args.images), load_images(None)
    for run in args.runs:
        row = study(run, evaluation, fitting)
        text = json.dumps(row)
        print(text, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
