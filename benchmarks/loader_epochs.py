"""Batches over several epochs: one DataLoader against one per epoch; backs docs/performance.md#data-and-optimiser.

Training batches from a folder with loader workers: one ``DataLoader`` for the whole stream
against a ``DataLoader`` per epoch.

A loader per epoch starts its worker processes again at every epoch boundary, and each new worker
decodes the files it touches again (the decoded-file cache, ``data.cache_mb``, lives in the
worker) and renders its dead-leaves images again. For a folder of a few hundred photographs
(``data.samples_per_epoch`` unset: one crop per photograph) an epoch is a few dozen steps. The
trainer now passes ``(epoch, index)`` keys through one loader (``hetvae.distributed.local_batches``).

The folder is the embedded default's training photographs written as PNG files (fifteen, 300 x 400
to 1411 x 1411), read with configs/tiny.yaml's data section; each timed call draws ``--steps``
batches from a fresh stream (so both sides pay one start), ``--steps-per-epoch`` batches an epoch.
Both sides give the same batches (checked first).

    python benchmarks/loader_epochs.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

from _timing import compare, machine, table
from data_cache import write_photo_folder

from hetvae.config import load_config
from hetvae.data import build_dataset
from hetvae.distributed import local_batches

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def per_epoch_loaders(dataset, batch: int, seed: int, workers: int):
    """The trainer's stream before: a new ``DataLoader`` (and workers) for every epoch."""
    per_epoch = len(dataset) // batch
    for epoch in itertools.count():
        rows = np.random.default_rng((seed, epoch)).permutation(len(dataset))[: per_epoch * batch]
        dataset.set_epoch(epoch)
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=rows.reshape(per_epoch, batch).tolist(), num_workers=workers)


def one_loader(dataset, batch: int, seed: int, workers: int):
    return local_batches(dataset, global_batch=batch, seed=seed, start=0, rank=0, world_size=1, num_workers=workers)


def drawing(make, dataset, batch: int, workers: int, steps: int):
    def draw():
        stream = make(dataset, batch, 0, workers)
        out = [next(stream) for _ in range(steps)]
        stream.close()  # ends the loader's workers, as a finished run does
        return out

    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 epochs of 4 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps_per_epoch, args.steps = 2, 4, 12
    torch.set_num_threads(args.threads)
    data = load_config(CONFIGS / "tiny.yaml").data
    print(
        f"# {args.steps} batches of {args.batch} crops, {args.steps_per_epoch} an epoch, {args.workers} loader workers, "
        f"configs/tiny.yaml's data section on a folder, {machine()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        write_photo_folder(folder)
        cfg = dataclasses.replace(data, path=folder, samples_per_epoch=args.steps_per_epoch * args.batch)
        dataset = build_dataset(cfg, train=True, seed=0)
        old = drawing(per_epoch_loaders, dataset, args.batch, args.workers, args.steps)
        new = drawing(one_loader, dataset, args.batch, args.workers, args.steps)
        if not all(torch.equal(a, b) for a, b in zip(old(), new())):
            raise SystemExit("the two streams give different batches")
        seconds, ratios = compare(old, {"one loader for the stream (now)": new}, rounds=args.rounds, inner=args.inner, warmup=0)
    rows = [["a loader per epoch (baseline: before)", f"{seconds:.2f}", "1.000x"]]
    rows += [[name, f"{seconds * ratio:.2f}", f"{ratio:.3f}x"] for name, ratio in ratios.items()]
    print(table(["stream", "s", "time / baseline"], rows))


if __name__ == "__main__":
    main()
