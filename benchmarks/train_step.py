"""A training step with the per-pixel head against one with a global scale; backs docs/performance.md#training-steps.

One training step with the per-pixel log-scale head, as a ratio to the same step with one global scale.

Times ``hetvae.train.Trainer._train_step`` (forward, ``AutoencoderObjective.generator_loss``,
backward, gradient clipping, AdamW, EMA) on a fixed batch, built from the project's granularity
study configs (``configs/global.yaml``, ``configs/pixel.yaml``: the same model, the pixel one adds
the decoder's log-scale head and beta = 0.5) with ``--set``-style overrides for the batch. The
baseline is the global-scale step; candidates are the per-pixel step on the fused NLL (the
default), and on the eager reference (``HETVAE_FUSED=0``), and, with beta 0, the plain per-pixel NLL.

    python benchmarks/train_step.py --quick
    python benchmarks/train_step.py --resolution 256 --batch 4   # the NLL then takes the compiled path
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
from pathlib import Path

import torch

from _timing import compare, machine, table

from hetvae.config import load_config
from hetvae.train import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make_step(config: str, overrides: list[str], batch: torch.Tensor, out_dir: str, fused_mode: str = "auto"):
    cfg = load_config(CONFIGS / config, overrides)
    trainer = Trainer(cfg, out_dir=out_dir, resume=False, progress=False)
    batches = itertools.repeat(batch)

    def step():
        os.environ["HETVAE_FUSED"] = fused_mode
        applied, _ = trainer._train_step(batches)
        assert applied

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step, batch 8")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.inner, args.batch = 3, 1, 8
    logging.getLogger("hetvae").setLevel(logging.WARNING)
    overrides = [f"train.batch_size={args.batch}", f"data.resolution={args.resolution}", "train.warmup_steps=0"]
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"# training step: configs/*.yaml model, batch {args.batch} x 3 x {args.resolution}^2, fp32, AdamW + EMA")
    print(f"# {machine()}, {args.clock} clock")
    with tempfile.TemporaryDirectory() as tmp:
        base = make_step("global.yaml", overrides, x, f"{tmp}/global")
        candidates = {
            "pixel, beta 0.5 (fused NLL)": make_step("pixel.yaml", overrides, x, f"{tmp}/pixel"),
            "pixel, beta 0.5 (eager NLL)": make_step("pixel.yaml", overrides, x, f"{tmp}/pixel-eager", "0"),
            "pixel, beta 0 (fused NLL)": make_step("pixel.yaml", overrides + ["log_scale.beta=0.0"], x, f"{tmp}/pixel0"),
        }
        seconds, ratios = compare(base, candidates, rounds=args.rounds, inner=args.inner, clock=args.clock)
    rows = [["global (baseline)", f"{seconds * 1e3:.0f}", "1.000x"]]
    rows += [[name, "", f"{ratio:.3f}x"] for name, ratio in ratios.items()]
    print(table(["step", "ms", "time / global"], rows))


if __name__ == "__main__":
    main()
