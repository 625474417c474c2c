"""The ``hetvae`` command line.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
``_run_<name>(args)`` does the work. ``main()`` wires them together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# name -> (help text, add_arguments(parser), run(args) -> exit code); filled in below the command functions.
_COMMANDS: dict[str, tuple] = {}


# --- checkpoints: info, convert -------------------------------------------------------------


def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="diffusers folder, SD/ldm single file, or hetvae checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run_info(args: argparse.Namespace) -> int:
    import json

    from hetvae.convert import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.path)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = info.config
    if args.json:
        print(json.dumps({
            "path": str(info.path), "format": info.format, "weights_file": str(info.weights_file),
            "config_source": info.config_source, "family": info.family, "config": cfg.to_dict(),
            "num_parameters": info.num_parameters, "log_scale_head": info.has_log_scale_head,
            "head_file": None if info.head_file is None else str(info.head_file),
        }))
        return 0
    head = "no"
    if info.has_log_scale_head:
        head = f"yes, {cfg.head_channels} map(s), " + (f"from {info.head_file}" if info.head_file else "inside the file")
    print(f"path:        {info.path}")
    print(f"format:      {info.format} (config {info.config_source})")
    print(f"weights:     {info.weights_file}")
    print(f"family:      {info.family} (scaling_factor {cfg.scaling_factor}, shift_factor {cfg.shift_factor})")
    print(f"parameters:  {info.num_parameters:,}")
    print(f"log-scale head: {head}")
    print("config:")
    for key, value in cfg.to_dict().items():
        print(f"  {key}: {value}")
    return 0


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="diffusers folder, SD/ldm single file, or hetvae checkpoint")
    parser.add_argument("dst", help="output folder (or a .safetensors file for --to ldm / hetvae)")
    parser.add_argument("--to", required=True, choices=("hetvae", "diffusers", "ldm"), help="output format")
    parser.add_argument("--log-scale", choices=("pixel",), default=None,
                        help="graft a per-pixel log-scale head (zero weights) if the source has none")
    parser.add_argument("--log-scale-init", type=float, default=None, help="bias of a grafted head")
    parser.add_argument("--log-scale-channels", type=int, default=None, help="1 for one shared map")
    parser.add_argument("--scaling-factor", type=float, default=None, help="override the latent scaling factor")
    parser.add_argument("--shift-factor", type=float, default=None, help="override the latent shift factor")
    parser.add_argument("--norm-num-groups", type=int, default=None,
                        help="GroupNorm groups (not visible in single files; 32 assumed)")


def _run_convert(args: argparse.Namespace) -> int:
    from hetvae.convert import CheckpointError, load_autoencoder, save_autoencoder

    names = ("log_scale_init", "log_scale_channels", "scaling_factor", "shift_factor", "norm_num_groups")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        model = load_autoencoder(args.src, log_scale=args.log_scale, **overrides)
        written = save_autoencoder(model, args.dst, format=args.to)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} ({args.to}{', with log-scale head' if model.has_log_scale_head else ''})")
    return 0


_COMMANDS["info"] = ("Show a checkpoint's format, config, parameter count and log-scale head.", _add_info, _run_info)
_COMMANDS["convert"] = ("Convert an autoencoder checkpoint between hetvae, diffusers and ldm formats.", _add_convert, _run_convert)


# --- training: train ------------------------------------------------------------------------


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/; a `base:` key inherits another file)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable; value parsed as YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the run folder (error if there is none)")
    parser.add_argument("--out-dir", default=None, help="run folder (overrides out_dir in the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")


def _run_train(args: argparse.Namespace) -> int:
    import logging

    from hetvae.config import ConfigError, load_config
    from hetvae.train import NonFiniteLossError, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, out_dir=args.out_dir, resume=True if args.resume else None, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, FileExistsError, NonFiniteLossError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.model_file is not None:  # rank 0
        state = "interrupted" if result.interrupted else "done"
        print(f"{state} at step {result.step}: model {result.model_file}, "
              f"uncertainty panels {result.run_dir / 'samples'} (latest.png)")
    return 0


_COMMANDS["train"] = ("Train or fine-tune an autoencoder from a YAML config.", _add_train, _run_train)


# --- uncertainty maps and evaluation: uncertainty, eval, compare ---------------------------

_CHECKPOINT_HELP = "a run folder written by `hetvae train`, or any model checkpoint `hetvae info` reads"


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


def _add_uncertainty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or folders (recursive)")
    parser.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tile", type=int, default=0, metavar="PX",
                        help="decode in tiles of PX pixels (large images on little memory); 0: whole images")


def _run_uncertainty(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from hetvae.evaluate import load_images, load_predictor
    from hetvae.viz import save_scale_map, save_uncertainty_panel

    try:
        predictor = load_predictor(args.checkpoint)
        images = load_images(args.images)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    if args.tile:
        predictor.model.enable_tiling(tile_sample_size=args.tile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in tqdm(images, desc="uncertainty", unit="img"):
        p = predictor.predict(image)
        title = f"{name} ({predictor.granularity} scale, {predictor.family})"
        save_uncertainty_panel(out / f"{name}_panel.png", p.target, p.mean, p.log_scale, title=title, standardized=True)
        save_scale_map(out / f"{name}_scale.png", p.log_scale[0])
        maps = {"input": p.target[0], "mean": p.mean[0], "log_scale": p.log_scale[0], "error": p.error[0]}
        save_file({k: v.contiguous().cpu() for k, v in maps.items()}, str(out / f"{name}_maps.safetensors"),
                  metadata={"family": predictor.family, "granularity": predictor.granularity})
    print(f"wrote {len(images)} panel(s), scale maps and raw maps to {out}")
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    parser.add_argument("--images", default=None,
                        help="folder of images (default: scikit-image's held-out sample photographs)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")


def _run_eval(args: argparse.Namespace) -> int:
    from hetvae.evaluate import evaluate, load_images, load_predictor, write_json

    try:
        predictor = load_predictor(args.checkpoint)
        images = [img for _, img in load_images(args.images)]
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    result = evaluate(predictor, images, progress=True)
    width = max(map(len, result))
    for key, value in result.items():
        shown = "n/a (constant scale)" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders or model checkpoints to compare")
    parser.add_argument("--images", default=None,
                        help="folder of images (default: scikit-image's held-out sample photographs)")
    parser.add_argument("--out", required=True, help="folder for comparison.md, reliability.png, sparsification.png")


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hetvae.evaluate import compare, load_images, load_predictor, write_json
    from hetvae.viz import save_reliability_diagram, save_sparsification_plot

    names = [Path(r).name or str(r) for r in args.runs]
    if len(set(names)) != len(names):
        names = [str(r) for r in args.runs]
    try:
        predictors = {name: load_predictor(run) for name, run in zip(names, args.runs)}
        images = [img for _, img in load_images(args.images)]
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    comparison = compare(predictors, images, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison.markdown()
    (out / "comparison.md").write_text(table)
    write_json(comparison.results, out / "comparison.json")
    save_reliability_diagram(out / "reliability.png", comparison.reliability)
    save_sparsification_plot(out / "sparsification.png", comparison.sparsification)
    print(table)
    print(f"wrote comparison.md, comparison.json, reliability.png, sparsification.png to {out}")
    return 0


_COMMANDS["uncertainty"] = ("Write uncertainty panels and maps for images.", _add_uncertainty, _run_uncertainty)
_COMMANDS["eval"] = ("Measure reconstruction, bits/dim and calibration on images.", _add_eval, _run_eval)
_COMMANDS["compare"] = ("Compare several runs or models on the same images.", _add_compare, _run_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetvae",
        description="Heteroscedastic reconstruction likelihoods for image autoencoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
