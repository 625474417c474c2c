"""The run folder of ``hetvae train``: the one place that names its files, and what training does
to it (claim it, find the checkpoint to resume from, checkpoint into it, export from it).
docs/runs.md describes the folder and its rules::

    config.yaml        the resolved config              metrics.jsonl   one record per log interval
    checkpoints/       step checkpoints (hetvae.checkpoint), tensors named <owner>.<key>
    samples/           uncertainty panels step_XXXXXXX.png and latest.png
    model.safetensors  the exported model (hetvae format)
    loss.safetensors   the NLL's learned log-scale parameters and the log_scale config section
    tensorboard/       scalars, when tensorboard is installed (train.logger)
    best/              with train.keep_best: the export of the best validation step, a run folder itself

This module logs nothing: the functions that do something worth a warning take ``warn``, the
caller's ``logger.warning``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.build import build_nll
from hetvae.checkpoint import (
    CORRUPT_GLOB,
    STATE_FILE,
    STEP_GLOB,
    TMP_GLOB,
    WEIGHTS_FILE,
    Checkpoint,
    folder_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_weights,
    save_checkpoint,
    set_aside,
    tensors_under,
)
from hetvae.config import RESOLVED_HEADER, Config, load_config, save_config, with_absolute_paths
from hetvae.convert import (
    CONFIG_KEY,
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    HETVAE_FILE,
    inspect_checkpoint,
    load_autoencoder,
    save_autoencoder,
)
from hetvae.files import CheckpointError, atomic_write_text, write_atomically
from hetvae.likelihood import likelihood_from_nll
from hetvae.loss import HeteroscedasticNLL
from hetvae.outputs import json_text
from hetvae.schema import ConfigError, config_to_dict, from_dict

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "HEAD_FILE",
    "LOG_SCALE_KEY",
    "LOSS_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "OWNERS",
    "RESUME_MAY_CHANGE",
    "SHARD_STREAM_KEY",
    "SAMPLES_DIR",
    "TENSORBOARD_DIR",
    "TRAIN_CONFIG_KEY",
    "TRAIN_STATE_KEYS",
    "BEST_DIR",
    "BEST_RECORD",
    "ResumePoint",
    "append_metrics",
    "best_value",
    "save_best",
    "check_resume_config",
    "checkpoints_dir",
    "claim",
    "export",
    "check_fresh_start",
    "find_checkpoint",
    "foreign_files",
    "is_run_folder",
    "latest_sample_file",
    "metrics_file",
    "newest_checkpoint",
    "read_run",
    "read_step",
    "sample_file",
    "save_step",
    "step_dir",
    "step_part",
    "step_tensors",
    "trim_metrics",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = HETVAE_FILE  # load_autoencoder(run_dir) reads it
LOSS_FILE = "loss.safetensors"
HEAD_FILE = "log_scale_head.safetensors"  # train.head_only: the head alone, with its base recorded
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
BEST_DIR = "best"
BEST_RECORD = "validation.json"
"""In ``best/``: the step and validation metrics of the model there."""
_LATEST_SAMPLE = "latest.png"

TRAIN_CONFIG_KEY = "hetvae_train_config"
"""safetensors metadata key holding the run's resolved config (JSON) in every checkpoint."""
LOG_SCALE_KEY = "hetvae_log_scale"
"""safetensors metadata key of ``loss.safetensors``: the run's ``log_scale`` section (JSON)."""
OWNERS = ("autoencoder", "ema", "loss", "discriminator")
"""The owners of a step checkpoint's tensors, each name prefixed ``<owner>.``."""

