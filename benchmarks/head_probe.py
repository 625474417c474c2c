"""Fresh per-pixel heads on a frozen trained model: which inputs and shapes rank the real errors?

Loads a finished run (its EMA export), freezes it, and trains several new log-scale heads side by
side on the very same batches the run trained on (its data config and seed: ``steps -
final_steps`` crops of ``data.resolution`` px, then ``final_steps`` of ``final_resolution`` px),
each on the Laplace NLL of the frozen mean's residual, inputs detached. Every head is then put in
the decoder's place and scored by ``hetvae.evaluate.evaluate`` on whole images (a folder of unseen
photographs, and the project's validation split), next to the run's own head. Because the mean is
the same for every row, the rows differ only in the map: a controlled comparison of head designs
that a whole training run per design (and its seed noise) cannot give at this price.

Heads (each: hidden 3x3 conv + SiLU layers, then a 3x3 conv to one map per colour channel,
zero-initialised output at log b = -3)::

    shipped          the run's inputs: the decoder's last features, the mean and the latent
                     (nearest-upsampled), 2 hidden layers of 32 channels
    3 layers         the same inputs, 3 hidden layers
    dilated          2 hidden layers, the second dilated by 2 (a wider field, same cost)
    64 channels      2 hidden layers of 64 channels
    + levels         also every up level's output before the last (nearest-upsampled)

    python benchmarks/head_probe.py RUN HELDOUT_DIR [--json out.json] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetvae.config import load_config
from hetvae.evaluate import evaluate, load_images, load_predictor
from hetvae.functional import laplace_nll
from hetvae.train import Trainer

METRICS = ("psnr", "nll_bpd", "coverage_90", "spearman", "ause")


class DecoderTap:
    """Runs the frozen decoder and keeps what a head could read: last features, mean, latent and
    the up levels' outputs (forward hooks, so the decoder's own code computes them)."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.forward = decoder.forward  # the original, before a probe head replaces it
        self.levels: list[torch.Tensor] = []
        self.normed: torch.Tensor | None = None
        self.active = False  # only while this tap runs the decoder: the run's own forward keeps nothing
        for level in decoder.up:
            level.register_forward_hook(lambda _m, _i, out: self.levels.append(out) if self.active else None)
        decoder.norm_out.register_forward_hook(lambda _m, _i, out: setattr(self, "normed", out) if self.active else None)

    def __call__(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        self.levels, self.active = [], True
        try:
            mean, _ = self.forward(z)
        finally:
            self.active = False
        return dict(z=z, features=F.silu(self.normed), mean=mean, levels=self.levels[:-1])


class ProbeHead(nn.Module):
    def __init__(self, width: int, inputs: tuple[str, ...], layers: int = 2, hidden: int = 32,
                 dilation: int = 1, maps: int = 3) -> None:
        super().__init__()
        self.inputs = inputs
        mods: list[nn.Module] = []
        for i in range(layers):
            d = dilation if i == layers - 1 else 1
            mods += [nn.Conv2d(width if i == 0 else hidden, hidden, 3, padding=d, dilation=d), nn.SiLU()]
        self.trunk = nn.Sequential(*mods)
        self.out = nn.Conv2d(hidden, maps, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, -3.0)

    @staticmethod
    def gather(parts: dict, inputs: tuple[str, ...]) -> torch.Tensor:
        size = parts["mean"].shape[-2:]
        xs = []
        for name in inputs:
            if name in ("features", "mean"):
                xs.append(parts[name])
            elif name == "latent":
                xs.append(F.interpolate(parts["z"], size=size, mode="nearest"))
            elif name == "levels":
                xs += [F.interpolate(h, size=size, mode="nearest") for h in parts["levels"]]
        return torch.cat([x.contiguous() for x in xs], 1)

    def forward(self, parts: dict) -> torch.Tensor:
        return self.out(self.trunk(self.gather(parts, self.inputs)))


SHIPPED = ("features", "mean", "latent")
VARIANTS = {
    "shipped": dict(inputs=SHIPPED),
    "3 layers": dict(inputs=SHIPPED, layers=3),
    "dilated": dict(inputs=SHIPPED, dilation=2),
    "64 channels": dict(inputs=SHIPPED, hidden=64),
    "+ levels": dict(inputs=SHIPPED + ("levels",)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("images", help="folder of unseen photographs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW; constant, then cosine over the large crops")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.getLogger("hetvae").setLevel(logging.WARNING)
    torch.manual_seed(0)

    predictor = load_predictor(args.run, calibrated=False)
    model = predictor.model.eval().requires_grad_(False)
    tap = DecoderTap(model.decoder)
    cfg = load_config(f"{args.run}/config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, out_dir=f"{tmp}/run", resume=False, progress=False)
        final_from = trainer._final_from
        phases = [(trainer._batches_from(0), cfg.train.steps - cfg.train.final_steps if final_from is not None else cfg.train.steps, False)]
        if final_from is not None:
            phases.append((trainer._batches_from(final_from), cfg.train.final_steps, True))
        heads, optimizers = {}, {}
        start = time.perf_counter()
        for batches, steps, cosine in phases:
            for i in range(steps):
                x = next(batches)
                with torch.no_grad():
                    z = model.encode(x).mode()
                    if model.post_quant_conv is not None:
                        z = model.post_quant_conv(z)
                    parts = tap(z)
                if not heads:
                    for name in args.variants:
                        spec = VARIANTS[name]
                        width = ProbeHead.gather(parts, spec["inputs"]).shape[1]
                        heads[name] = ProbeHead(width, **spec)
                        optimizers[name] = torch.optim.AdamW(heads[name].parameters(), lr=args.lr, weight_decay=0.0)
                lr = args.lr * (0.5 * (1 + math.cos(math.pi * i / steps)) if cosine else 1.0)
                for name, head in heads.items():
                    for group in optimizers[name].param_groups:
                        group["lr"] = lr
                    loss = laplace_nll(x, parts["mean"], head(parts)).mean()
                    optimizers[name].zero_grad()
                    loss.backward()
                    optimizers[name].step()
        print(f"# {len(heads)} heads trained on {sum(s for _, s, _ in phases)} batches in {time.perf_counter() - start:.0f} s")

    sets = {"unseen": load_images(args.images), "validation": load_images(None)}
    results = {}

    def score(name):
        results[name] = {s: {k: evaluate(predictor, images)[k] for k in METRICS} for s, images in sets.items()}
        row = "  ".join(f"{s}: PSNR {m['psnr']:.2f} bits/dim {m['nll_bpd']:.3f} cov90 {m['coverage_90']:.3f} "
                        f"Spearman {m['spearman']:.3f} AUSE {m['ause']:.3f}" for s, m in results[name].items())
        print(f"{name:<16} {row}", flush=True)

    score("the run's head")
    for name, head in heads.items():
        head.eval()

        def forward(self, z, head=head):
            parts = tap(z)
            return parts["mean"].contiguous(), head(parts).contiguous()

        model.decoder.forward = types.MethodType(forward, model.decoder)
        with torch.no_grad():
            score(name)
    model.decoder.forward = tap.forward
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
