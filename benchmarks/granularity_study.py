"""The granularity study: global vs channel vs per-pixel log-scales on photographs never trained on.

Trains each variant from the same base config (same seed, steps, data: the "train" split of
scikit-image's sample photographs), evaluates all of them on the held-out "test" photographs
(whole images), and writes ``docs/results.md`` with the table, a reliability diagram, a
sparsification plot and one uncertainty panel per variant. Hand-written discussion, if any, is
read from ``benchmarks/granularity_notes.md`` and appended, so re-running keeps it.

    python benchmarks/granularity_study.py                       # configs/tiny.yaml, all variants
    python benchmarks/granularity_study.py --steps 2000 --out runs/study-long --docs docs
    python benchmarks/granularity_study.py --reuse               # re-evaluate finished runs only

Variants (everything else is the base config):

    global           one learned scalar (SD's logvar)
    channel          one learned scale per channel
    pixel            decoder head, plain NLL (beta = 0)
    pixel-beta0.5    decoder head, beta-NLL with beta = 0.5 (Seitzer et al. 2022)
    pixel-detached   decoder head on detached features, plain NLL (Stirn et al. 2023)
    pixel-beta1      decoder head, beta = 1: the mean gets exactly the L1 gradient
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hetvae.config import load_config
from hetvae.evaluate import compare, load_images, load_predictor
from hetvae.train import train
from hetvae.viz import save_reliability_diagram, save_sparsification_plot, save_uncertainty_panel

VARIANTS: dict[str, list[str]] = {
    "global": ["log_scale.granularity=global", "log_scale.beta=0.0"],
    "channel": ["log_scale.granularity=channel", "log_scale.beta=0.0"],
    "pixel": ["log_scale.granularity=pixel", "log_scale.beta=0.0"],
    "pixel-beta0.5": ["log_scale.granularity=pixel", "log_scale.beta=0.5"],
    "pixel-detached": ["log_scale.granularity=pixel", "log_scale.beta=0.0", "log_scale.detach_features=true"],
    "pixel-beta1": ["log_scale.granularity=pixel", "log_scale.beta=1.0"],
}
PANEL_IMAGE = "chelsea"
PANEL_CROP = (64, 128, 192, 256)  # y0, x0, height, width: whiskers, fur and a flat background


def _observations(results: dict[str, dict]) -> list[str]:
    """Plain statements read off the table (no interpretation)."""
    out = []
    base = results.get("global")
    if base is None:
        return out
    for name, r in results.items():
        if name == "global":
            continue
        d_bpd = r["nll_bpd"] - base["nll_bpd"]
        d_psnr = r["psnr"] - base["psnr"]
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
        out.append(
            f"- **{name}** vs global: bits/dim {d_bpd:+.3f} ({'lower' if d_bpd < 0 else 'higher'}), "
            f"PSNR {d_psnr:+.2f} dB, Spearman {rho}, calibration error {r['calibration_error']:.3f} "
            f"(global {base['calibration_error']:.3f}), AUSE {r['ause']:.3f} (global {base['ause']:.3f})."
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="base config (default: configs/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default: the config's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/study", help="folder of the runs")
    parser.add_argument("--docs", default="docs", help="where results.md and results/*.png go")
    parser.add_argument("--reuse", action="store_true", help="do not train a variant whose run has a model")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    args = parser.parse_args(argv)

    out, docs = Path(args.out), Path(args.docs)
    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    base_overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])

    wall = {}
    for name in args.variants:
        run = out / name
        if args.reuse and (run / "model.safetensors").is_file():
            print(f"[{name}] reusing {run}")
            continue
        cfg = load_config(args.config, base_overrides + VARIANTS[name] + [f"out_dir={run}", "train.resume=never"])
        print(f"[{name}] training {cfg.train.steps} steps -> {run}", flush=True)
        start = time.perf_counter()
        train(cfg, progress=False)
        wall[name] = time.perf_counter() - start
        print(f"[{name}] done in {wall[name]:.0f} s", flush=True)

    names, images = map(list, zip(*load_images(None)))
    predictors = {name: load_predictor(out / name) for name in args.variants}
    comparison = compare(predictors, images)

    save_reliability_diagram(figures / "reliability.png", comparison.reliability)
    save_sparsification_plot(figures / "sparsification.png", comparison.sparsification)
    y0, x0, h, w = PANEL_CROP
    crop = images[names.index(PANEL_IMAGE)][:, y0 : y0 + h, x0 : x0 + w]
    for name, predictor in predictors.items():
        p = predictor.predict(crop)
        save_uncertainty_panel(figures / f"panel_{name}.png", p.target, p.mean, p.log_scale, title=name)

    cfg = load_config(args.config, base_overrides)
    (figures / "results.json").write_text(json.dumps(comparison.results, indent=2) + "\n")
    notes = Path(__file__).with_name("granularity_notes.md")
    lines = [
        "# Results: the granularity study",
        "",
        f"Generated by `python benchmarks/granularity_study.py {' '.join(argv or [])}`".rstrip() + ".",
        "",
        f"- base config: `{args.config}` ({list(cfg.model.block_out_channels)} channels, "
        f"{len(cfg.model.block_out_channels) - 1} down-sampling levels, {cfg.model.latent_channels} latent channels), "
        f"{cfg.train.steps} steps of batch {cfg.train.batch_size} at {cfg.data.resolution} px, seed {cfg.train.seed}",
        "- training data: the `train` split of scikit-image's sample photographs (random crops)",
        f"- evaluation: the held-out `test` photographs, whole images ({', '.join(names)}); every element of "
        "every image pooled; posterior mode; EMA weights when the config keeps an EMA",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    ]
    if wall:
        lines.append("- training wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    lines += [
        "",
        "Metrics (docs/math.md, hetvae/metrics.py): PSNR of the mean; bits/dim of the 8-bit images under the "
        "discretized predicted distribution (lower is better); coverage of the central 50% / 90% intervals "
        "(calibrated = 0.5 / 0.9); calibration error = mean |coverage(p) - p| over p = 0.1..0.9; Spearman "
        "correlation of predicted scale and absolute error (n/a for one global scale); AUSE = area between the "
        "sparsification curve by predicted scale and the oracle's (0 = perfect ranking).",
        "",
        comparison.markdown(),
        "## Observations (read off the table)",
        "",
        *_observations(comparison.results),
        "",
        "## Figures",
        "",
        "Reliability diagram (observed vs nominal coverage) and sparsification curves:",
        "",
        "![reliability](results/reliability.png)",
        "![sparsification](results/sparsification.png)",
        "",
        f"Uncertainty panels on a held-out crop ({PANEL_IMAGE}, {h}x{w} px at ({y0}, {x0})):",
        "",
        *[f"![{name}](results/panel_{name}.png)" for name in predictors],
        "",
    ]
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    (docs / "results.md").write_text("\n".join(lines))
    print(comparison.markdown())
    print(f"wrote {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