RESUME_MAY_CHANGE = frozenset({
    "out_dir",  # the run folder may have been moved
    # how long, and how often to log, sample and checkpoint
    "train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.resume", "train.max_nonfinite",
    # optimiser settings: a resume takes the configured ones (see optim.load_optimizer_state), e.g. a lower lr
    "train.lr", "train.betas", "train.weight_decay", "train.warmup_steps", "train.lr_schedule", "train.disc_lr",
    "train.log_scale_lr", "train.grad_clip", "train.head_grad_clip",
    "train.head_steps",  # e.g. a finished run resumed to fit its head on the converged mean
    "train.device",  # a run moved to another machine (a checkpoint is device-independent)
    # how, not what: same data, same gradients
    "train.gradient_checkpointing", "data.num_workers", "data.cache_mb",
    # watching, not training: validation (which draws no random number), where scalars go
    "train.val_every", "train.keep_best", "train.logger", "data.val_path",
})
"""Dotted config keys a resumed run may change; any other difference from the run's config is refused."""
TRAIN_STATE_KEYS = (
    "step", "generator_optimizer", "scaler", "rng", "nonfinite_total", "nonfinite_run", "last_finite_step",
)
"""Keys every training state (a step checkpoint's ``state.pt``) holds."""
SHARD_STREAM_KEY = "shard_stream"
"""Optional key of a training state, in runs that stream tar shards: ``{"world_size", "num_workers",
"origins": {"data" | "final": [epoch, batches]}}``, the layout of the readers a resume must keep to
continue each one's epoch (``num_workers`` as resolved, e.g. from ``auto``) and where each stream
last restarted (:class:`hetvae.shards.ShardStream`)."""

# what a run writes (and --overwrite deletes), relative to the run folder
_RUN_FILES = (METRICS_FILE, MODEL_FILE, LOSS_FILE, CONFIG_FILE, HEAD_FILE)
_RUN_GLOBS = (
    (CHECKPOINTS_DIR, STEP_GLOB), (CHECKPOINTS_DIR, TMP_GLOB), (CHECKPOINTS_DIR, CORRUPT_GLOB),
    (SAMPLES_DIR, "step_*.png"), (SAMPLES_DIR, _LATEST_SAMPLE), (TENSORBOARD_DIR, "events.out.tfevents.*"),
    (BEST_DIR, "*"),
)

Warn = Callable[..., object]


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The checkpoint folder of ``step`` (whether or not it exists)."""
    return checkpoints_dir(run_dir) / folder_name(step)


def metrics_file(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / METRICS_FILE


def sample_file(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step_{step:07d}.png"


def latest_sample_file(run_dir: str | os.PathLike) -> Path:
    """A copy of the newest panel."""
    return Path(run_dir) / SAMPLES_DIR / _LATEST_SAMPLE


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's newest complete checkpoint folder, or None."""
    return latest_checkpoint(checkpoints_dir(run_dir))


