"""The ``hetvae`` command line.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
``_run_<name>(args)`` does the work. ``main()`` wires them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# name -> (help text, add_arguments(parser), run(args) -> exit code); filled in below the command functions.
_COMMANDS: dict[str, tuple] = {}


def _fail(error: Exception | str) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


@contextmanager
def _writing(flag: str, path) -> Iterator[None]:
    """Inside: a write to ``path`` (given as ``flag``) that the system refuses although the checks
    before the work passed (a full disk, a file protected since) raises ``ValueError`` naming the
    output, so the command ends with one error line. OSErrors hetvae raises with a message of its
    own (no errno: a model already there, a missing file) pass through as they are."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise ValueError(f"{flag} {path}: could not be written ({e.strerror or e})") from None


# --- the grammar every command shares -------------------------------------------------------

_MODEL_HELP = (
    "a run folder written by `hetvae train`, one of its training checkpoints (RUN/checkpoints/step_N), a hetvae "
    "or diffusers export, an SD/ldm single file, a head file (with --base where it records none), or a Hugging "
    "Face Hub id (org/name, org/name/vae, org/name/file.safetensors, @revision)"
)


def _model(text: str) -> str:
    """A positional MODEL as the loaders take it. Every command passes each model named on its
    command line through here, and only here, so what a MODEL may be is decided in one place."""
    return text


def _add_model(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """The positional ``MODEL`` (``MODEL...`` with ``several``): first on every command line."""
    parser.add_argument("model", metavar="MODEL", nargs="+" if several else None,
                        help=("models to compare, each " if several else "") + _MODEL_HELP)


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE``, repeatable: a YAML key (docs/config.md) and its value, parsed as YAML."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, metavar="MODEL",
                        help="for a head file (log_scale_head.safetensors of a train.head_only run): the VAE it was "
                             "trained for, when not the one the head file records")


def _load(args: argparse.Namespace, model: str, **kwargs):
    """``load_predictor`` for a command's ``MODEL`` (and ``--base`` where the command has it)."""
    from hetvae.predictor import load_predictor

    base = getattr(args, "base", None)
    return load_predictor(model, base=None if base is None else _model(base), **kwargs)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu); the device used is "
                             "named on stderr")


