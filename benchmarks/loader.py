"""Training crops per second per core from each data source, and the time to the first batch; backs docs/performance.md#training-data.

Two measurements, both with one torch thread in this process (the loader's own work, as one
``DataLoader`` worker does it):

1. **Crops per second per core**: 256 px training crops (as ``data.resolution: 256`` cuts them:
   random window, flip; ``--rescale`` adds SD-style rescaling) from 768 px JPEG photographs, each
   crop decoding its photograph (``data.cache_mb: 0``: a data set of millions of photographs does
   not fit any cache), for the three sources a run can name in ``data.path``: a folder
   (``hetvae.data.ImageDataset``, read lazily), tar shards (``hetvae.shards.ShardStream``, written by
   ``hetvae shards``) and a Hugging Face dataset saved with ``save_to_disk`` (the same
   ``ImageDataset``). Rates are per CPU second of this process (``time.process_time``), so other
   work on the machine does not lower them; the wall-clock rate is printed beside. The ratio column
   is each source against the folder.
2. **Time to the first batch** of 8 crops from a folder of ``--start-files`` JPEGs: the lazy
   start training uses now against the check that decoded every file first (``check="full"``,
   the baseline), in the same process.

The photographs are the 32 calibration photographs that ship with the package
(``hetvae/calibration_photos``, 768 px JPEG quality 85), repeated under new names: only their
decoding is timed, nothing trains on them.

    python benchmarks/loader.py --quick
    python benchmarks/loader.py                      # 2,000 crops per source, 10,000 files to start
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _timing import machine

from hetvae.data import ImageDataset
from hetvae.images import calibration_photos
from hetvae.shards import ShardStream, write_shards

RESOLUTION = 256


def photo_folder(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG files in ``folder``: the shipped calibration photographs, repeated (hard
    links where the file system allows, copies otherwise)."""
    photos = sorted(calibration_photos())
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        src, dst = photos[i % len(photos)], folder / f"photo{i:06d}.jpg"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        files.append(dst)
    return files


def hf_dataset(files: list[Path], out: Path) -> Path | None:
    """A Hugging Face dataset (``save_to_disk``) with the files' bytes in an ``image`` column, or
    None when ``datasets`` is not installed."""
    try:
        import datasets
    except ImportError:
        return None
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files]}
    table = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    table.save_to_disk(str(out))
    return out


def rate(draw, crops: int) -> tuple[float, float]:
    """(crops per CPU second, crops per wall second) of drawing ``crops`` crops with ``draw``."""
    draw(8)  # warm: the first file opened, the first index read
    cpu, wall = time.process_time(), time.perf_counter()
    draw(crops)
    return crops / (time.process_time() - cpu), crops / (time.perf_counter() - wall)


def dataset_draw(dataset: ImageDataset):
    index = iter(range(10**9))

    def draw(n: int) -> None:
        for _ in range(n):
            dataset[(0, next(index) % len(dataset))]

    return draw


def stream_draw(stream: ShardStream):
    batches = stream.worker_batches(0)

    def draw(n: int) -> None:
        for _ in range(-(-n // stream.batch)):
            next(batches)

    return draw


def crops_per_core(root: Path, files: list[Path], crops: int, rescale) -> list[tuple[str, float, float]]:
    kw = dict(resolution=RESOLUTION, seed=0, cache_mb=0.0, check="lazy", rescale=rescale,
              num_samples=max(len(files), crops + 8))
    rows = [("folder", *rate(dataset_draw(ImageDataset(str(root / "folder"), **kw)), crops))]
    shards = write_shards(root / "folder", root / "shards", size=max(1, len(files) // 8)).paths
    probe = ImageDataset(str(root / "folder"), **kw)
    stream = ShardStream(shards, augment=probe.augment, batch=16, seed=0)
    rows.append(("tar shards", *rate(stream_draw(stream), crops)))
    saved = hf_dataset(files, root / "hf")
    if saved is not None:
        rows.append(("Hugging Face dataset", *rate(dataset_draw(ImageDataset(str(saved), **kw)), crops)))
    return rows


def time_to_first_batch(folder: Path, check: str) -> float:
    start = time.perf_counter()
    dataset = ImageDataset(str(folder), resolution=RESOLUTION, seed=0, cache_mb=0.0, check=check)
    torch.stack([dataset[(0, i)] for i in range(8)])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=2000, help="crops timed per source")
    parser.add_argument("--files", type=int, default=256, help="photograph files per source")
    parser.add_argument("--start-files", type=int, default=10000, help="files of the time-to-first-batch folder")
    parser.add_argument("--rescale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="data.rescale of the crops (default: plain crops)")
    parser.add_argument("--quick", action="store_true", help="200 crops, 64 files, 1,000 files to start")
    args = parser.parse_args(argv)
    if args.quick:
        args.crops, args.files, args.start_files = 200, 64, 1000
    torch.set_num_threads(1)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = photo_folder(root / "folder", args.files)
        rows = crops_per_core(root, files, args.crops, tuple(args.rescale) if args.rescale else None)
        what = f"{RESOLUTION} px crops" + (f", rescale {args.rescale}" if args.rescale else "")
        print(f"\n{what} from 768 px JPEGs, {args.crops} per source, a decode per crop, one core")
        print("| source | crops/s per core (CPU time) | wall clock | / folder |")
        print("|---|---|---|---|")
        for name, per_cpu, per_wall in rows:
            print(f"| {name} | {per_cpu:.1f} | {per_wall:.1f} | {per_cpu / rows[0][1]:.2f}x |")
        start_folder = root / "start"
        photo_folder(start_folder, args.start_files)
        lazy = time_to_first_batch(start_folder, "lazy")
        full = time_to_first_batch(start_folder, "full")
        print(f"\nfirst batch of 8 crops from a folder of {args.start_files:,} JPEGs")
        print("| start | seconds | / baseline |")
        print("|---|---|---|")
        print(f"| every file decoded first (check='full', baseline) | {full:.2f} | 1.000x |")
        print(f"| lazy (training now) | {lazy:.2f} | {lazy / full:.4f}x |")
        print(f"\n(one run each; the full check decoded {args.start_files / full:.1f} files/s)")


if __name__ == "__main__":
    main()
