"""How post-hoc calibration transfers to unseen photographs; backs docs/results.md#calibration.

Every run predicts every photograph of the given folders once (uncalibrated); corrections are then
fitted on one part and scored on the rest, every element of every scored image pooled:

- ``none``: no correction, scored on all photographs;
- ``A->B`` for every ordered pair of folders: fitted on all of A, scored on B;
- ``n=N``: fitted on N photographs drawn at random from all folders, scored on the rest
  (``--draws`` draws, their mean and spread); these two with ``--cv-methods`` (affine);
- ``shipped``: fitted on the calibration set that ships with the package
  (``hetvae/calibration_photos``, what ``hetvae calibrate RUN`` uses without ``--images``), scored
  on the photographs that are not in it (the shipped files name their source); ``originals``: the
  same photographs as found in the folders, before their JPEG re-encoding;
- ``--extra FOLDER`` (e.g. not-photographs): scored apart, without and with the shipped set.

    python benchmarks/calibration_study.py RUN [RUN ...] --folders ../shared/data/photos/kodak \
        ../shared/data/photos/wikipedia --extra ../shared/data/photos/not-photographs --jsonl cv.jsonl
    python benchmarks/calibration_study.py --render cv.jsonl --out docs/results   # table + diagrams

A row records bits/dim, 90% coverage, calibration error and the reliability curve per method
(affine, isotonic). A correction that fit_calibration refuses (it made the fitting set worse) is
recorded as refused and scored as none.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path


from hetvae import metrics as M
from hetvae.calibration import CalibrationError, fit_calibration, pooled
from hetvae.images import calibration_photos, load_images
from hetvae.predictor import iter_predictions, load_predictor

LEVELS = M.CALIBRATION_LEVELS
METHODS = ("affine", "isotonic")


def _score(preds: list, cal, family: str) -> dict:
    """Pooled bits/dim and reliability curve of ``preds`` under ``cal`` (None: uncalibrated)."""
    nats, count, hits = 0.0, 0, [0.0] * len(LEVELS)
    for p in preds:
        t, mu, s = p.target, p.mean, p.log_scale
        n = t.numel()
        if cal is None:
            nats += M.nll_bpd(t, mu, s, family) * n * math.log(2)
            curve = M.coverage_curve(t, mu, s, family)
        else:
            nats += cal.discretized_nll(t, mu, s).sum().item()
            curve = cal.coverage_curve(t, mu, s, LEVELS)
        hits = [h + c * n for h, c in zip(hits, curve)]
        count += n
    curve = [h / count for h in hits]
    return {"bpd": nats / count / math.log(2), "c90": curve[LEVELS.index(0.9)],
            "cal": sum(abs(c - p) for c, p in zip(curve, LEVELS)) / len(LEVELS), "curve": curve,
            "n_images": len(preds)}


def _fit(preds: list, family: str, method: str):
    print(f"  fitting {method} on {len(preds)} images", file=sys.stderr, flush=True)
    try:
        return fit_calibration(*pooled(preds), family, method)
    except CalibrationError as error:
        print(f"  refused ({method}, {len(preds)} images): {error}", file=sys.stderr)
        return None


def _predict(predictor, images) -> dict[str, object]:
    out = {}
    for source, p in iter_predictions(predictor, images):
        out[Path(source).stem] = p
    return out


def study(run: str, folders: list[str], extra: str | None, sizes: list[int], draws: int,
          cv_methods: tuple[str, ...] = ("affine",)) -> dict:
    predictor = load_predictor(run, calibrated=False)
    family = predictor.family
    sets = {Path(f).name: _predict(predictor, load_images(f)) for f in folders}
    everything = {name: p for s in sets.values() for name, p in s.items()}
    shipped_names = {p.stem for p in calibration_photos()}
    shipped = _predict(predictor, load_images([str(p) for p in calibration_photos()]))
    rest = [p for name, p in everything.items() if name not in shipped_names]
    out: dict = {"run": run, "granularity": predictor.granularity, "family": family,
                 "none": _score(list(everything.values()), None, family), "none-rest": _score(rest, None, family)}
    for method in cv_methods if sizes else ():
        for a, pa in sets.items():
            cal = _fit(list(pa.values()), family, method)
            for b, pb in sets.items():
                if a != b:
                    out[f"{a}->{b}-{method}"] = _score(list(pb.values()), cal, family)
        for n in sizes:
            if n >= len(everything):
                continue
            rows = []
            for d in range(draws):
                names = sorted(everything)
                random.Random(1000 * n + d).shuffle(names)
                fit = [everything[k] for k in names[:n]]
                cal = _fit(fit, family, method)
                rows.append(_score([everything[k] for k in names[n:]], cal, family))
            out[f"n={n}-{method}"] = rows
    extras = list(_predict(predictor, load_images(extra)).values()) if extra else []
    if extras:
        out["none-extra"] = _score(extras, None, family)
    for method in METHODS:
        originals = [everything[k] for k in sorted(shipped_names) if k in everything]
        if originals:  # the same photographs before the JPEG re-encoding
            out[f"originals-{method}"] = _score(rest, _fit(originals, family, method), family)
        cal = _fit(list(shipped.values()), family, method)
        out[f"shipped-{method}"] = _score(rest, cal, family)
        out[f"shipped-{method}-describe"] = None if cal is None else cal.describe()
        if extras:
            out[f"shipped-{method}-extra"] = _score(extras, cal, family)
    return out


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def render(rows: list[dict], out: Path) -> str:
    from hetvae.viz import save_reliability_diagram

    lines = ["| granularity | fitted on | scored on | method | bits/dim | coverage 90% | calib. error |",
             "|---|---|---|---|---|---|---|"]
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        g = r["granularity"]
        def add(fitted, scored, method, cells, g=g):
            cells = cells if isinstance(cells, list) else [cells]
            lines.append(f"| {g} | {fitted} | {scored} | {method} | {_mean_std([c['bpd'] for c in cells])} | "
                         f"{_mean_std([c['c90'] for c in cells])} | {_mean_std([c['cal'] for c in cells])} |")
        add("-", "all photographs", "none", r["none"])
        add("-", "photographs not shipped", "none", r["none-rest"])
        for method in METHODS:
            add("shipped set", "photographs not shipped", method, r[f"shipped-{method}"])
            if f"originals-{method}" in r:
                add("shipped set, PNG originals", "photographs not shipped", method, r[f"originals-{method}"])
        for method in METHODS:
            for key in sorted(k for k in r if "->" in k and k.endswith(f"-{method}")):
                a, b = key[: -len(method) - 1].split("->")
                add(f"all of {a}", f"all of {b}", method, r[key])
            for key in sorted((k for k in r if k.startswith("n=") and k.endswith(f"-{method}")),
                              key=lambda k: int(k[2:].split("-")[0])):
                n = key[2:].split("-")[0]
                add(f"{n} at random", "the rest", method, r[key])
        if "none-extra" in r:
            add("-", "not-photographs", "none", r["none-extra"])
            for method in METHODS:
                add("shipped set", "not-photographs", method, r[f"shipped-{method}-extra"])
        save_reliability_diagram(out / f"reliability_calibration_{Path(r['run']).name}.png",
                                 {"none": r["none-rest"]["curve"],
                                  **{f"{m}, shipped set": r[f"shipped-{m}"]["curve"] for m in METHODS}})
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders or model files")
    parser.add_argument("--folders", nargs="+", default=[], help="photograph folders to fit and score on")
    parser.add_argument("--extra", default=None, help="a folder scored apart (e.g. not-photographs)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32],
                        help="random fitting-set sizes (none: only the shipped set, no source or size experiments)")
    parser.add_argument("--draws", type=int, default=2, help="random draws per size")
    parser.add_argument("--cv-methods", nargs="+", choices=METHODS, default=["affine"],
                        help="methods of the source and size experiments (the shipped set: both)")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per run here")
    parser.add_argument("--render", default=None, metavar="JSONL", help="print the table of a finished study")
    parser.add_argument("--out", default="docs/results", help="folder for the reliability diagrams (--render)")
    args = parser.parse_args(argv)
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        print(render(rows, Path(args.out)))
        return 0
    if not args.runs or not args.folders:
        parser.error("give at least one run and --folders (or --render)")
    for run in args.runs:
        row = study(run, args.folders, args.extra, args.sizes, args.draws, tuple(args.cv_methods))
        text = json.dumps(row)
        print(text, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
