"""Scores runs or models on folders of photographs; backs docs/results.md#calibration.

    python benchmarks/photos.py RUN [RUN ...] --photos ../shared/data/photos/kodak \
        ../shared/data/photos/wikipedia --apart ../shared/data/photos/not-photographs --json photos.json

One row per run and image set: the ``--photos`` folders pooled (every element of every image), then
each ``--apart`` folder on its own row. A calibrated model gets two rows per set, calibrated and
raw (one pass). ``--exclude-shipped`` leaves out the photographs of the calibration set that ships
with hetvae, so a model calibrated on it is scored on photographs it was not fitted on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hetvae.evaluate import evaluate
from hetvae.images import calibration_photos, list_images, load_images
from hetvae.predictor import load_predictor

COLUMNS = (("psnr", "PSNR (dB)", 2), ("nll_bpd", "bits/dim", 3), ("coverage_90", "coverage 90%", 3),
           ("calibration_error", "calib. error", 3), ("spearman", "Spearman", 3), ("ause", "AUSE", 3))


def image_set(folders: list[str], exclude_shipped: bool) -> tuple[list[Path], str]:
    files = list_images(folders)
    name = " + ".join(Path(f).name for f in folders)
    if exclude_shipped:
        shipped = {p.stem for p in calibration_photos()}
        kept = [f for f in files if f.stem not in shipped]
        name += f" (not the shipped {len(files) - len(kept)})"
        files = kept
    return files, f"{name}, {len(files)} images"


def score(run: str, files: list[Path]) -> dict:
    predictor = load_predictor(run)
    return evaluate(predictor, load_images(files), progress=True)


def row(run: str, set_name: str, calibration: str, r: dict) -> str:
    cells = ["-" if r[k] is None else f"{r[k]:.{d}f}" for k, _, d in COLUMNS]
    return f"| {run} | {set_name} | {calibration} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or model files")
    parser.add_argument("--photos", nargs="+", required=True, help="folders (or files) scored together")
    parser.add_argument("--apart", nargs="*", default=[], help="folders scored each on its own row")
    parser.add_argument("--exclude-shipped", action="store_true",
                        help="leave out the photographs of hetvae's shipped calibration set")
    parser.add_argument("--json", default=None, help="write every result here")
    args = parser.parse_args(argv)
    sets = [image_set(args.photos, args.exclude_shipped)]
    sets += [image_set([f], args.exclude_shipped) for f in args.apart]
    lines = ["| run | images | calibration | " + " | ".join(t for _, t, _ in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    results = []
    for run in args.runs:
        for files, set_name in sets:
            r = score(run, files)
            results.append({"run": run, "images": set_name, **r})
            if "uncalibrated" in r:
                lines.append(row(run, set_name, "none", r["uncalibrated"]))
                lines.append(row(run, set_name, r["calibration"], r))
            else:
                lines.append(row(run, set_name, "none", r))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
