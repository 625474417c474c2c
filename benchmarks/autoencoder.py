"""AutoencoderKL encode/decode time as a ratio to diffusers'; backs docs/performance.md#the-autoencoder-against-diffusers.

hetvae ``AutoencoderKL`` against ``diffusers.AutoencoderKL``: same config, same weights, time ratios.

A diffusers VAE with the Stable Diffusion layout, scaled down for a CPU (``--channels 64 128 256
256``, two blocks per level, 32 groups, mid-block attention), is given non-trivial random weights,
saved to a temporary folder and loaded into hetvae with ``hetvae.convert.load_autoencoder``. The
outputs are checked to agree, then each task is timed as a ratio to diffusers, interleaved in one
process (``_timing.compare``):

* ``encode+decode``: ``decode(encode(x).mode())`` under ``torch.no_grad()``;
* ``fwd+bwd``: the same with gradients, ``backward()`` of the mean squared reconstruction.

Variants of hetvae (``benchmarks/_patches.py``, patched into one model instance; each a ratio to
diffusers in its stock form): ``hetvae`` as shipped; ``no_channels_last``,
``no_contiguous_attention`` and ``no_silu_inplace`` each switch one shipped change off;
``previous`` is the model before the first two; ``channels_last`` converts the weights too
(diffusers is then also shown with ``.to(memory_format=torch.channels_last)``); on request,
``compiled_norm_silu`` (GroupNorm+SiLU through ``torch.compile``) and ``compiled``.

    python benchmarks/autoencoder.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _patches import VARIANTS  # noqa: E402
from _timing import compare, machine, table  # noqa: E402

from hetvae.convert import load_autoencoder  # noqa: E402


def diffusers_vae(channels: tuple[int, ...], layers: int, seed: int = 0):
    """A diffusers VAE with the SD layout (32 groups, 4 latent channels) and non-trivial random weights."""
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers,
        norm_num_groups=32,
        latent_channels=4,
    )
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped tensor would show
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


def make_pair(channels: tuple[int, ...], layers: int, seed: int = 0):
    """A diffusers VAE and the hetvae model loaded from its saved folder, both in eval mode."""
    ref = diffusers_vae(channels, layers, seed).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = load_autoencoder(folder)
    return ref, ours


def check_agreement(ref, ours, x: torch.Tensor, name: str = "hetvae") -> float:
    with torch.no_grad():
        a = ref.decode(ref.encode(x).latent_dist.mode()).sample
        b = ours.decode(ours.encode(_input_for(name, x)).mode()).mean
    err = (a - b).abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"{name} and diffusers disagree by {err:.3g}: the weights did not load the same")
    return err


def _input_for(variant: str, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x


# --- tasks -----------------------------------------------------------------------------------


def diffusers_tasks(model, x):
    def encode_decode():
        with torch.no_grad():
            return model.decode(model.encode(x).latent_dist.mode()).sample

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model.decode(model.encode(x).latent_dist.mode()).sample.square().mean().backward()

    return {"encode+decode": encode_decode, "fwd+bwd": fwd_bwd}


def hetvae_tasks(model, x):
    def encode_decode():
        with torch.no_grad():
            return model.decode(model.encode(x).mode()).mean

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model.decode(model.encode(x).mode()).mean.square().mean().backward()

    return {"encode+decode": encode_decode, "fwd+bwd": fwd_bwd}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", default=["encode+decode", "fwd+bwd"])
    parser.add_argument(
        "--variants", nargs="+", default=["hetvae", *[v for v in VARIANTS if not v.startswith("compiled")]],
        choices=["hetvae", *VARIANTS],
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="128 px, 3 rounds of 1 call")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.rounds, args.inner = [128], 3, 1
    channels = tuple(args.channels)
    # the compiled variants see one shape per block and resolution: more than dynamo's default 8
    torch._dynamo.config.recompile_limit = 64
    print(f"# hetvae / diffusers AutoencoderKL, channels {channels}, {args.layers} blocks per level, float32")
    print(f"# {machine()}, {args.clock} clock")
    rows = []
    for size in args.sizes:
        x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        ref, ours = make_pair(channels, args.layers)
        err = check_agreement(ref, ours, x)
        print(f"# {size} px: max |hetvae - diffusers| = {err:.2e}", flush=True)
        models = {"hetvae": ours}
        for name in args.variants:
            if name != "hetvae":
                models[name] = VARIANTS[name](make_pair(channels, args.layers)[1])
                err = check_agreement(ref, models[name], x, name)
                print(f"# {size} px: max |{name} - diffusers| = {err:.2e}", flush=True)
        ref_cl = None
        if "channels_last" in args.variants:
            ref_cl = make_pair(channels, args.layers)[0].to(memory_format=torch.channels_last)
        for task in args.tasks:
            candidates = {
                name: hetvae_tasks(m, _input_for(name, x))[task]
                for name, m in models.items()
            }
            if ref_cl is not None:
                candidates["diffusers channels_last"] = diffusers_tasks(ref_cl, _input_for("channels_last", x))[task]
            base, ratios = compare(diffusers_tasks(ref, x)[task], candidates, rounds=args.rounds, inner=args.inner, clock=args.clock)
            for name, ratio in ratios.items():
                rows.append([f"{size}", task, f"{base * 1e3:.0f}", name, f"{ratio:.3f}x"])
                print(table(["px", "task", "diffusers ms", "variant", "time / diffusers"], rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(["px", "task", "diffusers ms", "variant", "time / diffusers"], rows))


if __name__ == "__main__":
    main()
