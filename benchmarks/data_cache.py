"""A training batch from a photo folder with and without the decoded-file cache; backs docs/performance.md#data-and-optimiser.

Loading a training batch from a folder of photographs: the decoded-file cache (``data.cache_mb``)
against decoding the file for every crop (``cache_mb=0``, the behaviour before the cache).

The folder is the embedded default's training photographs written as PNG files (a user's own
``data.path``: fifteen photographs, 300 x 400 to 1411 x 1411), read with ``configs/tiny.yaml``'s data
section (32 px crops, rescale, colour jitter, 30% procedural crops) and batches of 16, as
``hetvae train configs/tiny.yaml --set data.path=FOLDER`` reads them. The embedded default
(in-memory arrays) is shown for reference. One process, rounds alternating between the variants;
the procedural pool is made before timing.

    python benchmarks/data_cache.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from PIL import Image

from _timing import compare, machine, table

from hetvae.config import load_config
from hetvae.data import build_dataset
from hetvae.images import sample_images

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write_photo_folder(folder: str | Path) -> None:
    """The embedded default's training photographs as PNG files in ``folder`` (a user's ``data.path``)."""
    for name, pixels in sample_images("train"):
        Image.fromarray(pixels).save(Path(folder) / f"{name.replace('[', '_').replace(']', '')}.png")


def batch_loader(data, batch: int):
    dataset = build_dataset(data, train=True, seed=0)
    for k in range(dataset.procedural_pool if dataset.procedural > 0 else 0):
        dataset._procedural_image(k)  # the dead-leaves pool is made on first use: not what is timed
    index = iter(range(10**9))

    def load():
        return torch.stack([dataset[next(index) % len(dataset)] for _ in range(batch)])

    return load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 batches")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.inner = 2, 2
    torch.set_num_threads(args.threads)
    data = load_config(CONFIGS / "tiny.yaml").data
    print(f"# a batch of {args.batch} crops, configs/tiny.yaml's data section, {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        write_photo_folder(folder)
        uncached = batch_loader(dataclasses.replace(data, path=folder, cache_mb=0.0), args.batch)
        candidates = {
            f"folder, cache_mb={data.cache_mb:g} (default)": batch_loader(dataclasses.replace(data, path=folder), args.batch),
            "embedded default (in memory)": batch_loader(data, args.batch),
        }
        seconds, ratios = compare(uncached, candidates, rounds=args.rounds, inner=args.inner, warmup=1)
    rows = [["folder, cache_mb=0 (baseline: a decode per crop)", f"{seconds * 1e3:.0f}", "1.000x"]]
    rows += [[name, f"{seconds * ratio * 1e3:.0f}", f"{ratio:.3f}x"] for name, ratio in ratios.items()]
    print(table(["batch from", "ms", "time / baseline"], rows))


if __name__ == "__main__":
    main()
