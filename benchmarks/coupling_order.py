"""The six channel orders of the colour coupling, each fitted and scored alike; backs docs/results.md#channel-order.

    python benchmarks/coupling_order.py RUN [RUN ...] --photos ../shared/data/photos/kodak \
        ../shared/data/photos/wikipedia --exclude-shipped --json order.json

Each model reconstructs the FIT photographs (``--fit``; default the calibration set that ships with
hetvae, the one ``hetvae calibrate`` fits on) and the ``--photos`` once, uncalibrated. Then, for each
of the six orders of R, G, B and for no coupling, the same few numbers are fitted on the FIT
photographs by L-BFGS in float64 on the exact discretized NLL
(:func:`hetvae.functional.coupled_discretized_nll`): the ``C (C - 1) / 2 = 3`` global coefficients
of the order (none without coupling) and one log-scale offset per channel, added to the model's
log-scale (its per-pixel map, or its global or channel scale). The model's own scale therefore only
shapes the map, and every row differs from the ``none`` row only by the coupling. Each fit is
iterated until the gradient's norm (of the mean NLL in nats) is below ``--tolerance``; the table
shows it. The fitted likelihood is then scored on the ``--photos`` with ``hetvae eval``'s exact
bits/dim (:func:`hetvae.metrics.nll_bpd`, pooled over every element of every photograph).

A model trained with coupling (a learned global set, or a head with coefficient maps) has its own
coefficients ignored: every order is fitted from zero on its conditional log-scale. The fit uses
``--fit-pixels`` pixels of each FIT photograph drawn at random (``--seed``; 0: all of them): six numbers
from millions of elements, and near the optimum the bits/dim move only with the square of their error.
``--exclude-shipped`` leaves the shipped calibration photographs out of the scored set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hetvae.functional import coupled_discretized_nll, coupling_pairs, discretized_nll
from hetvae.images import calibration_photos, list_images, load_images
from hetvae.metrics import nll_bpd
from hetvae.predictor import iter_predictions, load_predictor

CHANNELS = "RGB"
ORDERS = tuple(itertools.permutations(range(len(CHANNELS))))
"""The six orders, ``(0, 1, 2)`` (R -> G -> B, the default) first."""

Triple = tuple[Tensor, Tensor, Tensor]
"""``(target, mean, log_scale)`` of the same shape ``(1, C, ...)``."""


def letters(order: tuple[int, ...]) -> str:
    return "".join(CHANNELS[c] for c in order)


def coefficient_names(order: tuple[int, ...]) -> list[str]:
    """``a_KJ`` for each coefficient of ``order`` in the storage order: channel K given channel J."""
    return [f"a_{CHANNELS[k]}{CHANNELS[j]}" for k, j in coupling_pairs(len(CHANNELS), order)]


@dataclass
class Fit:
    order: tuple[int, ...] | None
    """The channel order; None: no coupling."""
    coefficients: Tensor
    """``(3,)`` in the storage order of :func:`hetvae.functional.coupling_pairs` (empty without coupling)."""
    offsets: Tensor
    """``(C,)``, added to the model's log-scale of each channel."""
    fit_bpd: float
    grad_norm: float
    iterations: int