# ---------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """What :func:`find_checkpoint` found: the ``checkpoint`` to resume from (None: a fresh start)
    and the unreadable newer ones it ``skipped``, newest first, with why."""

    checkpoint: Checkpoint | None = None
    skipped: list[tuple[Path, Exception]] = field(default_factory=list)


def find_checkpoint(run_dir: str | os.PathLike, *, resume: bool | None, policy: str, overwrite: bool) -> ResumePoint:
    """The checkpoint a run in ``run_dir`` continues from (loaded), after the rules of docs/runs.md.

    ``resume``: True insists on one, False refuses a folder holding any, None follows ``policy``
    (``train.resume``: ``"auto"`` or ``"never"``); ``overwrite`` starts over. Unreadable newer
    checkpoints are skipped for the newest intact one.

    Raises:
        ValueError: ``resume`` and ``overwrite`` both set.
        FileExistsError: checkpoints there and resuming is off.
        FileNotFoundError: ``resume=True`` and none there.
        CheckpointError: checkpoints there but none intact.
    """
    run_dir = Path(run_dir)
    ckpt_dir = checkpoints_dir(run_dir)
    found = list_checkpoints(ckpt_dir)
    if overwrite:
        if resume is True:
            raise ValueError("resume=True (--resume) and overwrite=True (--overwrite) contradict each other")
        return ResumePoint()
    if resume is False or (resume is None and policy == "never"):
        if found:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints (newest: {found[-1][1].name}) and resuming is off: "
                "resume it (--resume or train.resume=auto), start over there with --overwrite (deletes that "
                "run's checkpoints, metrics, samples and exports), or choose another out_dir"
            )
        return ResumePoint()
    if not found:
        if resume is True:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
        return ResumePoint()
    bad: list[tuple[Path, Exception]] = []
    for _, path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
            missing = [k for k in TRAIN_STATE_KEYS if k not in ckpt.state]
            if missing:
                raise CheckpointError(f"{path / STATE_FILE}: not a training state (lacks {', '.join(missing)})")
        except (CheckpointError, FileNotFoundError) as exc:
            bad.append((path, exc))
            continue
        return ResumePoint(checkpoint=ckpt, skipped=bad)
    raise CheckpointError(
        f"no intact checkpoint under {ckpt_dir}: "
        + "; ".join(f"{p.name}: {e}" for p, e in bad)
        + ". Move the folder away to keep it, then start over with --overwrite, or choose another out_dir"
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(cfg: Config, ckpt: Checkpoint) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``ckpt`` with a ``cfg`` that differs from the run's beyond
    :data:`RESUME_MAY_CHANGE` (a :class:`~hetvae.config.ConfigError` naming the keys); returns the
    allowed changes as ``{key: (old, new)}``, ``out_dir`` left out."""
    text = ckpt.metadata.get(TRAIN_CONFIG_KEY)
    if text is None:  # not written by Trainer: only the weights' shapes can be checked
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{ckpt.path / WEIGHTS_FILE}: corrupt {TRAIN_CONFIG_KEY} metadata: {exc}") from None
    try:  # defaults filled in, values normalised as today's schema reads them, paths absolute as stored today
        raw = config_to_dict(with_absolute_paths(from_dict(Config, raw)))
    except (ConfigError, TypeError):
        pass  # a schema that has moved on: compare the keys both sides still have
    saved = _flatten(json.loads(json.dumps(raw)))
    now = _flatten(json.loads(json.dumps(config_to_dict(cfg))))
    differ = sorted(k for k in now if k in saved and saved[k] != now[k])
    refused = [k for k in differ if k not in RESUME_MAY_CHANGE]
    if refused:
        details = "; ".join(f"{k}: the run used {saved[k]!r}, this config says {now[k]!r}" for k in refused)
        raise ConfigError(
            ", ".join(refused),
            f"resuming the run in {Path(cfg.out_dir)} (checkpoint {ckpt.path.name}) with a config that differs from "
            f"the run's: {details}. A resume may change only the steps, the logging and checkpoint cadence and "
            f"the optimiser settings ({', '.join(sorted(RESUME_MAY_CHANGE))}). To train this config, give it a "
            "new out_dir, or start over in this folder with --overwrite (train(..., overwrite=True)), which "
            "deletes the previous run's checkpoints, metrics, samples and exported model",
        )
    return {k: (saved[k], now[k]) for k in differ if k != "out_dir"}


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------


