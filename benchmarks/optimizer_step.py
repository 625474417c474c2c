"""AdamW + EMA after backward, the trainer's against PyTorch's CPU defaults; backs docs/performance.md#data-and-optimiser.

The trainer's per-step bookkeeping after backward: AdamW and the EMA update, as the trainer does
them (fused AdamW where the device has the kernel, one multi-tensor EMA lerp) against PyTorch's
defaults on a CPU (AdamW's per-tensor loop, a Python loop of ``lerp_``), on the parameters of the
models of ``configs/tiny.yaml`` and ``configs/pixel.yaml`` with random gradients.

    python benchmarks/optimizer_step.py

A tiny.yaml step (forward and backward) takes about 350 ms on 2 CPU cores, so what this saves per
step is read against that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _timing import compare, machine, table

from hetvae.build import build_model
from hetvae.config import load_config
from hetvae.optim import EMA, adamw

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def bookkeeping(config: str, *, hetvae_way: bool):
    model = build_model(load_config(CONFIGS / config))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    groups = [{"params": params, "weight_decay": 0.01}]
    opt = adamw(groups, lr=1e-4) if hetvae_way else torch.optim.AdamW(groups, lr=1e-4)
    ema = EMA(model, decay=0.99)
    ema_params = list(ema.module.parameters())

    def step():
        opt.step()
        if hetvae_way:
            ema.update(model)
        else:
            with torch.no_grad():
                for e, p in zip(ema_params, model.parameters()):
                    e.lerp_(p.detach(), 0.01)

    return step, len(params), sum(p.numel() for p in params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args(argv)
    print("# AdamW + EMA after one backward: PyTorch's CPU defaults (baseline) against the trainer's")
    print(f"# {machine()}")
    rows = []
    for config in ("tiny.yaml", "pixel.yaml"):
        base, n, numel = bookkeeping(config, hetvae_way=False)
        ours, _, _ = bookkeeping(config, hetvae_way=True)
        seconds, ratios = compare(base, {"trainer": ours}, rounds=args.rounds, inner=args.inner)
        ratio = ratios["trainer"]
        rows.append([config, f"{n} / {numel / 1e6:.2f}M", f"{seconds * 1e3:.1f}", f"{seconds * ratio * 1e3:.1f}", f"{ratio:.3f}x"])
    print(table(["model", "tensors / parameters", "default ms", "trainer ms", "time / default"], rows))


if __name__ == "__main__":
    main()