def fit_likelihood(data: Triple, order: tuple[int, ...] | None, family: str, tolerance: float = 1e-7,
                   max_rounds: int = 20) -> Fit:
    """The coefficients of ``order`` (none when ``order`` is None) and the per-channel log-scale
    offsets that minimise the mean exact discretized NLL of ``data`` (float64 L-BFGS from zero),
    iterated until the gradient's norm is below ``tolerance`` or ``max_rounds`` L-BFGS runs."""
    target, mean, log_scale = (t.double() for t in data)
    channels = target.shape[1]
    n_coef = len(coupling_pairs(channels)) if order is not None else 0
    theta = torch.zeros(n_coef + channels, dtype=torch.float64, requires_grad=True)
    offset_shape = (1, channels) + (1,) * (target.ndim - 2)

    def objective() -> Tensor:
        s = log_scale + theta[n_coef:].view(offset_shape)
        if order is None:
            return discretized_nll(target, mean, s, family).mean()
        return coupled_discretized_nll(target, mean, s, theta[:n_coef], family, order=order).mean()

    optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=100, history_size=20, tolerance_grad=tolerance / 10,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    grad_norm = float("inf")
    for _ in range(max_rounds):
        optimizer.step(closure)
        loss = closure()
        grad_norm = theta.grad.norm().item()
        if grad_norm < tolerance:
            break
    iterations = optimizer.state[theta]["n_iter"]  # cumulative over the runs
    theta = theta.detach()
    return Fit(order, theta[:n_coef], theta[n_coef:], loss.item() / math.log(2), grad_norm, iterations)


def score(images: list[Triple], fit: Fit, family: str) -> float:
    """Bits/dim of ``images`` under the fitted likelihood, pooled over every element as ``hetvae
    eval`` pools them (:func:`hetvae.metrics.nll_bpd` of each image, weighted by its size)."""
    bits, count = 0.0, 0
    for target, mean, log_scale in images:
        s = log_scale.double() + fit.offsets.view((1, -1) + (1,) * (target.ndim - 2))
        coupling = fit.coefficients if fit.order is not None else None
        bits += nll_bpd(target, mean, s, family, coupling=coupling, order=fit.order) * target.numel()
        count += target.numel()
    return bits / count


def reconstruct(predictor, files: list[Path], pixels: int = 0, generator: torch.Generator | None = None,
                desc: str = "reconstruct") -> list[Triple]:
    """``(target, mean, log_scale)`` of each photograph, uncalibrated, float32 ``(1, C, H * W)``;
    ``pixels`` > 0: only that many of each photograph's pixels, drawn with ``generator``."""
    out = []
    for _, p in iter_predictions(predictor, load_images(files), progress=True, desc=desc):
        triple = tuple(t.reshape(1, t.shape[1], -1) for t in (p.target, p.mean, p.log_scale.expand_as(p.mean)))
        if 0 < pixels < triple[0].shape[-1]:
            keep = torch.randperm(triple[0].shape[-1], generator=generator)[:pixels]
            triple = tuple(t[..., keep] for t in triple)
        out.append(tuple(t.float().contiguous() for t in triple))
    return out


def pooled(images: list[Triple]) -> Triple:
    """The images' elements side by side: one ``(1, C, N)`` triple."""
    return tuple(torch.cat([im[i] for im in images], dim=-1) for i in range(3))


def measure(model: str, fit_files: list[Path], eval_files: list[Path], fit_pixels: int, seed: int,
            tolerance: float) -> dict:
    """Every order and no coupling, fitted on ``fit_files`` and scored on ``eval_files``: a result of :func:`main`'s JSON."""
    predictor = load_predictor(model, calibrated=False)
    channels = predictor.model.config.out_channels
    if channels != len(CHANNELS):
        raise ValueError(f"{model}: the model has {channels} output channels; the orders measured are of R, G, B (3)")
    generator = torch.Generator().manual_seed(seed)
    fit_data = pooled(reconstruct(predictor, fit_files, fit_pixels, generator, desc=f"{Path(model).name} fit"))
    eval_data = reconstruct(predictor, eval_files, desc=f"{Path(model).name} eval")
    family = predictor.family
    fits = []
    for order in (None, *ORDERS):
        fits.append(fit_likelihood(fit_data, order, family, tolerance))
        print(f"{Path(model).name}: fitted {'none' if order is None else letters(order)} "
              f"({fits[-1].iterations} iterations, gradient {fits[-1].grad_norm:.1e})", file=sys.stderr, flush=True)
    scores = [score(eval_data, f, family) for f in fits]
    none, rgb = scores[0], scores[1]
    rows = []
    for f, bpd in zip(fits, scores):
        rows.append({
            "order": "none" if f.order is None else letters(f.order),
            "nll_bpd": bpd,
            "minus_none": bpd - none,
            "minus_rgb": None if f.order is None else bpd - rgb,
            "coefficients": {} if f.order is None else dict(zip(coefficient_names(f.order), f.coefficients.tolist())),
            "offsets": dict(zip(CHANNELS, f.offsets.tolist())),
            "fit_nll_bpd": f.fit_bpd,
            "grad_norm": f.grad_norm,
            "iterations": f.iterations,
            "converged": f.grad_norm < tolerance,
        })
    return {"model": model, "family": family, "granularity": predictor.granularity,
            "own_coupling": predictor.nll.channel_coupling, "fit_images": len(fit_files),
            "eval_images": len(eval_files), "fit_pixels": fit_pixels, "seed": seed, "rows": rows}