def _device(text: str | None) -> str:
    """The device ``--device`` names (None: cuda when available, else cpu), said on stderr;
    ``ValueError`` for one that is not a device or is not available here."""
    import torch

    if text is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(text.strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {text}: expected cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
                raise ValueError(f"--device {text}: CUDA is not available here ({why}); use --device cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {text}: there is no such GPU here ({torch.cuda.device_count()} visible: "
                                 f"cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        elif device.type == "mps":
            if not torch.backends.mps.is_available():
                raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
        elif device.type != "cpu":
            raise ValueError(f"--device {text}: expected cpu, cuda, cuda:N or mps")
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    print(f"device: {name}", file=sys.stderr)
    return str(device)


def _positive(what: str):
    """An argparse ``type``: a positive whole number of ``what`` (named in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}")
        return value
    return parse


def _add_batch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive("images"), default=1, metavar="N",
                        help="reconstruct up to N consecutive images of one size together (faster on a GPU; N images "
                             "in memory at once); default 1: one at a time")


def _add_out(parser: argparse.ArgumentParser, help_text: str, required: bool = False) -> None:
    """``--out PATH``: whatever the command writes, in every command."""
    parser.add_argument("--out", default=None, required=required, metavar="PATH", help=help_text)


# --- checkpoints: info, convert -------------------------------------------------------------


def _add_info(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


_HEAD_KEYS = {
    "log_scale_init": "log_scale.init",
    "log_scale_detach": "log_scale.detach_features",
    "log_scale_head_layers": "log_scale.head_layers",
    "log_scale_head_channels": "log_scale.head_channels",
    "log_scale_head_sees_mean": "log_scale.head_sees_mean",
    "log_scale_head_sees_latent": "log_scale.head_sees_latent",
    "log_scale_head_sees_edges": "log_scale.head_sees_edges",
}
"""``AutoencoderConfig`` fields of the per-pixel head -> the YAML key that sets each
(:func:`hetvae.likelihood.head_config_fields` maps them the other way); ``log_scale_channels`` is
``log_scale.shared``."""


def _settings(cfg) -> tuple[dict, dict]:
    """A model's ``AutoencoderConfig`` in the YAML vocabulary: ``({YAML key: value}, {name: value})``,
    the first the keys ``hetvae train --set`` takes (docs/config.md), the second what the model file
    stores that no YAML key sets (kept so that nothing read is lost on export)."""
    import dataclasses

    from hetvae.config import ModelConfig

    model_keys = {f.name for f in dataclasses.fields(ModelConfig)} - {"init_from"}
    lik, head = cfg.likelihood, cfg.log_scale == "pixel"
    settings, stored = {}, {}
    for f in dataclasses.fields(cfg):
        if f.name in model_keys:
            settings[f"model.{f.name}"] = getattr(cfg, f.name)
    settings["log_scale.granularity"] = lik.granularity if lik is not None else ("pixel" if head else None)
    if lik is not None:
        settings.update({"log_scale.family": lik.family, "log_scale.fit": lik.fit, "log_scale.init": lik.init,
                         "log_scale.bounds": list(lik.bounds)})
        stored.update({"likelihood.margin": lik.margin, "likelihood.free": None if lik.free is None else list(lik.free)})
    coupling = lik.channel_coupling if lik is not None else ("pixel" if getattr(cfg, "log_scale_coupling", False) else "none")
    settings["log_scale.channel_coupling"] = coupling
    if coupling != "none":
        # explicit: a config's null is the measured default order, not the record's 0, 1, ..., C-1
        stored_order = None if lik is None else lik.coupling_order
        settings["log_scale.coupling_order"] = list(stored_order or range(cfg.out_channels))
        if lik is not None and lik.coupling is not None:
            stored["likelihood.coupling (the learned coefficients a_kj)"] = list(lik.coupling)
    if head:
        settings["log_scale.shared"] = cfg.log_scale_channels == 1
        for name, key in _HEAD_KEYS.items():
            if key == "log_scale.init" and lik is not None and lik.init != cfg.log_scale_init:
                stored["log_scale_init (the head's bias)"] = cfg.log_scale_init
            else:
                settings.setdefault(key, getattr(cfg, name))
    handled = model_keys | set(_HEAD_KEYS) | {"log_scale", "log_scale_channels", "likelihood", "log_scale_coupling"}
    for f in dataclasses.fields(cfg):
        if f.name not in handled:
            stored[f.name] = getattr(cfg, f.name)
    return settings, stored


def _training_checkpoint(path: str) -> str | None:
    """What ``info`` and ``convert`` (which read model files) say of a run's training checkpoint, a
    file of one, or the folder of them; None for any other path."""
    from pathlib import Path

    from hetvae.checkpoint import is_checkpoint, list_checkpoints
    from hetvae.runs import MODEL_FILE

    given = Path(path).expanduser()
    if is_checkpoint(given):
        step, what = given, "a training checkpoint written by `hetvae train`"
    elif given.is_file() and is_checkpoint(given.parent):  # its weights.safetensors or state.pt
        step, what = given.parent, f"a file of the training checkpoint {given.parent}"
    elif list_checkpoints(given):
        step, what = list_checkpoints(given)[-1][1], "the folder of a run's training checkpoints"
    else:
        return None
    export = step.parent.parent / MODEL_FILE
    exported = f"; the run's exported model (its last step) is {export}" if export.is_file() else ""
    return (
        f"{given} is {what} (the weights and optimiser state a run resumes from), not a model file. eval, "
        f"uncertainty, compare and calibrate read a step as their MODEL (hetvae eval {step}); to write its model as "
        f"a model file, run hetvae calibrate {step} --out DIR (add --remove for the model as trained, uncalibrated)"
        f"{exported}"
    )


def _run_info(args: argparse.Namespace) -> int:
    from hetvae.convert import inspect_checkpoint
    from hetvae.files import CheckpointError
    from hetvae.outputs import json_text

    model = _model(args.model)
    not_a_model = _training_checkpoint(model)
    if not_a_model is not None:
        return _fail(not_a_model)
    try:
        info = inspect_checkpoint(model)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = info.config
    settings, stored = _settings(cfg)
    if args.json:
        print(json_text({
            "path": str(info.path), "format": info.format, "weights_file": str(info.weights_file),
            "config_source": info.config_source, "family": info.family, "config": cfg.to_dict(),
            "settings": settings, "stored": stored,
            "num_parameters": info.num_parameters, "log_scale_head": info.has_log_scale_head,
            "head_file": None if info.head_file is None else str(info.head_file),
            "scaling_source": info.scaling_source,
        }, indent=None))
        return 0
    sources = info.scaling_source
    scaling = sources["scaling_factor"] if len(set(sources.values())) == 1 else (
        f"scaling_factor from {sources['scaling_factor']}, shift_factor from {sources['shift_factor']}")
    if sources["scaling_factor"].startswith("inferred"):
        scaling += (" (shapes cannot tell SD from SDXL or SD3 from FLUX: convert --set model.scaling_factor=... "
                    "--set model.shift_factor=...)")
    lik = cfg.likelihood
    likelihood = "not recorded (eval: the head's map with default bounds, else the best constant scale per image)"
    if lik is not None:
        learned = "" if lik.free is None else f", learned free value(s) {list(lik.free)}"
        likelihood = f"{lik.family}, {lik.granularity} (fit {lik.fit}, init {lik.init}, bounds {lik.bounds}{learned})"
    head = "no"
    if info.has_log_scale_head:
        maps = f"{cfg.head_channels} map(s)" + (f" + {cfg.coupling_maps} coupling map(s)" if cfg.coupling_maps else "")
        head = f"yes, {maps}, " + (f"from {info.head_file}" if info.head_file else "inside the file")
    print(f"path:        {info.path}")
    print(f"format:      {info.format} (config {info.config_source})")
    print(f"weights:     {info.weights_file}")
    print(f"family:      {info.family} (scaling_factor {cfg.scaling_factor}, shift_factor {cfg.shift_factor})")
    print(f"latent scaling: {scaling}")
    print(f"likelihood:  {likelihood}")
    coupling = settings["log_scale.channel_coupling"]
    if coupling != "none":
        order = settings.get("log_scale.coupling_order") or list(range(cfg.out_channels))
        what = ("per pixel, predicted by the head" if coupling == "pixel"
                else f"global, a_kj = {[round(v, 4) for v in (lik.coupling or [])]}")
        print(f"colour coupling: {what} (channel order {order})")
    calibration = lik.calibrator() if lik is not None else None
    print(f"calibration: {'none' if calibration is None else calibration.describe()}")
    print(f"parameters:  {info.num_parameters:,}")
    print(f"log-scale head: {head}")
    def shown(value) -> str:  # as YAML writes it: a word bare, anything else as JSON (null, true, [8, 8])
        return value if isinstance(value, str) and value.isidentifier() else json_text(value, indent=None)

    print("settings (YAML keys, as --set takes them):")
    for key, value in settings.items():
        print(f"  {key}: {shown(value)}")
    print("stored with the model (no YAML key):")
    for key, value in stored.items():
        print(f"  {key}: {shown(value)}")
    return 0


def _add_convert(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    parser.add_argument("--to", required=True, choices=("hetvae", "diffusers", "ldm"), help="output format")
    _add_out(parser, "output folder (or a .safetensors file for --to ldm / hetvae); required")
    _add_set(parser, "a YAML key convert uses and its value (repeatable): " + ", ".join(_CONVERT_KEYS)
             + "; e.g. --set log_scale.granularity=pixel --set log_scale.init=-3 grafts a per-pixel log-scale head "
               "(zero weights, bias init) where the source has none")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already in --out (and remove a head file it no longer has)")


_CONVERT_KEYS = {
    "log_scale.granularity": "only 'pixel': graft a per-pixel log-scale head (zero weights) if the source has none",
    "log_scale.init": "the bias of a grafted head",
    "log_scale.shared": "true: a grafted head predicts one map for all channels",
    "model.scaling_factor": "the latent scaling factor",
    "model.shift_factor": "the latent shift factor",
    "model.norm_num_groups": "GroupNorm groups (not visible in single files; 32 assumed)",
}
"""The YAML keys ``hetvae convert --set`` takes, and what each does there."""


def _convert_settings(overrides: Sequence[str]) -> tuple[str | None, dict]:
    """``(log_scale, AutoencoderConfig overrides)`` for ``load_autoencoder`` from ``convert --set``
    items, typed and checked as ``hetvae train --set`` checks them; ``ConfigError`` for a key
    convert does not use (listing those it does) and for head keys without a per-pixel head."""
    from hetvae.config import Config
    from hetvae.schema import ConfigError, apply_overrides

    keys = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in _CONVERT_KEYS:
            raise ConfigError(key, f"convert does not use this key (--set {item}); it uses "
                                   + ", ".join(_CONVERT_KEYS) + " (docs/checkpoints.md)")
        keys.append(key)
    cfg = apply_overrides(Config(), overrides)
    pixel = "log_scale.granularity" in keys
    if pixel and cfg.log_scale.granularity != "pixel":
        raise ConfigError("log_scale.granularity", f"convert grafts only a per-pixel head: expected pixel, got "
                                                   f"{cfg.log_scale.granularity!r} (global and channel scales are "
                                                   "not part of a model file's architecture)")
    head = [k for k in keys if k in ("log_scale.init", "log_scale.shared")]
    if head and not pixel:
        raise ConfigError(head[0], "shapes a grafted log-scale head: add --set log_scale.granularity=pixel")
    fields = {}
    if "log_scale.init" in keys:
        fields["log_scale_init"] = cfg.log_scale.init
    if "log_scale.shared" in keys:
        fields["log_scale_channels"] = 1 if cfg.log_scale.shared else None
    for name in ("scaling_factor", "shift_factor", "norm_num_groups"):
        if f"model.{name}" in keys:
            fields[name] = getattr(cfg.model, name)
    return ("pixel" if pixel else None), fields


def _run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hetvae.convert import check_export_destination, load_autoencoder, save_autoencoder
    from hetvae.files import CheckpointError
    from hetvae.outputs import check_output_folder

    try:
        log_scale, overrides = _convert_settings(args.overrides)
    except ValueError as e:  # ConfigError
        return _fail(e)
    source = _model(args.model)
    not_a_model = _training_checkpoint(source)
    if not_a_model is not None:
        return _fail(not_a_model)
    dst = Path(args.out).expanduser()
    try:
        # where the files go (--out, or the folder of a .safetensors file), and a model already there
        # without --overwrite, checked before the source is read (minutes, for a big model)
        folder = dst.parent if dst.suffix == ".safetensors" and args.to != "diffusers" else dst
        check_output_folder(folder, "--out")
        check_export_destination(dst, args.to, overwrite=args.overwrite)
        model = load_autoencoder(source, log_scale=log_scale, **overrides)
        with _writing("--out", dst):
            written = save_autoencoder(model, dst, format=args.to, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} ({args.to}{', with log-scale head' if model.has_log_scale_head else ''})")
    return 0


_COMMANDS["info"] = ("Show a checkpoint's format, config, parameter count and log-scale head.", _add_info, _run_info)
_COMMANDS["convert"] = ("Convert an autoencoder checkpoint between hetvae, diffusers and ldm formats.", _add_convert, _run_convert)


# --- training: train ------------------------------------------------------------------------


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help=_CONFIG_HELP)
    _add_set(parser, "override a config key, e.g. --set train.steps=100 (repeatable; value parsed as YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the run folder (error if there is none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run folder that holds a previous run: its checkpoints, metrics, samples "
                             "and exported model are deleted once the first step has trained")
    _add_out(parser, "run folder (overrides out_dir in the config; with --set out_dir=... it must name the same "
                     "folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "resuming: with train.resume=auto (the default) a run folder that holds checkpoints is resumed; the config\n"
        "may then differ from the run's only in steps, logging / sample / checkpoint cadence, optimiser settings,\n"
        "train.device, data.num_workers and data.cache_mb (anything else is refused, naming the keys: use a new\n"
        "--out or --overwrite).\n"
        "\n"
        "exit codes:\n"
        "  0    training finished (or the run was already at train.steps + train.head_steps)\n"
        "  1    error (config, data, checkpoint, disk, non-finite weights); the message names the cause, and a\n"
        "       checkpoint of the last finished step is written first where that is safe\n"
        "  130  stopped by SIGINT (Ctrl-C) after checkpointing and exporting: resume with --resume\n"
        "  143  stopped by SIGTERM (e.g. a cluster's time limit) after checkpointing and exporting: resume with --resume"
    )


_CONFIG_HELP = (
    "YAML config (see configs/; a `base:` key inherits another file), or a run folder: its config.yaml, and the "
    "folder itself as the run folder (unless --out or --set out_dir=... names another)"
)


def _sets_out_dir(overrides: Sequence[str]) -> bool:
    """Whether ``--set`` overrides name ``out_dir``."""
    return any(o.partition("=")[0].strip() == "out_dir" for o in overrides)


def _train_config(config: str, out_dir: str | None, overrides: Sequence[str] = ()) -> tuple[str, str | None]:
    """``(config file, run folder)`` of ``hetvae train CONFIG``: a run folder stands for its own
    config.yaml and is the run folder (not the out_dir saved in it: the folder may have been moved
    or copied) unless --out or ``--set out_dir=...`` says otherwise (``None``: the config's
    out_dir, overrides applied)."""
    from pathlib import Path

    from hetvae.runs import CONFIG_FILE
    from hetvae.schema import ConfigError

    folder = Path(config).expanduser()
    if not folder.is_dir():
        return config, out_dir
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError("", f"{folder}: is a folder without a {CONFIG_FILE}; expected a YAML config or a run folder "
                              "written by `hetvae train`")
    if out_dir is None and not _sets_out_dir(overrides):
        out_dir = str(folder)
    return str(saved), out_dir


def _run_train(args: argparse.Namespace) -> int:
    import logging

    import signal
    from pathlib import Path

    from hetvae.config import load_config
    from hetvae.schema import ConfigError
    from hetvae.train import NonFiniteLossError, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, out_dir = _train_config(args.config, args.out, args.overrides)
        cfg = load_config(config, args.overrides)
        if (args.out is not None and _sets_out_dir(args.overrides)
                and Path(args.out) != Path(cfg.out_dir)):  # one of the two would be ignored
            raise ConfigError("out_dir", f"expected one run folder, got two: --out {args.out} and --set "
                                         f"out_dir={cfg.out_dir}; give one of them")
        result = train(cfg, out_dir=out_dir, resume=True if args.resume else None, progress=not args.no_progress,
                       overwrite=args.overwrite)
    except (ConfigError, OSError, NonFiniteLossError, ValueError) as e:  # OSError: files, FileExists/NotFound
        print("error: " + "\n  ".join([str(e), *getattr(e, "__notes__", [])]), file=sys.stderr)
        return 1
    if result.model_file is not None:  # rank 0
        state = "interrupted" if result.interrupted else "done"
        print(f"{state} at step {result.step}: model {result.model_file}, "
              f"uncertainty panels {result.run_dir / 'samples'} (latest.png)")
    if result.interrupted:  # what a shell reports for a process ended by that signal (see --help)
        return 128 + (result.signal or signal.SIGTERM)
    return 0


_COMMANDS["train"] = ("Train or fine-tune an autoencoder from a YAML config.", _add_train, _run_train)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help=_CONFIG_HELP)
    _add_set(parser, "override a config key, as hetvae train takes it (repeatable; value parsed as YAML)")


def _run_config(args: argparse.Namespace) -> int:
    from hetvae.config import RESOLVED_HEADER, config_text, load_config
    from hetvae.schema import ConfigError

    try:
        config, out_dir = _train_config(args.config, None, args.overrides)
        cfg = load_config(config, args.overrides)
    except (ConfigError, OSError) as e:
        return _fail(e)
    if out_dir is not None:  # a run folder: where `hetvae train RUN` would train, as it would
        cfg = dataclasses.replace(cfg, out_dir=out_dir)
    print(RESOLVED_HEADER)
    print(config_text(cfg), end="")
    return 0


_COMMANDS["config"] = ("Print the resolved config of a YAML file or a run folder: every key, defaults included.",
                       _add_config, _run_config)


def _add_shards(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="a folder of images (searched recursively, as data.path reads one)")
    _add_out(parser, "the folder to write shard-000000.tar, ... into; required")
    parser.add_argument("--size", type=_positive("images per shard"), default=1000,
                        help="images per shard (default 1000); a run needs at least as many shards as its "
                             "readers (processes x data.num_workers)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards already in --out (shard-NNNNNN.tar; those beyond the new count go)")


def _run_shards(args: argparse.Namespace) -> int:
    import re

    from hetvae.outputs import check_output_folder
    from hetvae.shards import write_shards

    try:
        out = check_output_folder(args.out, "--out")
        existing = sorted(p for p in out.glob("shard-*.tar") if re.fullmatch(r"shard-\d{6}\.tar", p.name)) \
            if out.is_dir() else []
        if existing and not args.overwrite:
            raise ValueError(f"--out {out} already holds {len(existing)} shard(s) ({existing[0].name}, ...): choose "
                             "another folder, or --overwrite to replace them")
        with _writing("--out", out):
            written = write_shards(args.folder, out, size=args.size)
            for stale in sorted(set(existing) - set(written.paths)):
                stale.unlink()
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(f"wrote {written.images} image(s) into {len(written.paths)} shard(s) in {out}")
    print(f"data.path: {written.pattern}")
    return 0


_COMMANDS["shards"] = ("Write a folder of images into webdataset tar shards to train on (data.path).", _add_shards,
                       _run_shards)


# --- uncertainty maps and evaluation: uncertainty, eval, compare ---------------------------

def _tile_size(text: str) -> int | None:
    """``--tile``: 'auto' (None), 0 or a size in pixels; the model's factor is checked once it is loaded."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 0 (never tile) or a tile size in pixels, a positive multiple of the model's "
            f"down-sampling factor (8 for SD VAEs), got {text!r}"
        )
    return value


def _add_tile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tile", type=_tile_size, default=None, metavar="PX",
        help="reconstruct in overlapping tiles of PX pixels (a multiple of the model's down-sampling factor, "
             "8 for SD VAEs) to bound memory; 0: whole images; default 'auto': tiles of 512 px for images over "
             "4 megapixels (2048x2048), whole images below",
    )


