"""A training step against diffusers + Stable Diffusion's loss; backs docs/performance.md#training-steps, #h100, #h200.

A training step in images/s: hetvae (model + objective) against diffusers + Stable Diffusion's loss.

The baseline is what a fine-tuner runs without hetvae: ``diffusers.AutoencoderKL`` and the
generator half of SD's ``LPIPSWithDiscriminator`` (before ``disc_start``), written out here::

    rec  = |x - x_rec| + perceptual_weight * lpips(x, x_rec)      # lpips: the `lpips` package
    nll  = rec / exp(logvar) + logvar                            # one learnable scalar
    loss = sum(nll) / B + kl_weight * sum(KL) / B

against hetvae's ``AutoencoderKL`` loaded from the same weights with ``AutoencoderObjective``
(``perceptual_mode="sd"``, hetvae's LPIPS), with one global log-scale (the same loss) and with the
per-pixel head. Each step: sampled posterior, decode, loss, backward, AdamW. Random VGG weights on
both sides (nothing is downloaded), so the LPIPS value is not meaningful, its cost is.

On a GPU (``--device cuda``, default when one is present) it runs docs/performance.md's GPU figure: 256 px,
bf16 autocast, the SD VAE's channels ``(128, 256, 512, 512)``. On a CPU pass a small setting:

    python benchmarks/step_vs_diffusers.py                                   # GPU: SD VAE, 256 px, bf16
    python benchmarks/step_vs_diffusers.py --device cpu --channels 32 64 --resolution 64 --batch 2 --precision fp32 --quick
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch

from _timing import compare, machine, table
from autoencoder import diffusers_vae

from hetvae.convert import load_autoencoder
from hetvae.loss import HeteroscedasticNLL
from hetvae.objective import AutoencoderObjective
from hetvae.perceptual import LPIPS

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_lpips():
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=`
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    return model.requires_grad_(False)


def make_steps(args, device: torch.device):
    amp = DTYPES[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type, enabled=False))
    channels = tuple(args.channels)
    vae = diffusers_vae(channels, args.layers)
    with tempfile.TemporaryDirectory() as folder:
        vae.save_pretrained(folder)
        ours = {name: load_autoencoder(folder, log_scale=head).to(device) for name, head in (("global", None), ("pixel", "pixel"))}
    vae.to(device)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # --- diffusers + SD's loss ---
    ref_lpips = reference_lpips().to(device)
    logvar = torch.nn.Parameter(torch.zeros((), device=device))
    ref_opt = torch.optim.AdamW([*vae.parameters(), logvar], lr=1e-5)

    def reference_step():
        ref_opt.zero_grad(set_to_none=True)
        with autocast():
            posterior = vae.encode(x).latent_dist
            x_rec = vae.decode(posterior.sample()).sample
            rec = (x.float() - x_rec.float()).abs()
            if args.perceptual_weight > 0:
                rec = rec + args.perceptual_weight * ref_lpips(x.float(), x_rec.float())
            nll = rec / torch.exp(logvar) + logvar
            loss = nll.sum() / nll.shape[0] + args.kl_weight * posterior.kl().float().sum() / nll.shape[0]
        loss.backward()
        ref_opt.step()
        sync()

    # --- hetvae ---
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS(weights="random") warns that it is not perceptual
        our_lpips = LPIPS(weights="random").to(device)

    def hetvae_step(model, granularity: str):
        nll = HeteroscedasticNLL(granularity).to(device)
        objective = AutoencoderObjective(
            nll=nll, perceptual=our_lpips, perceptual_weight=args.perceptual_weight, kl_weight=args.kl_weight
        )
        opt = torch.optim.AdamW([*model.parameters(), *nll.parameters()], lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                rec, posterior = model(x, sample_posterior=True)
                loss, _ = objective.generator_loss(x, rec, posterior, 0, details=False)
            loss.backward()
            opt.step()
            sync()

        return step

    candidates = {
        "hetvae, global log-scale (same loss)": hetvae_step(ours["global"], "global"),
        "hetvae, per-pixel head": hetvae_step(ours["pixel"], "pixel"),
    }
    return reference_step, candidates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 512, 512])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--perceptual-weight", type=float, default=1.0)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.inner = 3, 1
    device = torch.device(args.device)
    where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}" if device.type == "cuda" else machine()
    print(f"# training step, channels {tuple(args.channels)}, batch {args.batch} x 3 x {args.resolution}^2, "
          f"{args.precision}, LPIPS weight {args.perceptual_weight}, AdamW")
    print(f"# {where}")
    baseline, candidates = make_steps(args, device)
    seconds, ratios = compare(baseline, candidates, rounds=args.rounds, inner=args.inner)
    rows = [["diffusers + SD loss (baseline)", f"{seconds * 1e3:.1f}", f"{args.batch / seconds:.1f}", "1.000x"]]
    for name, ratio in ratios.items():
        rows.append([name, f"{seconds * ratio * 1e3:.1f}", f"{args.batch / (seconds * ratio):.1f}", f"{ratio:.3f}x"])
    print(table(["step", "ms", "images/s", "time / baseline"], rows))


if __name__ == "__main__":
    main()