def table(result: dict) -> str:
    title = (f"{result['model']} ({result['granularity']} scale, own coupling {result['own_coupling']} ignored; "
             f"fitted on {result['fit_images']} photographs, scored on {result['eval_images']})")
    lines = [title,
             "| order | bits/dim | vs none | vs RGB | coefficients | offsets R, G, B | fit bits/dim | fit grad |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        coef = ", ".join(f"{k} {v:+.3f}" for k, v in r["coefficients"].items()) or "-"
        offsets = ", ".join(f"{v:+.3f}" for v in r["offsets"].values())
        vs_rgb = "-" if r["minus_rgb"] is None else f"{r['minus_rgb']:+.4f}"
        flag = "" if r["converged"] else " (not converged)"
        lines.append(f"| {r['order']} | {r['nll_bpd']:.4f} | {r['minus_none']:+.4f} | {vs_rgb} | {coef} | {offsets} | "
                     f"{r['fit_nll_bpd']:.4f} | {r['grad_norm']:.1e}{flag} |")
    best = min(result["rows"][1:], key=lambda r: r["nll_bpd"])
    lines.append(f"best order {best['order']}: {best['minus_rgb']:+.4f} bits/dim against RGB, "
                 f"{best['minus_none']:+.4f} against no coupling")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="run folders or model files")
    parser.add_argument("--photos", nargs="+", required=True, help="folders (or files) scored, pooled")
    parser.add_argument("--fit", nargs="+", default=None,
                        help="folders (or files) the coefficients and offsets are fitted on "
                             "(default: the calibration photographs that ship with hetvae)")
    parser.add_argument("--exclude-shipped", action="store_true",
                        help="leave the shipped calibration photographs out of the scored ones")
    parser.add_argument("--fit-pixels", type=int, default=65536,
                        help="pixels drawn from each fitted photograph (default 65536; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --fit-pixels (default 0)")
    parser.add_argument("--tolerance", type=float, default=1e-7,
                        help="a fit stops when its gradient's norm is below this (default 1e-7)")
    parser.add_argument("--json", default=None, help="write every result here")
    args = parser.parse_args(argv)
    if args.fit_pixels < 0:
        parser.error(f"--fit-pixels must be >= 0 (0: all), got {args.fit_pixels}")
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be > 0, got {args.tolerance}")
    fit_files = list_images(args.fit) if args.fit else calibration_photos()
    eval_files = list_images(args.photos)
    if args.exclude_shipped:
        shipped = {p.stem for p in calibration_photos()}
        eval_files = [f for f in eval_files if f.stem not in shipped]
    if not eval_files:
        parser.error(f"no photographs to score in {' '.join(args.photos)}"
                     + (" once the shipped calibration set is left out" if args.exclude_shipped else ""))
    print(f"fitting on {len(fit_files)} photographs, scoring {len(eval_files)}", file=sys.stderr)
    results = []
    for model in args.models:
        results.append(measure(model, fit_files, eval_files, args.fit_pixels, args.seed, args.tolerance))
        print(table(results[-1]) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
