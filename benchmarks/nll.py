"""NLL forward+backward time as a multiple of F.l1_loss's; backs docs/performance.md#the-nll.

NLL forward+backward time as a multiple of ``F.l1_loss`` forward+backward on the same tensors.

For each family, granularity and beta, three things are timed, interleaved in one process:
``F.l1_loss(mean, target)`` and its gradient (the baseline), then ``HeteroscedasticNLL`` end to
end (head, soft clamp, loss, gradients of the mean and the log-scale) on the eager reference path
(``HETVAE_FUSED=0``), the fused path without ``torch.compile`` (``HETVAE_FUSED=eager``) and with it
(``HETVAE_FUSED=compile``; compiled once per configuration before timing). The log-scale map is drawn inside the soft clamp's
identity band, as a trained head's usually is (``--outside`` puts part of it beyond, which takes
the head's eager clamp).

    python benchmarks/nll.py            # (8, 3, 256, 256), float32
    python benchmarks/nll.py --quick    # fewer rounds, under a minute
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare, machine, table  # noqa: E402

from hetvae.loss import HeteroscedasticNLL  # noqa: E402

# granularity name in the table -> (HeteroscedasticNLL granularity, channels of the predicted map)
CASES = {"global": ("global", None), "channel": ("channel", None), "pixel": ("pixel", 3), "pixel-shared": ("pixel", 1)}


COLUMNS = ("eager", "fused", "compiled")
HEADER = ["family", "granularity", "beta", "l1 ms", "eager reference", "fused (no compile)", "fused + compile"]


def _with_mode(value: str, fn):
    def run():
        os.environ["HETVAE_FUSED"] = value
        return fn()

    return run


def bench_case(family, name, beta, shape, dtype, rounds, inner, outside, clock):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    mean = (target + 0.1 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_(True)
    granularity, map_channels = CASES[name]
    crit = HeteroscedasticNLL(granularity, family=family, beta=beta).to(dtype)
    if map_channels is None:
        log_scale, params = None, [mean, crit.head.free]
    else:
        raw = torch.randn((shape[0], map_channels) + shape[2:], generator=g, dtype=dtype)
        raw = raw * (3.0 if outside else 0.5) - 2.0
        log_scale = raw.requires_grad_(True)
        params = [mean, log_scale]

    def l1():
        return torch.autograd.grad(F.l1_loss(mean, target), [mean])

    def nll():
        return torch.autograd.grad(crit(target, mean, log_scale=log_scale).loss, params)

    torch._dynamo.reset()  # each case compiles afresh, never against dynamo's recompile limit
    modes = {"eager": "0", "fused": "eager", "compiled": "compile"}
    return compare(l1, {name: _with_mode(value, nll) for name, value in modes.items()}, rounds=rounds, inner=inner, clock=clock)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=(8, 3, 256, 256), metavar=("B", "C", "H", "W"))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--families", nargs="+", default=["laplace", "gaussian"])
    parser.add_argument("--granularities", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--outside", action="store_true", help="log-scale maps partly outside the identity band")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 calls")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.inner = 3, 3
    dtype = getattr(torch, args.dtype)
    print(f"# NLL fwd+bwd / F.l1_loss fwd+bwd, shape {tuple(args.shape)} {args.dtype}, {args.clock} clock")
    print(f"# {machine()}")
    rows = []
    for family in args.families:
        for name in args.granularities:
            for beta in args.betas:
                base, r = bench_case(family, name, beta, tuple(args.shape), dtype, args.rounds, args.inner, args.outside, args.clock)
                rows.append([family, name, f"{beta:g}", f"{base * 1e3:.2f}"] + [f"{r[k]:.2f}x" for k in COLUMNS])
                print(table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(HEADER, rows))
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
