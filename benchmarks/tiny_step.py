"""A shipped config's step against the same with overrides; backs docs/performance.md#the-shipped-configs-step-and-runs.

A shipped config's training step (tiny.yaml by default), as a ratio to the same step with other settings.

Times ``hetvae.train.Trainer._train_step`` (forward, loss, backward, both gradient clips, AdamW, EMA)
on a fixed batch of the config's shape (``train.batch_size`` crops of ``data.resolution`` px, or
with ``--final`` the last phase's batch of ``train.final_resolution`` px crops). Each candidate is
the config with ``--set``-style overrides. For tiny.yaml the defaults are the channel layout
(32, 64, 64: the full-resolution level then receives 64 channels and
upsamples them with a 64 -> 64 convolution at full resolution) and its global-scale twin (what
the per-pixel head costs); another ``--config`` needs its ``--candidate``.

    python benchmarks/tiny_step.py
    python benchmarks/tiny_step.py --final --candidate "head 16, 1 layer:log_scale.head_channels=16;log_scale.head_layers=1"
    python benchmarks/tiny_step.py --config pixel.yaml --candidate "(32, 64, 128):model.block_out_channels=[32,64,128]"
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from _timing import compare, machine, table
from train_step import CONFIGS, make_step

from hetvae.config import load_config
from hetvae.config import final_batch_size

DEFAULT_CANDIDATES = (
    "channels (32, 64, 64), as before:model.block_out_channels=[32,64,64]",
    "global scale:log_scale.granularity=global",
)


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.rpartition(":")
    if not sep or not name or not overrides:
        raise SystemExit(f"--candidate {text!r}: expected 'NAME:key=value[;key=value...]'")
    return name, overrides.split(";")


def step_shape(cfg, final: bool) -> tuple[int, int]:
    """(crops, px) of one step: the main phase's, or the final phase's as the Trainer sizes it."""
    if not final:
        return cfg.train.batch_size, cfg.data.resolution
    return final_batch_size(cfg), cfg.train.final_resolution


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.yaml", help="a file under configs/ (default: tiny.yaml)")
    parser.add_argument("--final", action="store_true", help="time the last phase's batch (train.final_resolution crops)")
    parser.add_argument("--candidate", action="append", default=None,
                        help="NAME:key=value[;key=value...] (repeatable; tiny.yaml's default: the previous channels, global)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.candidate is None and args.config != "tiny.yaml":
        parser.error(f"--config {args.config}: give at least one --candidate (the defaults are tiny.yaml's)")
    candidates = [parse_candidate(c) for c in (args.candidate or DEFAULT_CANDIDATES)]
    if not (CONFIGS / args.config).is_file():
        parser.error(f"--config {args.config}: no such file in {CONFIGS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("hetvae").setLevel(logging.WARNING)
    cfg = load_config(CONFIGS / args.config)
    if args.final and not cfg.train.final_steps:
        parser.error(f"--final: {args.config} has no final phase (train.final_steps is 0)")
    batch, resolution = step_shape(cfg, args.final)
    # the crops' size and count are the step's shape; warm-up and dead-leaves crops are not timed
    shape = [f"train.batch_size={batch}", f"data.resolution={resolution}", "train.warmup_steps=0", "data.procedural=0.0"]
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"# training step: configs/{args.config}, batch {batch} x 3 x {resolution}^2, {cfg.train.precision}")
    print(f"# {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = make_step(args.config, shape, x, f"{tmp}/base")
        steps = {name: make_step(args.config, shape + overrides, x, f"{tmp}/{i}")
                 for i, (name, overrides) in enumerate(candidates)}
        seconds, ratios = compare(base, steps, rounds=args.rounds, inner=args.inner)
    rows = [[f"{args.config} (baseline)", f"{seconds * 1e3:.0f}", "1.000x"]]
    rows += [[name, "", f"{ratio:.3f}x"] for name, ratio in ratios.items()]
    print(table(["step", "ms", f"time / {args.config}"], rows))


if __name__ == "__main__":
    main()