def trim_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the records past ``step`` (written by a run killed after its last checkpoint).

    Atomic: a kill during the rewrite leaves the old file, never an empty or half one."""
    path = metrics_file(run_dir)
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a half-written last line
    new = "".join(line + "\n" for line in kept)
    if new != text:
        atomic_write_text(path, new)


def append_metrics(run_dir: str | os.PathLike, record: dict[str, float]) -> None:
    with open(metrics_file(run_dir), "a", encoding="utf-8") as f:
        f.write(json_text(record, indent=None) + "\n")


# ---------------------------------------------------------------------------------------------
# claiming the folder
# ---------------------------------------------------------------------------------------------


def foreign_files(run_dir: str | os.PathLike) -> list[str]:
    """What in ``run_dir`` a run did not write but a new run there would replace or shadow: a
    ``config.yaml`` that :func:`hetvae.config.save_config` did not write (a hand-written one), a
    ``model.safetensors`` with no ``loss.safetensors`` beside it (an export, not a run's), a
    diffusers export (a run's ``model.safetensors`` would be read instead of it)."""
    run_dir = Path(run_dir)
    found = []
    config = run_dir / CONFIG_FILE
    if config.is_file():
        try:
            with config.open(encoding="utf-8", errors="replace") as f:
                ours = f.readline().rstrip("\n") == RESOLVED_HEADER
        except OSError:
            ours = False
        if not ours:
            found.append(f"{CONFIG_FILE} (not a config `hetvae train` wrote)")
    if (run_dir / MODEL_FILE).exists() and not (run_dir / LOSS_FILE).is_file():
        found.append(f"{MODEL_FILE} (an export, not a run's: no {LOSS_FILE} beside it)")
    diffusers = [name for name in (DIFFUSERS_CONFIG, *DIFFUSERS_WEIGHTS) if (run_dir / name).is_file()]
    if diffusers:
        found.append(f"{', '.join(diffusers)} (a diffusers export, which a run's {MODEL_FILE} would shadow)")
    return found


def check_fresh_start(run_dir: str | os.PathLike) -> None:
    """Refuse a fresh run (or ``--overwrite``) in a folder holding files a run did not write
    (:func:`foreign_files`): a user's files are never replaced. Raises ``FileExistsError``."""
    found = foreign_files(run_dir)
    if found:
        raise FileExistsError(
            f"{run_dir} holds files that `hetvae train` did not write and a run there would replace or shadow: "
            f"{'; '.join(found)}. Choose another out_dir (--out), or move those files away"
        )


def claim(
    run_dir: str | os.PathLike, cfg: Config, *, overwrite: bool, fresh: bool, corrupt: list[Path], warn: Warn
) -> None:
    """Make ``run_dir`` this run's, once its first step has trained: with ``overwrite`` delete a
    previous run's files (nothing else), on a ``fresh`` start replace a stale ``metrics.jsonl``,
    rename the ``corrupt`` checkpoints ``corrupt-step_...``, and write ``config.yaml``. A failure
    removes ``run_dir`` again if this call created it (and it is empty)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_previous_run(run_dir, warn)
        elif fresh and metrics_file(run_dir).is_file():
            warn("%s: replacing metrics.jsonl of an earlier start that left no checkpoint", run_dir)
            metrics_file(run_dir).unlink()
        for path in corrupt:
            if path.is_dir():
                warn("unreadable checkpoint %s renamed %s", path, set_aside(path).name)
        _write_config(run_dir, cfg)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: never a file this run did not write
        raise


def _remove_previous_run(run_dir: Path, warn: Warn) -> None:
    removed = 0
    for name in _RUN_FILES:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed += 1
    for folder, pattern in _RUN_GLOBS:
        for path in (run_dir / folder).glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    for folder in {f for f, _ in _RUN_GLOBS}:
        with contextlib.suppress(OSError):
            (run_dir / folder).rmdir()  # only if nothing else is in it
    if removed:
        warn("--overwrite: deleted %d files or folders of the previous run in %s", removed, run_dir)


def _write_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / CONFIG_FILE
    try:
        save_config(cfg, path)
    except OSError as exc:  # the atomic writer has removed its temporary file
        detail = f"could not write {path}: {exc.strerror or exc}; no half-written file was left"
        raise OSError(exc.errno, detail) from exc


# --- reading what a run wrote ---------------------------------------------------------------


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder ``hetvae train`` exported into (its config and model are there)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in (CONFIG_FILE, MODEL_FILE))


def read_step(path: Path) -> tuple[AutoencoderKL, HeteroscedasticNLL]:
    """The model and likelihood a run would have exported at the step saved in ``path``: the EMA
    weights when the run keeps them (as ``model.safetensors``), else the trained ones, and the
    learned log-scale. Reads ``weights.safetensors`` only (never the training state)."""
    tensors, metadata = read_checkpoint_weights(path)
    weights = path / WEIGHTS_FILE
    missing = [k for k in (CONFIG_KEY, TRAIN_CONFIG_KEY) if k not in metadata]
    if missing:
        raise CheckpointError(f"{weights}: lacks the {' and '.join(missing)} metadata that `hetvae train` writes")
    try:
        model_config = AutoencoderConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
        cfg = from_dict(Config, json.loads(metadata[TRAIN_CONFIG_KEY]))
    except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights}: its config metadata cannot be read by this version ({exc})") from exc
    owner = "ema" if any(k.startswith("ema.") for k in tensors) else "autoencoder"
    model = AutoencoderKL(model_config)
    nll = build_nll(cfg, model)
    for module, name in ((model, owner), (nll, "loss")):
        try:
            module.load_state_dict(step_part(tensors, name), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{weights}: the {name}.* tensors do not fit the config stored with them: {str(exc).splitlines()[-1].strip()}"
            ) from exc
    return model, nll


def read_run(path: Path) -> tuple[AutoencoderKL, HeteroscedasticNLL]:
    """The exported model of run folder ``path`` and the likelihood it trained: the config's
    ``log_scale`` with the learned value(s) of ``loss.safetensors``."""
    cfg = load_config(path / CONFIG_FILE)
    model = load_autoencoder(path / MODEL_FILE)
    nll = build_nll(cfg, model)
    loss_file = path / LOSS_FILE
    if loss_file.is_file():
        try:
            state = load_file(str(loss_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{loss_file}: cannot read the run's learned log-scale, the file is truncated or corrupt ({e})") from e
        try:
            nll.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"{loss_file} does not fit log_scale in {path / CONFIG_FILE} "
                f"({nll.granularity}, {model.config.out_channels} channels): {str(e).splitlines()[-1].strip()}"
            ) from e
    elif list(nll.parameters()):
        raise FileNotFoundError(
            f"{loss_file} is missing: the run's {nll.granularity!r} log-scale was learned and lives there"
        )
    return model, nll


# ---------------------------------------------------------------------------------------------
# step checkpoints and the export
# ---------------------------------------------------------------------------------------------


def step_tensors(modules: dict[str, nn.Module | None]) -> dict[str, Tensor]:
    """The tensors of a step checkpoint: each module's state dict under ``<owner>.``, owners from
    :data:`OWNERS` in the order given; a None module is left out."""
    unknown = set(modules) - set(OWNERS)
    if unknown:
        raise ValueError(f"unknown owner(s) {sorted(unknown)}; expected some of {OWNERS}")
    return {f"{owner}.{k}": v for owner, module in modules.items() if module is not None
            for k, v in module.state_dict().items()}


def step_part(tensors: dict[str, Tensor], owner: str) -> dict[str, Tensor]:
    """The tensors of one owner of a step checkpoint, names without ``<owner>.``."""
    return tensors_under(tensors, f"{owner}.")


def save_step(
    run_dir: str | os.PathLike,
    step: int,
    *,
    cfg: Config,
    model_config: AutoencoderConfig,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
) -> Path:
    """Write step ``step``'s checkpoint with both configs in its metadata, then keep the newest
    ``train.keep_checkpoints``. Raises :class:`~hetvae.files.CheckpointError` when it cannot be written."""
    metadata = {
        TRAIN_CONFIG_KEY: json.dumps(config_to_dict(cfg)),
        CONFIG_KEY: json.dumps(model_config.to_dict()),
        "step": str(step),
    }
    path = save_checkpoint(checkpoints_dir(run_dir), step, tensors=tensors, metadata=metadata, state=state)
    prune_checkpoints(checkpoints_dir(run_dir), cfg.train.keep_checkpoints)
    return path


def _stored_calibration(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(calibration, step)`` of the run's current export: the post-hoc calibration recorded in
    ``model.safetensors`` (``hetvae calibrate``) and the step ``loss.safetensors`` says it was
    exported at; ``(None, None)`` when there is none or it cannot be read (the export replaces it)."""
    try:
        info = inspect_checkpoint(run_dir / MODEL_FILE)
        with safe_open(str(run_dir / LOSS_FILE), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (CheckpointError, OSError, SafetensorError, ValueError):
        return None, None
    likelihood = info.config.likelihood
    return (likelihood.calibration if likelihood is not None else None), step


def export(
    run_dir: str | os.PathLike, model: AutoencoderKL, nll: HeteroscedasticNLL, *, cfg: Config, step: int,
    warn: Warn | None = None,
) -> Path:
    """Write ``model.safetensors`` (``model`` in hetvae format, ``nll``'s likelihood in its config)
    and ``loss.safetensors`` (``nll``'s parameters, the ``log_scale`` section, the step), each
    atomically; returns the model file.

    A post-hoc calibration stored in the previous export (``hetvae calibrate RUN``) is kept when that
    export is of the same ``step`` (a resume with nothing left to train changes no weight); otherwise
    it described a scale that training has since changed, and it is dropped with a ``warn``ing that
    says to calibrate again."""
    run_dir = Path(run_dir)
    likelihood = likelihood_from_nll(nll)
    calibration, calibrated_step = _stored_calibration(run_dir)
    if calibration is not None:
        if calibrated_step == str(step):
            likelihood = dataclasses.replace(likelihood, calibration=calibration)
        elif warn is not None:
            warn("%s carried a post-hoc calibration of the model exported at step %s; the model trained on to "
                 "step %d, so the new export drops it (run `hetvae calibrate %s` again)",
                 run_dir / MODEL_FILE, calibrated_step, step, run_dir)
    model_file = save_autoencoder(model, run_dir / MODEL_FILE, format="hetvae", likelihood=likelihood)
    loss_sd = {k: v.detach().cpu().contiguous() for k, v in nll.state_dict().items()}
    meta = {LOG_SCALE_KEY: json.dumps(config_to_dict(cfg.log_scale)), "step": str(step)}
    write_atomically(run_dir / LOSS_FILE, lambda tmp: save_file(loss_sd, str(tmp), metadata=meta))
    return model_file


# ---------------------------------------------------------------------------------------------
# the best validation step (train.keep_best)
# ---------------------------------------------------------------------------------------------


def save_best(
    run_dir: str | os.PathLike, model: AutoencoderKL, nll: HeteroscedasticNLL, *, cfg: Config, step: int,
    metrics: dict[str, float],
) -> Path:
    """Replace ``RUN/best/`` with the export of ``model`` and ``nll`` at ``step`` (:func:`export`), the
    run's ``config.yaml`` (so ``best/`` is a run folder: ``hetvae eval RUN/best``) and
    :data:`BEST_RECORD` (``step`` and ``metrics``). The new folder is written whole under a temporary
    name, then swapped in with renames: a crash leaves the previous ``best/`` (or, between the two
    renames, ``.old-best-<pid>/``) intact, never a mix of two steps. Returns ``RUN/best``."""
    run_dir = Path(run_dir)
    final = run_dir / BEST_DIR
    tmp = run_dir / f".tmp-{BEST_DIR}-{os.getpid()}"
    old = run_dir / f".old-{BEST_DIR}-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        export(tmp, model, nll, cfg=cfg, step=step)
        _write_config(tmp, cfg)
        atomic_write_text(tmp / BEST_RECORD, json_text({"step": step, **metrics}))
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def best_value(run_dir: str | os.PathLike, key: str) -> float | None:
    """``key`` of ``RUN/best/`` 's :data:`BEST_RECORD`, or ``None`` when there is no readable one."""
    try:
        record = json.loads((Path(run_dir) / BEST_DIR / BEST_RECORD).read_text(encoding="utf-8"))
        return float(record[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
