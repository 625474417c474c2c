"""How far a tiled decode (mean and map) lies from the untiled one; backs docs/performance.md#tiled-against-untiled-output.

How far a tiled decode lies from the untiled one, for the mean and the log-scale map, and seams.

The model is the SD 1.x VAE layout (``AutoencoderConfig()``: channels 128/256/512/512, 2 blocks,
kl-f8) with random weights (seed 0) and a per-pixel head whose output conv gets PyTorch's default
random init instead of its zero init, so the map varies as much as the mean does. The latent is
smooth seeded noise ``(1, 4, size/8, size/8)``; ``decode`` untiled and with
``enable_tiling(tile_sample_size=--tile, overlap=--overlap)``, float32, under ``torch.no_grad()``.

Reported per output (``mean``, ``log_scale``): the max and mean absolute tiled-minus-untiled
difference, the mean one over the untiled output's standard deviation (comparable between the
two), and the seam index: the largest mean absolute step of the difference across a tile border
(where a tile's weight starts or ends) over the median step elsewhere; a cut between tiles shows
as a step at a border, so an index near the values elsewhere (about 1-2) means no seam.

    python benchmarks/tiling.py                    # 512 px, tiles of 256 (about 3 min on 2 cores)
    python benchmarks/tiling.py --size 768 --tile 512
    PYTHONPATH=/path/to/old/checkout python benchmarks/tiling.py   # the same figures for other code
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _timing import machine


def border_steps(size: int, tile: int, overlap: int, factor: int) -> list[int]:
    """Indices of the steps ``d[x+1] - d[x]`` at which a tile's weight starts or ends (output px)."""
    from hetvae.autoencoder import _tile_starts

    starts = _tile_starts(size, tile, tile - overlap)
    return sorted({s * factor - 1 for s in starts[1:]} | {(s + tile) * factor - 1 for s in starts[:-1]})


def steps(d: torch.Tensor) -> torch.Tensor:
    """Mean absolute step across each column boundary, then across each row boundary."""
    return torch.cat([(d[..., 1:] - d[..., :-1]).abs().mean((0, 1, 2)), (d[..., 1:, :] - d[..., :-1, :]).abs().mean((0, 1, 3))])


def compare(tiled: torch.Tensor, whole: torch.Tensor, borders: list[int]) -> dict[str, float]:
    d = (tiled - whole).double()
    g = steps(d)
    n = d.shape[-1] - 1
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[torch.tensor(borders + [n + b for b in borders], dtype=torch.long)] = True
    return {
        "max_abs": d.abs().max().item(),
        "mean_abs": d.abs().mean().item(),
        "mean_abs_over_std": (d.abs().mean() / whole.double().std()).item(),
        "seam_index": (g[mask].max() / g[~mask].median()).item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent size / 8)")
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(log_scale="pixel")).eval()
    model.decoder.log_scale_head.reset_parameters()
    f = model.config.downsample_factor
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.avg_pool2d(torch.randn(1, 4, args.size // f, args.size // f, generator=g), 5, 1, 2) * 3
    with torch.no_grad():
        start = time.perf_counter()
        whole = model.decode(z)
        untiled_s = time.perf_counter() - start
        model.enable_tiling(tile_sample_size=args.tile, overlap=args.overlap)
        start = time.perf_counter()
        tiled = model.decode(z)
        tiled_s = time.perf_counter() - start
    tile = args.tile // f
    borders = border_steps(args.size // f, tile, int(tile * args.overlap), f)
    result = {
        "size": args.size, "tile": args.tile, "overlap": args.overlap, "untiled_s": untiled_s, "tiled_s": tiled_s,
        "mean": compare(tiled.mean, whole.mean, borders),
        "log_scale": compare(tiled.log_scale, whole.log_scale, borders),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(machine())
    print(f"{args.size} px, tiles of {args.tile} px, overlap {args.overlap}: untiled {untiled_s:.0f} s, tiled {tiled_s:.0f} s")
    print(f"{'output':10} {'max |d|':>8} {'mean |d|':>9} {'mean/std':>9} {'seam':>6}")
    for name in ("mean", "log_scale"):
        r = result[name]
        print(f"{name:10} {r['max_abs']:8.3f} {r['mean_abs']:9.4f} {r['mean_abs_over_std']:9.3f} {r['seam_index']:6.2f}")


if __name__ == "__main__":
    main()
