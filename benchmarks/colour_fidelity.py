"""How much colour a trained model keeps: flat and textured patches of random colours, reconstructed.

A model that reconstructs new photographs washed out shows it here without any photograph: each
patch is one colour (hue uniform, saturation 0.2-0.8, value 0.25-0.9), flat or with a mild grey
grating on top, 32 px, reconstructed alone (posterior mode). Reported per run:

- colour error: mean absolute error of the patch's mean colour, in 8-bit units (0 = exact);
- chroma kept: RMS chroma (distance from the grey axis) of the reconstructed mean colours over that
  of the inputs (1 = all of it, 0 = a grey reconstruction).

The patches are synthetic, so this can steer a recipe without touching held-out photographs.

    python benchmarks/colour_fidelity.py runs/tiny runs/tiny-global
"""

from __future__ import annotations

import argparse
import colorsys

import numpy as np
import torch


def test_colours(n: int = 48, seed: int = 123) -> torch.Tensor:
    """``(n, 3)`` colours on the [-1, 1] scale, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    rgb = [colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.9)) for _ in range(n)]
    return torch.tensor(rgb, dtype=torch.float32) * 2 - 1


def patches(colours: torch.Tensor, size: int = 32, textured: bool = False) -> torch.Tensor:
    """``(n, 3, size, size)`` patches of ``colours``; ``textured`` adds a grey grating of amplitude
    0.08 (the patch's mean colour is unchanged to within the grating's residual)."""
    x = colours[:, :, None, None].expand(-1, 3, size, size).clone()
    if textured:
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
        x = x + 0.08 * torch.sin(0.7 * xx + 0.3 * yy)
    return x


def _chroma(colours: torch.Tensor) -> torch.Tensor:
    return (colours - colours.mean(1, keepdim=True)).pow(2).mean().sqrt()


@torch.no_grad()
def colour_fidelity(predictor, x: torch.Tensor) -> dict[str, float]:
    """``{"colour_error": 8-bit units, "chroma_kept": ratio}`` of ``predictor.predict(image).mean``
    over the patches ``x`` (``(n, 3, H, W)``, one image at a time)."""
    target = x.mean((2, 3))
    mean = torch.cat([predictor.predict(image).mean.mean((2, 3)) for image in x])
    return {
        "colour_error": float((mean - target).abs().mean() * 127.5),
        "chroma_kept": float(_chroma(mean) / _chroma(target)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or checkpoints (anything hetvae eval --checkpoint takes)")
    parser.add_argument("--colours", type=int, default=48, help="number of random colours (default 48)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the colours (default 123)")
    args = parser.parse_args(argv)

    from hetvae.evaluate import load_predictor

    colours = test_colours(args.colours, args.seed)
    print("| run | colour error, flat (8-bit) | chroma kept, flat | colour error, textured | chroma kept, textured |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        predictor = load_predictor(run)
        flat = colour_fidelity(predictor, patches(colours))
        textured = colour_fidelity(predictor, patches(colours, textured=True))
        print(f"| {run} | {flat['colour_error']:.1f} | {flat['chroma_kept']:.2f} | "
              f"{textured['colour_error']:.1f} | {textured['chroma_kept']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
