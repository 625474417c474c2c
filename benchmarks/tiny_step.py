"""tiny.yaml's training step as shipped, as a ratio to the same step with other settings.

Times ``hetvae.train.Trainer._train_step`` (forward, loss, backward, both gradient clips, AdamW, EMA)
on a fixed batch of tiny.yaml's shape (16 crops of 32 px, or with ``--final`` one 128 px crop, the
last phase's batch). Each candidate is tiny.yaml with ``--set``-style overrides; the defaults are
the channel layout it shipped with before (32, 64, 64: the full-resolution level then receives 64
channels and upsamples them with a 64 -> 64 convolution at full resolution) and its global-scale
twin (what the per-pixel head costs).

    python benchmarks/tiny_step.py
    python benchmarks/tiny_step.py --final --candidate "head 16, 1 layer:log_scale.head_channels=16;log_scale.head_layers=1"
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from _timing import compare, machine, table
from train_step import make_step

DEFAULT_CANDIDATES = (
    "channels (32, 64, 64), as before:model.block_out_channels=[32,64,64]",
    "global scale:log_scale.granularity=global",
)


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.rpartition(":")
    if not sep or not name or not overrides:
        raise SystemExit(f"--candidate {text!r}: expected 'NAME:key=value[;key=value...]'")
    return name, overrides.split(";")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--final", action="store_true", help="time the last phase's batch (one 128 px crop)")
    parser.add_argument("--candidate", action="append", default=None,
                        help="NAME:key=value[;key=value...] (repeatable; default: the previous channels, global)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    candidates = [parse_candidate(c) for c in (args.candidate or DEFAULT_CANDIDATES)]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("hetvae").setLevel(logging.WARNING)
    batch, resolution = (1, 128) if args.final else (16, 32)
    # the crops' size and count are the step's shape; warm-up and dead-leaves crops are not timed
    shape = [f"train.batch_size={batch}", f"data.resolution={resolution}", "train.warmup_steps=0", "data.procedural=0.0"]
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"# training step: configs/tiny.yaml, batch {batch} x 3 x {resolution}^2, fp32")
    print(f"# {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = make_step("tiny.yaml", shape, x, f"{tmp}/base")
        steps = {name: make_step("tiny.yaml", shape + overrides, x, f"{tmp}/{i}")
                 for i, (name, overrides) in enumerate(candidates)}
        seconds, ratios = compare(base, steps, rounds=args.rounds, inner=args.inner)
    rows = [["tiny.yaml (baseline)", f"{seconds * 1e3:.0f}", "1.000x"]]
    rows += [[name, "", f"{ratio:.3f}x"] for name, ratio in ratios.items()]
    print(table(["step", "ms", "time / tiny.yaml"], rows))


if __name__ == "__main__":
    main()
