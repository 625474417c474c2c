"""Dead-leaves rendering time against an earlier renderer, identical images; backs docs/performance.md#data-and-optimiser.

Rendering the procedural training images: ``hetvae.procedural.dead_leaves`` against the renderer
of an earlier commit (default: 17af25e, the original renderer), loaded from git.

A training dataset renders a pool of 64 dead-leaves images of twice the crop side on first use:
64 px for ``configs/tiny.yaml``'s 32 px crops, 256 px for its 128 px final phase
(``train.final_resolution``). Both renderers must draw the very same images from the same
generator state (checked before timing: the training data of every documented run depends on it).
One process, rounds alternating between the two, CPU time.

    python benchmarks/dead_leaves.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import compare, machine, table

from hetvae.procedural import dead_leaves

REPO = Path(__file__).resolve().parent.parent


def load_renderer(rev: str):
    """``dead_leaves`` as ``hetvae/procedural.py`` was at git revision ``rev``."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:hetvae/procedural.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        sys.exit(f"cannot read hetvae/procedural.py at revision {rev!r} from the git history of {REPO}: {detail}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "procedural_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("procedural_baseline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.dead_leaves


def renderer(fn, size: int):
    """A call that renders the next image of a fixed sequence of generator states."""
    counter = iter(range(10**9))
    return lambda: fn(size, np.random.default_rng((size, next(counter))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="17af25e", help="git revision of the baseline renderer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 image")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.inner = 2, 1
    old = load_renderer(args.baseline)
    for size in args.sizes:
        for k in range(4):
            a, b = old(size, np.random.default_rng((7, k))), dead_leaves(size, np.random.default_rng((7, k)))
            if not np.array_equal(a, b):
                sys.exit(f"dead_leaves({size}) differs from revision {args.baseline}'s for generator state (7, {k})")
    print(f"# dead_leaves(size), baseline: revision {args.baseline}; {machine()}")
    rows = []
    for size in args.sizes:
        seconds, ratios = compare(renderer(old, size), {"now": renderer(dead_leaves, size)},
                                  rounds=args.rounds, inner=args.inner, warmup=1, clock="cpu")
        rows.append([f"{size} px", f"{seconds * 1e3:.0f}", f"{seconds * ratios['now'] * 1e3:.0f}", f"{ratios['now']:.2f}x"])
    print(table(["image", "baseline ms", "now ms", "time / baseline"], rows))


if __name__ == "__main__":
    main()
