"""Peak memory of tiled and untiled decoding, a child each; backs docs/performance.md#memory-of-tiled-and-untiled-decoding.

Peak memory of tiled vs untiled decoding, one child process per configuration.

torch allocates outside Python's allocator, so ``tracemalloc`` sees nothing; the peak resident set
size of a fresh process does. Each configuration runs in its own child (``--child``), and the
parent reads that child's ``ru_maxrss`` from ``os.wait4``. A child that builds the model and the
latent but decodes nothing gives the baseline (interpreter, torch, weights), reported beside.
``+previous`` rows patch the model back to NCHW activations and strided attention tokens
(``_patches.previous``): CPU SDPA then takes its math kernel,
which materialises the ``HW x HW`` scores, instead of its flash kernel.

The model is the SD layout scaled for a CPU (``--channels 64 128 256 256``, random weights);
``decode`` of a latent ``(1, 4, size/8, size/8)`` under ``torch.no_grad()``, tiles of
``--tile`` px with the default overlap.

    python benchmarks/memory.py --quick      # 1024 px only
    python benchmarks/memory.py              # 1024 and 2048 px (minutes: untiled 2048 is slow)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _timing import machine, table


MODES = ("untiled", "tiled", "untiled+previous", "tiled+previous")


def child(args) -> None:
    import torch

    from _patches import previous

    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=tuple(args.channels), layers_per_block=args.layers, log_scale=None if args.head == "none" else args.head)
    model = AutoencoderKL(config).eval()
    f = config.downsample_factor
    z = torch.randn(1, config.latent_channels, args.size // f, args.size // f)
    if args.mode.endswith("+previous"):
        previous(model)
    if args.mode.startswith("tiled"):
        model.enable_tiling(tile_sample_size=args.tile)
    if args.mode != "baseline":
        with torch.no_grad():
            out = model.decode(z)
        assert out.mean.shape[-1] == args.size


def math_attention_gib(args, size: int) -> float:
    """Memory of the mid-block's ``HW x HW`` float32 scores and softmax when SDPA takes its math kernel."""
    tokens = (size // 2 ** (len(args.channels) - 1)) ** 2
    return 2 * tokens**2 * 4 / 2**30


def run_child(args, size: int, mode: str) -> tuple[float, float]:
    """Peak RSS in MiB and wall seconds of one child."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size), "--mode", mode,
           "--tile", str(args.tile), "--layers", str(args.layers), "--channels", *map(str, args.channels)]
    cmd += ["--head", args.head]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    parser.add_argument("--head", choices=["none", "pixel"], default="pixel", help="decoder log-scale head")
    parser.add_argument(
        "--max-attention-gib", type=float, default=4.0,
        help="skip +previous runs whose math-kernel attention would exceed this (2048 px: ~32 GiB)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true", help="1024 px only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["baseline", *MODES], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.sizes = [1024]
    print(f"# peak RSS of decode, channels {tuple(args.channels)}, tiles of {args.tile} px, float32, batch 1")
    print(f"# {machine()}")
    rows = []
    for size in args.sizes:
        base, _ = run_child(args, size, "baseline")
        peaks = {}
        for mode in args.modes:
            need = math_attention_gib(args, size if mode.startswith("untiled") else min(size, args.tile))
            if mode.endswith("+previous") and need > args.max_attention_gib:
                rows.append([str(size), mode, "skipped", f"its attention matrices alone need ~{need:.0f} GiB", ""])
                print(f"# {size} px {mode}: skipped, ~{need:.0f} GiB of attention matrices", flush=True)
                continue
            peaks[mode], seconds = run_child(args, size, mode)
            rows.append([str(size), mode, f"{peaks[mode]:.0f}", f"{peaks[mode] - base:.0f}", f"{seconds:.0f}"])
            print(table(["px", "decode", "peak RSS MiB", "above baseline MiB", "wall s"], rows[-1:]).splitlines()[-1], flush=True)
        rows.append([str(size), "baseline (no decode)", f"{base:.0f}", "0", ""])
        if "untiled" in peaks and "tiled" in peaks:
            print(f"# {size} px: tiled / untiled peak above baseline = {(peaks['tiled'] - base) / (peaks['untiled'] - base):.2f}")
    print()
    print(table(["px", "decode", "peak RSS MiB", "above baseline MiB", "wall s"], rows))


if __name__ == "__main__":
    main()
