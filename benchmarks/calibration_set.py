"""Writes the calibration photographs that ship with hetvae; backs docs/results.md#calibration.

    python benchmarks/calibration_set.py ../shared/data/photos hetvae/calibration_photos

Takes a fixed number of photographs from each source folder (kodak/, wikipedia/), spread evenly
over the folder's range of detail: the photographs sorted by the size of their PNG file per pixel
(a measure of detail that depends on no model), then every k-th one, so the set is as hard as the
folder is and not one lucky draw. Re-encodes them as JPEG (quality 85, no chroma subsampling: the
package stays under 4 MB; docs/results.md measures that the re-encoding does not move the fitted
correction) and writes CREDITS.md with their sources. The photographs it does not take stay the
project's evaluation set.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image

SOURCES = {"kodak": 12, "wikipedia": 20}
"""Photographs taken per source folder: in proportion to the shared set (20 and 36)."""
QUALITY = 85


def detail(file: Path) -> float:
    """PNG bytes per pixel."""
    with Image.open(file) as image:
        return file.stat().st_size / (image.width * image.height)


def chosen(photos: Path) -> list[Path]:
    """The files taken, in source order then name order."""
    out = []
    for folder, count in SOURCES.items():
        files = sorted((photos / folder).glob("*.png"), key=detail)
        if len(files) < count:
            raise SystemExit(f"{photos / folder}: {len(files)} photographs, {count} needed")
        out.extend(sorted(files[int((i + 0.5) * len(files) / count)] for i in range(count)))
    return out


def credits(photos: Path, files: list[Path]) -> str:
    text = (photos / "CREDITS.md").read_text()
    pages = re.findall(r"^- (https://commons\.wikimedia\.org/\S+)$", text, flags=re.MULTILINE)
    kodak = [f.stem for f in files if f.parent.name == "kodak"]
    wiki = [f.stem for f in files if f.parent.name == "wikipedia"]
    lines = [
        "# Calibration photographs",
        "",
        "The photographs `hetvae calibrate` fits on when no `--images` are given. None of them is in",
        "hetvae's training data. Re-encoded as JPEG (quality 85) by `benchmarks/calibration_set.py`.",
        "",
        f"- {', '.join(kodak)}: the Kodak PhotoCD test set (768x512), released by Eastman Kodak for unrestricted",
        "  use.",
        f"- {', '.join(wiki)}: photographs from Wikimedia Commons, downsampled from very high resolution",
        "  originals in the public repository Zelex/images (folder wikipedia-photos/, whose file numbers these",
        "  keep) and resized to 768 px on the long side. They are under Creative Commons licences that mostly",
        "  require attribution; each is one of the photographs on the source pages below, which give its author",
        "  and licence (the upstream folder numbers its files in the natural order of these pages).",
        "",
        "## Wikimedia Commons source pages",
        *[f"- {p}" for p in pages],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", help="the folder with kodak/, wikipedia/ and CREDITS.md")
    parser.add_argument("out", help="where to write the set (its .jpg files are replaced)")
    args = parser.parse_args(argv)
    photos, out = Path(args.photos), Path(args.out)
    files = chosen(photos)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    total = 0
    for f in files:
        target = out / f"{f.stem}.jpg"
        Image.open(f).convert("RGB").save(target, "JPEG", quality=QUALITY, subsampling=0)
        total += target.stat().st_size
    (out / "CREDITS.md").write_text(credits(photos, files))
    print(f"wrote {len(files)} photographs ({total / 1e6:.2f} MB) and CREDITS.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