def _set_tile(predictor, tile: int | None, source: str) -> None:
    f = predictor.model.config.downsample_factor
    if tile and tile % f:
        lower, upper = max(tile // f * f, f), (tile // f + 1) * f
        raise ValueError(
            f"--tile {tile}: must be 'auto', 0 or a positive multiple of {f}, the down-sampling factor of {source} "
            f"(e.g. {lower} or {upper})"
        )
    predictor.tile = tile


def _add_uncalibrated(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uncalibrated", action="store_true",
                        help="ignore a calibration stored with the model (hetvae calibrate): the scale as trained")


def _note_skipped(skipped) -> None:
    """One note for the inputs left out because hetvae wrote them (an ImageList's ``skipped``, or a list)."""
    skipped = list(getattr(skipped, "skipped", skipped))
    if skipped:
        print(f"note: skipped {len(skipped)} file(s) hetvae wrote (e.g. {skipped[0]})", file=sys.stderr)


def _add_images(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--images PATH...``, repeatable: every path given is used (``--images a b --images c``)."""
    parser.add_argument("--images", action="extend", nargs="+", default=None, metavar="PATH",
                        help=help_text + "; several paths and a repeated --images add up")


def _images_source(paths) -> str:
    """The ``--images`` paths for a message; the sample photographs when none were given."""
    return ", ".join(map(str, paths)) if paths else "the held-out sample photographs"


def _add_uncertainty(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    _add_base(parser)
    parser.add_argument(
        "--images", action="extend", nargs="+", default=None, metavar="PATH",
        help="image files or folders (recursive); or latent files instead: .safetensors (one tensor, or one named "
             "'latents') or .pt (torch.load(weights_only=True)) of shape (B, C, h, w), each decoded with its scale "
             "map; several paths and a repeated --images add up; required",
    )
    _add_out(
        parser, required=True,
        help_text="output folder. Each image gets OUT/REL_panel.png, OUT/REL_scale.png and OUT/REL_maps.safetensors, "
             "REL being its path relative to the folder all inputs share, extension kept (a/x.png -> "
             "OUT/a/x.png_panel.png), so outputs are unique per input; OUT may be an input folder. Earlier "
             "hetvae outputs are replaced and never read as inputs; any other existing file where an output "
             "would go is an error, checked before anything is written",
    )
    parser.add_argument(
        "--scaled", action="store_true",
        help="latents as a diffusion pipeline gives them (output_type='latent'): undo the pipeline's scaling first, "
             "z / scaling_factor + shift_factor with the model's config (z * latents_std / scaling_factor + "
             "latents_mean where the config has those), as diffusers does before decoding",
    )
    _add_tile(parser)
    _add_uncalibrated(parser)
    _add_device(parser)
    _add_batch_size(parser)


def _run_uncertainty_latents(args: argparse.Namespace, inputs: list[str], skipped: list[str]) -> int:
    """``hetvae uncertainty LATENTS...``: decode each latent of ``inputs``, write its image with its
    scale map (OUT/NAME_panel.png, NAME_scale.png, NAME_maps.safetensors; NAME: the file's name, plus
    _i for the i-th latent of a batch). ``skipped``: inputs left out because hetvae wrote them."""
    from pathlib import Path

    from hetvae.images import load_latents, relative_names
    from hetvae.outputs import check_output_file, check_output_folder, save_marked_maps, uncertainty_outputs
    from hetvae.viz import save_decoded_panel, save_scale_map

    try:
        out = check_output_folder(args.out, "--out")
        files = [Path(p).expanduser() for p in inputs]
        model = _model(args.model)
        predictor = _load(args, model, device=_device(args.device), calibrated=not args.uncalibrated)
        _note_skipped(skipped)
        _set_tile(predictor, args.tile, model)
        batches = [load_latents(f, predictor.model.config, scaled=args.scaled) for f in files]
        names = [[name] if len(z) == 1 else [f"{name}_{i}" for i in range(len(z))]
                 for name, z in zip(relative_names(files), batches)]
        for name in (n for group in names for n in group):
            for path in uncertainty_outputs(out, name):
                check_output_file(path, "--out")
        calibrated = ", calibrated" if predictor.calibration is not None else ""
        for file, z, group in zip(files, batches, names):
            for latent, name in zip(z, group):
                try:
                    decoded = predictor.decode_latents(latent)
                except ValueError as error:
                    raise ValueError(f"latents {file}: {error}") from None
                panel, scale, maps = uncertainty_outputs(out, name)
                title = f"{name} (decoded, {predictor.granularity} scale, {predictor.family}{calibrated})"
                with _writing("--out", panel):
                    save_decoded_panel(panel, decoded.mean, decoded.log_scale, title=title)
                with _writing("--out", scale):
                    save_scale_map(scale, decoded.log_scale[0])
                with _writing("--out", maps):
                    save_marked_maps(maps, decoded.maps(latent), predictor.family, predictor.granularity,
                                     "decoded latent maps")
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    count = sum(map(len, names))
    print(f"wrote {count} decoded panel(s), scale maps and raw maps to {out}")
    return 0


def _run_uncertainty(args: argparse.Namespace) -> int:
    from contextlib import closing

    from hetvae.images import is_latent_file, load_images, split_hetvae_outputs
    from hetvae.outputs import check_output_file, check_output_folder, save_marked_maps, uncertainty_outputs
    from hetvae.predictor import iter_predictions
    from hetvae.viz import save_scale_map, save_uncertainty_panel

    # hetvae's own *_maps.safetensors (an earlier run's, met again by a glob) are outputs, not latents
    inputs, ours = split_hetvae_outputs(p for p in args.images if is_latent_file(p))
    inputs += [p for p in args.images if not is_latent_file(p)]
    inputs.sort(key=args.images.index)
    if not inputs:
        return _fail(ValueError(f"no inputs to read: all {len(ours)} file(s) given were written by hetvae "
                                f"(e.g. {ours[0]}); give the images or latents they came from"))
    latents = [p for p in inputs if is_latent_file(p)]
    if latents and len(latents) < len(inputs):
        others = [p for p in inputs if not is_latent_file(p)]
        return _fail(ValueError(f"give images or latent files, not both: latents {latents[0]!r}, images {others[0]!r}"))
    if latents:
        return _run_uncertainty_latents(args, inputs, ours)
    if args.scaled:
        return _fail(ValueError("--scaled applies to latent files (.safetensors / .pt), and only images were given"))
    try:
        out = check_output_folder(args.out, "--out")
        images = load_images(inputs)
        for name in images.names:
            for path in uncertainty_outputs(out, name):
                check_output_file(path, "--out")
        model = _model(args.model)
        predictor = _load(args, model, device=_device(args.device), calibrated=not args.uncalibrated)
        _set_tile(predictor, args.tile, model)
        _note_skipped(ours + images.skipped)
        calibrated = ", calibrated" if predictor.calibration is not None else ""
        # read to its end, so the progress bar finishes (n/n); closed on an error too, so it is drawn before
        # the error line, not after it when the stream is collected
        with closing(iter_predictions(predictor, images, progress=True, desc="uncertainty",
                                      batch_size=args.batch_size)) as stream:
            for k, (_, p) in enumerate(stream):
                name = images.names[k]
                panel, scale, maps = uncertainty_outputs(out, name)
                title = f"{name} ({predictor.granularity} scale, {predictor.family}{calibrated})"
                with _writing("--out", panel):
                    save_uncertainty_panel(panel, p.target, p.mean, p.log_scale, title=title, standardized=True,
                                           centre=None if p.coupling is None else p.centre,
                                           coupling=p.coupling if p.coupling is not None and p.coupling.ndim == 4 else None)
                with _writing("--out", scale):
                    save_scale_map(scale, p.log_scale[0])
                with _writing("--out", maps):
                    save_marked_maps(maps, p.maps(), predictor.family, predictor.granularity, "uncertainty maps")
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    print(f"wrote {len(images)} panel(s), scale maps and raw maps to {out}")
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    _add_base(parser)
    _add_images(parser, "image files or folders (default: scikit-image's held-out sample photographs); "
                        "files hetvae wrote (panels, scale maps) are skipped")
    _add_out(parser, "also write the metrics to this JSON file (replaces an earlier hetvae JSON; any other existing "
                     "file is an error)")
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON object (what --out writes) instead of text")
    parser.add_argument("--per-image", action="store_true",
                        help="also print (and write to --out, as \"images\") each image's metrics, to find the "
                             "photographs a model reconstructs or covers worst")
    _add_tile(parser)
    _add_uncalibrated(parser)
    _add_device(parser)
    _add_batch_size(parser)


def _per_image_table(rows: list[dict]) -> str:
    """Each image's metrics as aligned text columns (the file's name, not its folder)."""
    from pathlib import Path

    columns = [("psnr", "PSNR", 2), ("nll_bpd", "bits/dim", 3), ("coverage_90", "cov90", 3),
               ("calibration_error", "calib", 3), ("spearman", "spearman", 3), ("chroma_kept", "chroma", 2)]
    if rows and "uncalibrated" in rows[0]:  # a calibrated model: the raw figures beside the calibrated ones
        columns[4:4] = [(("uncalibrated", "nll_bpd"), "raw b/d", 3), (("uncalibrated", "coverage_90"), "raw cov90", 3),
                        (("uncalibrated", "calibration_error"), "raw calib", 3)]

    def value(row: dict, key):
        return row[key[0]][key[1]] if isinstance(key, tuple) else row[key]

    names = [Path(r["image"]).name for r in rows]
    width = max(len("image"), *map(len, names))
    lines = [f"{'image':<{width}}  " + "  ".join(f"{title:>9}" for _, title, _ in columns)]
    for name, row in zip(names, rows):
        cells = ["n/a" if value(row, key) is None else f"{value(row, key):.{digits}f}" for key, _, digits in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def _run_eval(args: argparse.Namespace) -> int:
    from hetvae.evaluate import evaluate
    from hetvae.images import load_images
    from hetvae.outputs import check_output_file, json_text, write_json

    try:
        if args.out:
            check_output_file(args.out, "--out")
        images = load_images(args.images)
        model = _model(args.model)
        predictor = _load(args, model, device=_device(args.device), calibrated=not args.uncalibrated)
        _set_tile(predictor, args.tile, model)
        _note_skipped(images)
        result = evaluate(predictor, images, progress=True, per_image=args.per_image, batch_size=args.batch_size)
        if args.out:
            check_output_file(args.out, "--out")  # again: the run may be long
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    if args.json:  # stdout holds the JSON alone: the notes go to stderr
        print(json_text(result))
    else:
        _print_metrics(result, args.per_image)
    if args.out:  # after the metrics are printed: a write that fails loses none of them
        try:
            with _writing("--out", args.out):
                written = write_json(result, args.out)
        except ValueError as error:
            return _fail(error)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_metrics(result: dict, per_image: bool) -> None:
    """``hetvae eval``'s text: the metrics (calibrated beside uncalibrated), a colour note, the rows."""
    def shown(value, key=""):
        if value is None:
            return "n/a (no colour images)" if key.startswith("chroma") else "n/a (constant scale)"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    before = result.get("uncalibrated")
    rows = {k: v for k, v in result.items() if k not in ("uncalibrated", "calibration", "images")}
    width = max(map(len, rows))
    if before is None:
        for key, value in rows.items():
            print(f"{key:<{width}}  {shown(value, key)}")
    else:  # a calibrated model: before and after, side by side
        print(f"calibration: {result['calibration']}")
        print(f"{'':<{width}}  {'uncalibrated':<20}  calibrated")
        for key, value in rows.items():
            print(f"{key:<{width}}  {shown(before.get(key), key):<20}  {shown(value, key)}")
    colour = _colour_note(result)
    if colour:
        print(colour)
    if per_image:
        print(_per_image_table(result["images"]))


CHROMA_KEPT_RANGE = (2 / 3, 3 / 2)
"""``hetvae eval`` notes images whose reconstruction keeps less or more of their chroma than this."""


def _colour_note(result: dict) -> str | None:
    """A line when some reconstruction is washed out or over-saturated as a whole, else None."""
    low, high = result.get("chroma_kept_min"), result.get("chroma_kept_max")
    lo, hi = CHROMA_KEPT_RANGE
    faults = []
    if low is not None and low < lo:
        faults.append(f"washed out (one keeps {low:.0%} of its chroma)")
    if high is not None and high > hi:
        faults.append(f"over-saturated (one has {high:.0%} of its chroma)")
    if not faults:
        return None
    return ("note: colour: some reconstructions are " + " and ".join(faults)
            + f"; outside {lo:.0%}-{hi:.0%}, a whole-image fault that PSNR averages away")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    _add_model(parser, several=True)
    _add_images(parser, "image files or folders (default: scikit-image's held-out sample photographs); "
                        "files hetvae wrote are skipped")
    _add_out(parser, "folder for comparison.md, comparison.json, reliability.png, sparsification.png (earlier hetvae "
                     "outputs there are replaced; any other file of those names is an error)", required=True)
    _add_tile(parser)
    _add_uncalibrated(parser)
    _add_device(parser)
    _add_batch_size(parser)


_COMPARE_FILES = ("comparison.md", "comparison.json", "reliability.png", "sparsification.png")


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hetvae.evaluate import compare
    from hetvae.images import load_images
    from hetvae.outputs import check_output_file, check_output_folder, write_json, write_text
    from hetvae.predictor import load_predictor
    from hetvae.viz import save_reliability_diagram, save_sparsification_plot

    models = [_model(m) for m in args.model]
    names = [Path(m).name or str(m) for m in models]
    if len(set(names)) != len(names):
        names = [str(m) for m in models]
    try:
        out = check_output_folder(args.out, "--out")
        for file in _COMPARE_FILES:
            check_output_file(out / file, "--out")
        images = load_images(args.images)
        device = _device(args.device)
        predictors = {name: load_predictor(m, device=device, calibrated=not args.uncalibrated)
                      for name, m in zip(names, models)}
        for m, predictor in zip(models, predictors.values()):
            _set_tile(predictor, args.tile, m)
        _note_skipped(images)
        comparison = compare(predictors, images, progress=True, batch_size=args.batch_size)
        for file in _COMPARE_FILES:
            check_output_file(out / file, "--out")  # again: the run may be long
        table = comparison.markdown()
        print(table)  # before the files: a write that fails loses none of the results
        md, js, reliability, sparsification = (out / file for file in _COMPARE_FILES)
        with _writing("--out", md):
            write_text(table, md)
        with _writing("--out", js):
            write_json(comparison.results, js)
        with _writing("--out", reliability):
            save_reliability_diagram(reliability, comparison.reliability)
        with _writing("--out", sparsification):
            save_sparsification_plot(sparsification, comparison.sparsification)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    print(f"wrote {', '.join(_COMPARE_FILES)} to {out}")
    return 0


_COMMANDS["uncertainty"] = ("Write uncertainty panels and maps for images, or for decoded latents.", _add_uncertainty,
                             _run_uncertainty)
_COMMANDS["eval"] = ("Measure reconstruction, bits/dim and calibration on images.", _add_eval, _run_eval)
_COMMANDS["compare"] = ("Compare several runs or models on the same images.", _add_compare, _run_compare)


# --- calibration: calibrate -------------------------------------------------------------------


def _add_calibrate(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    _add_base(parser)
    _add_images(parser, "unseen images to fit on, files or folders (default: the 32 unseen colour photographs that "
                        "ship with hetvae; best: photos like the ones the model will see)")
    parser.add_argument("--method", choices=("affine", "isotonic"), default=None,
                        help="isotonic (default): a per-channel slope and offset of the log-scale, then a monotone "
                             "recalibration of the predicted CDF; affine: the slope and offset only (docs/math.md; "
                             "docs/results.md#calibration measures both)")
    _add_out(parser, "write the calibrated model as a new hetvae export here instead of updating MODEL (needed for "
                     "single files hetvae did not write)")
    parser.add_argument("--chroma", action="store_true",
                        help="also fit a chroma term: the log-scale widened by g1*u + g2*u^2, u the log chroma of the "
                             "reconstruction, for maps over-confident on saturated colour (RGB models; docs/math.md)")
    parser.add_argument("--remove", action="store_true", help="remove a stored calibration instead of fitting one")
    _add_tile(parser)
    _add_device(parser)


def _run_calibrate(args: argparse.Namespace) -> int:
    from hetvae.calibration import DEFAULT_METHOD, CalibrationError
    from hetvae.files import CheckpointError
    from hetvae.images import calibration_photos, load_images
    from hetvae.predictor import calibrate, check_calibration_destination, store_calibration

    model = _model(args.model)
    flag, destination = ("--out", args.out) if args.out is not None else ("MODEL", model)
    try:
        if args.remove and args.chroma:
            raise ValueError("--chroma fits a chroma term; --remove removes the calibration: give one of them")
        # before loading and fitting: a destination that is refused or cannot be written to
        check_calibration_destination(model, args.out)
        predictor = _load(args, model, device=_device(args.device), calibrated=False)
        if args.remove:
            with _writing(flag, destination):
                written = store_calibration(predictor, None, model, args.out)
            print(f"removed the calibration: wrote {written}")
            return 0
        _set_tile(predictor, args.tile, model)
        images = load_images(args.images if args.images else calibration_photos())
        _note_skipped(images)
        calibration = calibrate(predictor, images, method=args.method or DEFAULT_METHOD, chroma=args.chroma)
        with _writing(flag, destination):
            written = store_calibration(predictor, calibration, model, args.out)
    except (CalibrationError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as error:
        return _fail(error)
    source = _images_source(args.images) if args.images else "the calibration photographs hetvae ships"
    print(f"calibration on {source} ({len(images)} image(s)): {calibration.describe()}")
    print(f"wrote {written}; eval, uncertainty and loading now use it (--uncalibrated: without)")
    return 0


_COMMANDS["calibrate"] = ("Fit a post-hoc correction of the predicted scale on held-out images and store it with the model.",
                          _add_calibrate, _run_calibrate)


class _Once(argparse.Action):
    """Store an option's value, and refuse the option given a second time in one command line
    (argparse's own ``store`` keeps the last value without a word)."""

    _namespace = None  # a weak reference to the namespace this option was last stored into

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self._namespace is not None and self._namespace() is namespace:
            before = getattr(namespace, self.dest)
            shown = "" if None in (before, values) else f" ({before!r}, then {values!r})"
            raise argparse.ArgumentError(self, f"given twice{shown}: it takes one value, give it once")
        self._namespace = weakref.ref(namespace)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse, with every option that stores one value stored by :class:`_Once`, in every command
    (sub-parsers are made of this class too). Options meant to repeat say so (``--images``, ``--set``)."""

    def add_argument(self, *args, **kwargs):
        if args and str(args[0]).startswith("-") and kwargs.get("action", "store") == "store":
            kwargs["action"] = _Once
        return super().add_argument(*args, **kwargs)


_USAGE = {
    "train": "hetvae train CONFIG [--set KEY=VALUE ...] [--out RUN]",
    "config": "hetvae config CONFIG [--set KEY=VALUE ...]",
    "info": "hetvae info MODEL [--json]",
    "convert": "hetvae convert MODEL --to FORMAT --out DST [--set KEY=VALUE ...]",
    "shards": "hetvae shards FOLDER --out DIR [--size N]",
    "uncertainty": "hetvae uncertainty MODEL --images PATH... --out DIR",
    "eval": "hetvae eval MODEL [--images PATH...] [--out FILE.json] [--json]",
    "compare": "hetvae compare MODEL... [--images PATH...] --out DIR",
    "calibrate": "hetvae calibrate MODEL [--images PATH...] [--out DIR] [--chroma]",
}
"""Each command's grammar, as the errors for an old spelling give it."""

_MODEL_NOW = "--checkpoint was replaced by a positional MODEL (first on the command line)"
_REPLACED_OPTIONS = {
    "train": {"--out-dir": "--out-dir was replaced by --out (or --set out_dir=RUN)"},
    "eval": {"--checkpoint": _MODEL_NOW,
             "--json=": "--json FILE was replaced by --out FILE (--json alone prints the metrics as JSON)"},
    "uncertainty": {"--checkpoint": _MODEL_NOW + ", and the positional images by --images"},
    "calibrate": {"--checkpoint": _MODEL_NOW},
    "convert": {
        "--log-scale": "--log-scale pixel was replaced by --set log_scale.granularity=pixel",
        "--log-scale-init": "--log-scale-init VALUE was replaced by --set log_scale.init=VALUE",
        "--log-scale-channels": "--log-scale-channels 1 was replaced by --set log_scale.shared=true",
        "--scaling-factor": "--scaling-factor VALUE was replaced by --set model.scaling_factor=VALUE",
        "--shift-factor": "--shift-factor VALUE was replaced by --set model.shift_factor=VALUE",
        "--norm-num-groups": "--norm-num-groups VALUE was replaced by --set model.norm_num_groups=VALUE",
    },
}
"""Options a command no longer has -> what replaced them (``"--json="``: the option given a value)."""

_EXTRA_POSITIONAL = {
    "train": "train takes one CONFIG",
    "config": "config takes one CONFIG",
    "info": "info takes one MODEL",
    "convert": "the destination is given with --out (it is no longer a second positional)",
    "shards": "the output folder is given with --out (it is no longer a second positional)",
    "uncertainty": "images are given with --images (they are no longer positional)",
    "eval": "eval takes one MODEL; images are given with --images",
    "calibrate": "calibrate takes one MODEL; images are given with --images",
}
"""What a command says of positional arguments beyond its own (an old spelling, mostly)."""

_REQUIRED_AFTER = {"convert": ("--out",), "shards": ("--out",), "uncertainty": ("--images",)}
"""Options a command requires, checked after the old spellings (whose arguments would otherwise be
reported as the missing option): the destination and the images were positional arguments."""


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), or None."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in _COMMANDS else None
    return None


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with an old spelling (an option or a positional argument that a
    command no longer takes) refused by an error that names what replaced it, not argparse's
    'unrecognized arguments'. Exits 2, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    sub = parser.commands.get(command) if command else None
    if sub is not None:
        tokens = argv[argv.index(command) + 1:]
        tokens = tokens[:tokens.index("--")] if "--" in tokens else tokens
        replaced = _REPLACED_OPTIONS.get(command, {})
        for token in tokens:
            if not token.startswith("--"):
                continue
            name, equals, _ = token.partition("=")
            message = replaced.get(name) or (replaced.get(name + "=") if equals else None)
            if message:
                sub.error(f"{message}: {_USAGE[command]}")
    args, extras = parser.parse_known_args(argv)
    if extras:
        positional = [e for e in extras if not e.startswith("-")]
        if sub is not None and positional and command in _EXTRA_POSITIONAL:
            message = _EXTRA_POSITIONAL[command]
            if command == "eval" and "--json" in argv:
                message = _REPLACED_OPTIONS["eval"]["--json="]
            sub.error(f"unexpected argument {positional[0]!r}: {message}: {_USAGE[command]}")
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    missing = [o for o in _REQUIRED_AFTER.get(command, ()) if getattr(args, o[2:]) is None]
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)}: {_USAGE[command]}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hetvae",
        description="Heteroscedastic reconstruction likelihoods for image autoencoders.",
    )
    from hetvae import __version__

    parser.add_argument("--version", action="version", version=f"hetvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, (help_text, add_arguments, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, usage=f"{_USAGE[name]} [OPTIONS]")
        add_arguments(p)
        p.set_defaults(_run=run)
        parser.commands[name] = p
    return parser


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what could not be
    written is silent (no 'Exception ignored' note)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (output captured in memory)
        pass


class _OutputFailed(Exception):
    """Standard output refused a write (a full device); not an OSError, so that no command takes it
    for one of its own files."""


class _StandardOutput:
    """``sys.stdout`` while a command runs: a write or flush the system refuses raises
    :class:`_OutputFailed`, so the error can name standard output (an OSError says no file). A closed
    pipe stays a ``BrokenPipeError`` (a quiet exit)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputFailed(e.strerror or str(e)) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputFailed(e.strerror or str(e)) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hetvae`` with ``argv``; return the exit code (docs/runs.md). Whatever goes wrong is one
    line on stderr, never a traceback: Ctrl-C prints ``interrupted`` (130); a system error (a full
    disk, a full standard output) says what could not be written (1); a closed pipe is quiet (141)."""
    stdout = sys.stdout
    sys.stdout = _StandardOutput(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout = stdout


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        try:
            args = _parse(parser, argv)
        except SystemExit:  # --help, or bad arguments: what was printed must reach its reader too
            sys.stdout.flush()
            raise
        if getattr(args, "_run", None):
            code = int(args._run(args) or 0)
        else:
            parser.print_help()
            code = 2
        sys.stdout.flush()  # a full or closed output shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`hetvae info X | head`): stop quietly with the status of a process
        # killed by SIGPIPE, as Unix tools do; stdout goes to /dev/null so the exit flush is silent.
        _stdout_to_devnull()
        return 128 + 13
    except _OutputFailed as error:
        _stdout_to_devnull()
        return _fail(f"could not write to standard output ({error})")
    except KeyboardInterrupt:  # Ctrl-C: each file is written whole or not at all (hetvae.files), so nothing is torn
        print("interrupted", file=sys.stderr)
        return 128 + 2
    except OSError as error:  # what the commands do not name themselves (a file that cannot be read, say)
        return _fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else error)


if __name__ == "__main__":
    sys.exit(main())
