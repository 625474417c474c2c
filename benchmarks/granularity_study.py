"""The granularity study: global vs channel vs per-pixel log-scales on photographs never trained on.

Trains each variant from the same base config (same steps, data and architecture; only the
``log_scale`` section differs), with several seeds, evaluates every run on held-out colour
photographs (whole images) and writes ``docs/results.md``: the table as mean +- standard deviation
over seeds, each seed's numbers, a reliability diagram, a sparsification plot and one uncertainty
panel per variant. Hand-written discussion, if any, is read from
``benchmarks/granularity_notes.md`` and appended, so re-running keeps it.

    python benchmarks/granularity_study.py                                  # all variants, seeds 0 1 2
    python benchmarks/granularity_study.py --variants global pixel --seeds 0
    python benchmarks/granularity_study.py --images ~/heldout-photos --reuse  # evaluate finished runs only

Training is the expensive part; to use both cores of a 2-core machine run two processes on
disjoint variants or seeds (``OMP_NUM_THREADS=1``), then one with ``--reuse`` to write the report.

``--images`` evaluates on a folder of your own colour photographs (default: the project's held-out
split, ``hetvae.data.sample_images("test")``). ``benchmarks/heldout_photos.py`` assembles six
everyday colour photographs that ship inside other Python packages, none of which the project
trains on.

Variants (the base config with these ``log_scale`` settings; pixel-head-lr also sets one ``train`` key):

    global                 one learned scalar (SD's logvar)
    channel                one learned scale per colour channel
    pixel                  the shipped per-pixel recipe: faithful NLL, 2-layer head on detached
                           decoder features and the mean output
    pixel-head-lr          the same, with the head's layers at 4x the lr (train.head_lr=2e-3)
    pixel-shared-features  the same head, not detached: the head's NLL also shapes the decoder
    pixel-1conv-faithful   faithful, but the original single 3x3 conv head on detached features
    pixel-beta0.5          single conv head on shared features, beta-NLL 0.5 (the previous demo)
    pixel-nll              single conv head on shared features, plain NLL (beta 0)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from hetvae.config import load_config
from hetvae.evaluate import Comparison, compare, load_images, load_predictor
from hetvae.train import train
from hetvae.viz import save_reliability_diagram, save_sparsification_plot, save_uncertainty_panel

_HEAD_1CONV = ["log_scale.head_layers=0", "log_scale.head_sees_mean=false"]
_HEAD_DEEP = ["log_scale.head_layers=2", "log_scale.head_sees_mean=true"]
VARIANTS: dict[str, list[str]] = {
    "global": ["log_scale.granularity=global", "log_scale.beta=0.0", "log_scale.faithful=false"],
    "channel": ["log_scale.granularity=channel", "log_scale.beta=0.0", "log_scale.faithful=false"],
    "pixel": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.faithful=true",
              "log_scale.detach_features=true", *_HEAD_DEEP],
    "pixel-head-lr": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.faithful=true",
                      "log_scale.detach_features=true", *_HEAD_DEEP, "train.head_lr=2e-3"],
    "pixel-shared-features": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.faithful=true",
                              "log_scale.detach_features=false", *_HEAD_DEEP],
    "pixel-1conv-faithful": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.faithful=true",
                             "log_scale.detach_features=true", *_HEAD_1CONV],
    "pixel-beta0.5": ["log_scale.granularity=pixel", "log_scale.beta=0.5", "log_scale.faithful=false",
                      "log_scale.detach_features=false", *_HEAD_1CONV],
    "pixel-nll": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.faithful=false",
                  "log_scale.detach_features=false", *_HEAD_1CONV],
}
METRICS = (("psnr", "PSNR (dB)", 2), ("nll_bpd", "bits/dim", 3), ("coverage_50", "coverage 50%", 3),
           ("coverage_90", "coverage 90%", 3), ("calibration_error", "calib. error", 3),
           ("spearman", "Spearman", 3), ("ause", "AUSE", 3))
PANEL_SIZE = 256  # the panel shows a centre crop of the first evaluation image


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summary_table(per_seed: dict[str, dict[int, dict]]) -> str:
    """Markdown table: one row per variant, each metric as mean +- std over its seeds."""
    head = "| variant | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for name, runs in per_seed.items():
        cells = []
        for key, _, digits in METRICS:
            stat = _mean_std([r[key] for r in runs.values()])
            cells.append("n/a" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _observations(per_seed: dict[str, dict[int, dict]]) -> list[str]:
    """Plain statements read off the table (no interpretation): differences to the global scale."""
    if "global" not in per_seed:
        return []
    means = {n: {k: _mean_std([r[k] for r in runs.values()]) for k, _, _ in METRICS} for n, runs in per_seed.items()}
    base = means["global"]
    out = []
    for name, m in means.items():
        if name == "global":
            continue
        rho = "n/a" if m["spearman"] is None else f"{m['spearman'][0]:.3f}"
        out.append(
            f"- **{name}** vs global: bits/dim {m['nll_bpd'][0] - base['nll_bpd'][0]:+.3f}, "
            f"PSNR {m['psnr'][0] - base['psnr'][0]:+.2f} dB, Spearman {rho}, 90% coverage "
            f"{m['coverage_90'][0]:.3f} (global {base['coverage_90'][0]:.3f}), calibration error "
            f"{m['calibration_error'][0]:.3f} (global {base['calibration_error'][0]:.3f})."
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="base config (default: configs/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of the runs")
    parser.add_argument("--images", default=None, help="evaluation folder (default: the held-out sample split)")
    parser.add_argument("--out", default="runs/study", help="folder of the runs (OUT/VARIANT/seedN)")
    parser.add_argument("--docs", default="docs", help="where results.md and results/*.png go")
    parser.add_argument("--reuse", action="store_true", help="do not train a run that has a model")
    parser.add_argument("--train-only", action="store_true", help="train, do not evaluate or write docs")
    parser.add_argument("--eval-only", action="store_true",
                        help="train nothing; evaluate the runs of --seeds that exist (variants may have fewer seeds)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)

    out, docs = Path(args.out), Path(args.docs)
    base_overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    wall: dict[str, list[float]] = {}
    for name in [] if args.eval_only else args.variants:
        for seed in args.seeds:
            run = out / name / f"seed{seed}"
            if args.reuse and (run / "model.safetensors").is_file():
                print(f"[{name} seed {seed}] reusing {run}")
                continue
            overrides = base_overrides + VARIANTS[name] + [f"train.seed={seed}", f"out_dir={run}", "train.resume=never"]
            cfg = load_config(args.config, overrides)
            print(f"[{name} seed {seed}] training {cfg.train.steps} steps -> {run}", flush=True)
            start = time.perf_counter()
            train(cfg, progress=False)
            wall.setdefault(name, []).append(time.perf_counter() - start)
            print(f"[{name} seed {seed}] done in {wall[name][-1]:.0f} s", flush=True)
    if args.train_only:
        return 0

    names, images = map(list, zip(*load_images(args.images)))
    per_seed: dict[str, dict[int, dict]] = {}
    first = {}
    for name in args.variants:
        seeds = [s for s in args.seeds if (out / name / f"seed{s}" / "model.safetensors").is_file()]
        if not seeds:
            raise SystemExit(f"no finished run of {name} under {out / name} for seeds {args.seeds}")
        predictors = {seed: load_predictor(out / name / f"seed{seed}") for seed in seeds}
        comparison = compare(predictors, images)
        per_seed[name] = comparison.results
        first[name] = (predictors[seeds[0]], comparison.reliability[seeds[0]], comparison.sparsification[seeds[0]])
        print(f"[{name}] evaluated", flush=True)

    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    save_reliability_diagram(figures / "reliability.png", {n: f[1] for n, f in first.items()})
    save_sparsification_plot(figures / "sparsification.png", {n: f[2] for n, f in first.items()})
    image = images[0]
    h, w = min(PANEL_SIZE, image.shape[1]), min(PANEL_SIZE, image.shape[2])
    y0, x0 = (image.shape[1] - h) // 2 // 8 * 8, (image.shape[2] - w) // 2 // 8 * 8
    crop = image[:, y0 : y0 + h, x0 : x0 + w]
    for name, (predictor, _, _) in first.items():
        p = predictor.predict(crop)
        save_uncertainty_panel(figures / f"panel_{name}.png", p.target, p.mean, p.log_scale, title=name,
                               standardized=True)
    (figures / "results.json").write_text(json.dumps({n: {str(s): r for s, r in runs.items()}
                                                      for n, runs in per_seed.items()}, indent=2) + "\n")

    cfg = load_config(args.config, base_overrides)
    source = f"the folder `{args.images}`" if args.images else "the held-out `test` split of the sample photographs"
    lines = [
        "# Results: the granularity study",
        "",
        f"Generated by `python benchmarks/granularity_study.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip()
        + ".",
        "",
        f"- base config: `{args.config}` ({list(cfg.model.block_out_channels)} channels, "
        f"{len(cfg.model.block_out_channels) - 1} down-sampling levels, {cfg.model.latent_channels} latent channels), "
        f"{cfg.train.steps} steps of batch {cfg.train.batch_size} at {cfg.data.resolution} px"
        + (f" (the last {cfg.train.final_steps} on {cfg.train.final_resolution} px crops)" if cfg.train.final_steps else "")
        + f"; seeds {args.seeds}",
        "- training data: the `train` split of the sample photographs plus procedural dead-leaves images, "
        "with the config's augmentations (docs/config.md)",
        f"- evaluation: {source}, whole images ({', '.join(names)}); every element of every image pooled; "
        "posterior mode; EMA weights when the config keeps an EMA",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    ]
    if wall:
        lines.append("- training wall time per run: " + ", ".join(
            f"{k} {sum(v) / len(v):.0f} s" for k, v in wall.items()))
    lines += [
        "",
        "Metrics (docs/math.md, hetvae/metrics.py): PSNR of the mean; bits/dim of the 8-bit images under the "
        "discretized predicted distribution (lower is better); coverage of the central 50% / 90% intervals "
        "(calibrated = 0.5 / 0.9); calibration error = mean |coverage(p) - p| over p = 0.1..0.9; Spearman "
        "correlation of predicted scale and absolute error (n/a for one global scale); AUSE = area between the "
        "sparsification curve by predicted scale and the oracle's (0 = perfect ranking). Mean ± standard "
        "deviation over the seeds.",
        "",
        summary_table(per_seed),
        "## Observations (read off the table)",
        "",
        *_observations(per_seed),
        "",
        "## Every run",
        "",
    ]
    for name, runs in per_seed.items():
        rows = {f"{name} seed {s}": r for s, r in runs.items()}
        lines.append(Comparison(rows, {}, {}).markdown())
    lines += [
        "## Figures",
        "",
        f"Reliability diagram (observed vs nominal coverage) and sparsification curves, seed {args.seeds[0]}:",
        "",
        "![reliability](results/reliability.png)",
        "![sparsification](results/sparsification.png)",
        "",
        f"Uncertainty panels on a held-out crop ({names[0]}, {h}x{w} px at ({y0}, {x0})), seed {args.seeds[0]}:",
        "",
        *[f"![{name}](results/panel_{name}.png)" for name in first],
        "",
    ]
    notes = Path(__file__).with_name("granularity_notes.md")
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text("\n".join(lines))
    print(summary_table(per_seed))
    print(f"wrote {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
