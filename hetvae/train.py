"""Training and fine-tuning of a heteroscedastic autoencoder from a :class:`hetvae.config.Config`.

``train(cfg)`` (or ``hetvae train CONFIG``) builds the model and objective with ``build_model`` /
``build_objective`` and runs ``cfg.train.steps`` optimiser steps, then ``train.head_steps`` that fit
the log-scale alone; docs/config.md describes each ``train.*`` setting. docs/runs.md says what a run
writes, how it resumes, what a failure or a signal leaves behind, and the exit codes. The pieces
live beside this module: :mod:`hetvae.runs` (the run folder), :mod:`hetvae.optim` (parameter and
clip groups, AdamW, the lr schedule, EMA), :mod:`hetvae.distributed` (torchrun, the data order).

Determinism: the data and posterior noise of step ``s`` are a pure function of ``(seed, s)``, so a
resumed run continues exactly: on the CPU, N steps + resume + N steps give bit-identical weights to
2N steps, and a 2-process run matches a 1-process one up to float summation order. Tar shards
(:mod:`hetvae.shards`) are streamed by world size x data workers readers, and their batches depend
on that count too: a resume keeps the run's worker count (checkpointed), and one on another world
size restarts the stream at the next epoch, with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetvae import optim, runs
from hetvae.attach import save_log_scale_head
from hetvae.autoencoder import AutoencoderKL, Reconstruction
from hetvae.build import build_model, build_objective
from hetvae.checkpoint import Checkpoint
from hetvae.config import Config, final_batch_size, with_absolute_paths
from hetvae.data import ImageDataset, build_dataset, resolve_num_workers
from hetvae.distributed import all_reduce_mean, local_batches, setup_distributed, stream_batches
from hetvae.distributions import DiagonalGaussian
from hetvae.files import CheckpointError
from hetvae.functional import coupled_mean
from hetvae.loggers import Loggers
from hetvae.schema import config_to_dict
from hetvae.shards import (ShardStream, augment_of, check_shards, expand_shards, first_crops, names_shards,
                           shard_workers)
from hetvae.validation import VAL_PREFIX, validate, validation_images
from hetvae.viz import save_uncertainty_panel

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]

logger = logging.getLogger("hetvae.train")

_PANEL_IMAGES = 4
_PANEL_RESOLUTION = 128  # side of the held-out crops in the training panels
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``train.max_nonfinite`` consecutive non-finite steps, or because the
    weights themselves stopped being finite (nothing non-finite is checkpointed or exported)."""


@dataclass
class TrainResult:
    """What :func:`train` returns. ``step``: steps done; ``interrupted``: stopped by a signal;
    ``model_file``: the exported ``model.safetensors`` (None on ranks other than 0);
    ``logs``: the last logged metrics; ``signal``: the number of the signal that stopped the run
    (None if it finished, or if the stop came from another rank)."""

    run_dir: Path
    step: int
    interrupted: bool = False
    model_file: Path | None = None
    logs: dict[str, float] = field(default_factory=dict)
    signal: int | None = None


class _Generator(nn.Module):
    """The autoencoder's training forward with the posterior noise passed in.

    Taking ``eps`` from outside lets every DDP rank draw the noise of the whole global batch from
    one seeded generator and keep its slice, so the noise does not depend on the world size.
    Returns plain tensors ``(mean, log_scale | None, coupling | None, moments)`` for DDP (``coupling``:
    the head's colour-coupling maps, ``log_scale.channel_coupling: pixel``).
    """

    def __init__(self, autoencoder: AutoencoderKL, *, freeze_encoder: bool) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.freeze_encoder = freeze_encoder

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        rec = self.autoencoder.decode(z)
        return rec.mean, rec.log_scale, rec.coupling, posterior.parameters


@contextlib.contextmanager
def _quiet_data():
    """Neither hetvae.data's per-image log lines nor its warnings while a data set other than the
    training one is built (the sample panel's): they would read as if training skipped the images."""
    def drop(record: logging.LogRecord) -> bool:
        return False

    data_logger = logging.getLogger("hetvae.data")
    data_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        data_logger.removeFilter(drop)


class Trainer:
    """Everything a run needs, built from ``cfg``; :meth:`run` trains.

    Args:
        cfg: the run's config.
        out_dir: replaces ``cfg.out_dir`` (the resolved config records it).
        resume: True: continue from the newest checkpoint (error if none); False: start fresh;
            None: follow ``cfg.train.resume``.
        progress: show a tqdm bar (rank 0).
        overwrite: start fresh even where ``out_dir`` holds a previous run; its files are deleted
            (:func:`hetvae.runs.claim`) once the first step has trained. Contradicts ``resume=True``.

    Raises (besides config errors):
        ConfigError: resuming with a config that differs in a key outside
            :data:`~hetvae.runs.RESUME_MAY_CHANGE`.
        CheckpointError: no checkpoint can be read, or the checkpoint does not fit the model.

    Under ``torchrun`` (``WORLD_SIZE > 1``): DistributedDataParallel (gloo on CPU, NCCL on GPU),
    ``batch_size`` is the global micro-batch and must divide by the world size, all file output on
    rank 0 only. The loss's log-scales and the discriminator stay outside DDP and have their
    gradients averaged by hand; the posterior noise of the whole global batch comes from one
    seeded generator on every rank (each keeps its slice). Two things remain per rank: the
    discriminator's BatchNorm statistics (rank 0's are saved; ``disc_norm: actnorm`` avoids them)
    and the adaptive GAN weight, computed from each rank's local gradient norms.

    Attributes of interest to tests and tools: ``model`` (the autoencoder), ``objective``,
    ``ema`` (or None), ``g_opt``, ``d_opt``, ``step``, ``run_dir``.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        out_dir: str | os.PathLike | None = None,
        resume: bool | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        if out_dir is not None:
            cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
        cfg = with_absolute_paths(cfg)  # the run's config.yaml names the same files from any folder
        self.cfg = cfg
        t = cfg.train
        self.dist = setup_distributed(t.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.out_dir).expanduser()
        self.progress = progress
        if t.batch_size % self.dist.world_size:
            raise ValueError(
                f"train.batch_size={t.batch_size} is the global micro-batch and must divide by the "
                f"world size {self.dist.world_size}"
            )

        # before anything the config builds (the model, the data sets): a resume that changes what it may not
        # is refused naming the keys, not with the error of a model or data set built from the new values
        checkpoint = self._pick_checkpoint(resume, overwrite)
        changes = runs.check_resume_config(cfg, checkpoint) if checkpoint is not None else {}

        # identical initialisation on every rank; DDP also broadcasts rank 0's weights
        torch.manual_seed(t.seed)
        self.model = build_model(cfg).to(self.device)
        self.objective = build_objective(cfg, self.model).to(self.device)
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if t.decoder_only:
            # the latent space stays the pretrained one: encoder and quant_conv get no gradient
            self.model.encoder.requires_grad_(False)
            if self.model.quant_conv is not None:
                self.model.quant_conv.requires_grad_(False)
        if t.head_only:
            self._freeze_all_but_head()
        self.discriminator = self.objective.discriminator
        self.ema = optim.EMA(self.model, decay=t.ema_decay) if t.ema_decay is not None else None
        self.clip_groups = optim.clip_groups(t, self.model, self.objective.nll)
        self.g_opt = optim.adamw(optim.parameter_groups(t, self.model, self.objective.nll), lr=t.lr, betas=t.betas)
        self.d_params = self.objective.discriminator_parameters()
        self.d_opt = (
            optim.adamw(
                optim.discriminator_groups(t, self.d_params),
                lr=t.disc_lr or t.lr,
                betas=t.betas,
                weight_decay=t.weight_decay,
            )
            if self.d_params
            else None
        )
        self.generator = _Generator(self.model, freeze_encoder=t.decoder_only or t.head_only)
        self.forward_module: nn.Module = self.generator
        if self.dist.enabled:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.generator, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            # the loss's log-scales and the discriminator live outside DDP: synchronised by hand
            self.dist.broadcast(list(self.objective.nll.state_dict().values()) + self._discriminator_state())

        self.amp_dtype = _DTYPES[t.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(t.seed + 1)  # not the init seed: the noise stream is its own

        # tar shards are streamed (hetvae.shards); anything else is a data set read by index
        self.shards = expand_shards(cfg.data.path) if names_shards(cfg.data.path) else None
        self.dataset: ImageDataset | None = None
        if self.shards is None:
            self.dataset = build_dataset(cfg.data, train=True, seed=t.seed)
        # the last train.final_steps: larger crops, the same pixels per step (train.final_resolution)
        self.final_dataset: ImageDataset | None = None
        self.final_batch = t.batch_size
        if t.final_steps:
            if self.shards is None:
                self.final_dataset = build_dataset(
                    dataclasses.replace(cfg.data, resolution=t.final_resolution), train=True, seed=t.seed
                )
            self.final_batch = final_batch_size(cfg)
            if self.final_batch % self.dist.world_size:
                raise ValueError(
                    f"train.final_resolution={t.final_resolution} gives global batches of {self.final_batch} crops, "
                    f"which must divide by the world size {self.dist.world_size}"
                )
        if self.shards is not None:
            self._setup_shards()
        for dataset in (self.dataset, self.final_dataset):
            if dataset is not None:  # read lazily: fail now, not inside a loader worker, if nothing is usable
                dataset.first_usable()
        self._setup_validation()
        # train.logger: opened at the first record (rank 0); a logger that cannot be had fails here
        self.loggers = (Loggers(t.logger, self.run_dir, tensorboard_dir=self.run_dir / runs.TENSORBOARD_DIR,
                                config=config_to_dict(cfg), warn=logger.warning) if self.dist.main else None)
        if self.dist.main:
            logger.info("%s", self._batch_line())
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.last_finite_step: int | None = None
        self._stop_requested = False
        self._stop_signal: int | None = None
        self.overwrite = overwrite
        self._started = False  # outputs exist (config.yaml written): set after the first trained step
        self._resumed_from: Path | None = None
        self._step_start: dict[str, Any] | None = None  # RNG etc. at the start of the step in progress
        self._updating = False  # inside the optimiser / EMA update (weights possibly half-written)
        # the metrics interval in progress (checkpointed, so a resumed run averages the same steps)
        self._interval: dict[str, Any] = {"sums": {}, "counts": {}, "steps": 0}
        self._head_phase = False  # in the head-only phase (train.head_steps): the autoencoder is frozen

        if checkpoint is not None:
            self._restore(checkpoint, changes)

    def _batch_line(self) -> str:
        """What ``train.batch_size`` means in this run, said plainly at the start (it is the global
        micro-batch, not the per-process one of diffusers' and timm's scripts)."""
        t, world = self.cfg.train, self.dist.world_size
        per_step = t.batch_size * t.grad_accum
        if world > 1:
            where = (f"the global micro-batch, split over {world} processes: {t.batch_size // world} images per "
                     f"process (diffusers' --train_batch_size and timm's --batch-size count per process)")
        else:
            where = "1 process"
        accum = f" x train.grad_accum={t.grad_accum}" if t.grad_accum > 1 else ""
        return f"batch: train.batch_size={t.batch_size} images is {where}; {per_step} images per optimizer step{accum}"

    def _setup_validation(self) -> None:
        """The validation images (:func:`hetvae.validation.validation_images`), checked on every rank
        before anything trains, and the best validation bits/dim so far (``train.keep_best``)."""
        t, main = self.cfg.train, self.dist.main
        wanted = t.val_every > 0 or self.cfg.data.val_path is not None
        self.val_images = validation_images(self.cfg) if wanted else None
        self.best_bpd: float | None = None
        if t.val_every and self.val_images is None and main:
            logger.warning("train.val_every=%d: no validation images (data.path is set, data.val_path is not): "
                           "set data.val_path to held-out photographs to validate", t.val_every)
        if t.keep_best and not (t.val_every and self.val_images is not None) and main:
            logger.warning("train.keep_best: nothing to keep without validation (train.val_every and data.val_path)")

    # -- parameters / state ------------------------------------------------------------------

    def _head_parameters(self) -> set[int]:
        decoder = self.model.decoder
        return {id(p) for m in (decoder.log_scale_trunk, decoder.log_scale_head) if m is not None for p in m.parameters()}

    def _freeze_all_but_head(self) -> None:
        """``train.head_only``: every weight of the autoencoder but the log-scale head's, and the loss's own
        parameters, leave the graph before the optimiser is built (no gradient, no optimiser state)."""
        keep = self._head_parameters()
        for p in self.model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        self.objective.nll.requires_grad_(False)
        # the frozen modules' gradient checkpointing would only recompute what needs no gradient
        if self.cfg.train.gradient_checkpointing:
            self.model.disable_gradient_checkpointing()

    def _discriminator_state(self) -> list[Tensor]:
        return [] if self.discriminator is None else list(self.discriminator.state_dict().values())

    def _tensors(self) -> dict[str, Tensor]:
        return runs.step_tensors({
            "autoencoder": self.model,
            "ema": self.ema.module if self.ema is not None else None,
            "loss": self.objective.nll,
            "discriminator": self.discriminator,
        })

    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "noise": self.noise.get_state(),
            "noise_device": self.noise.device.type,
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "world_size": self.dist.world_size,
            "generator_optimizer": self.g_opt.state_dict(),
            "discriminator_optimizer": self.d_opt.state_dict() if self.d_opt is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "last_finite_step": -1 if self.last_finite_step is None else self.last_finite_step,
            "log_interval": copy.deepcopy(self._interval),
            "head_phase": self._head_phase,
            **({runs.SHARD_STREAM_KEY: {
                "world_size": self.dist.world_size,
                "num_workers": self.shard_num_workers,
                "origins": {name: list(origin) for name, origin in self.shard_origins.items()},
            }} if self.shards is not None else {}),
        }

    def _pick_checkpoint(self, resume: bool | None, overwrite: bool) -> Checkpoint | None:
        """The checkpoint to resume from (loaded), or None for a fresh start."""
        found = runs.find_checkpoint(self.run_dir, resume=resume, policy=self.cfg.train.resume, overwrite=overwrite)
        if found.skipped and self.dist.main:
            logger.warning(
                "skipping unreadable checkpoint(s) %s; resuming from the previous intact one, %s (the unreadable "
                "ones are renamed corrupt-step_... once training starts)",
                "; ".join(f"{p} ({e})" for p, e in found.skipped), found.checkpoint.path,
            )
        self._corrupt: list[Path] = [p for p, _ in found.skipped]  # newer than the one resumed from
        if found.checkpoint is None:
            runs.check_fresh_start(self.run_dir)
        return found.checkpoint

    def _restore_noise(self, rng: dict[str, Any], path: Path) -> None:
        """Continue the posterior-noise stream of the checkpoint, or, when the run resumes on another
        kind of device (a CPU generator's state cannot seed a CUDA one), restart it from
        ``train.seed`` and the step: the run goes on, but is no longer bit-identical to one that was
        never interrupted."""
        saved = rng["noise"]
        saved_device = rng.get("noise_device")  # absent in checkpoints of earlier releases
        if saved_device is None and saved.numel() == self.noise.get_state().numel():
            saved_device = self.noise.device.type
        if saved_device == self.noise.device.type:
            self.noise.set_state(saved)
            return
        self.noise.manual_seed(self.cfg.train.seed + 1 + self.step)
        if self.dist.main:
            logger.warning(
                "%s: its posterior-noise stream was drawn on %s, this run draws it on %s; restarted from "
                "train.seed and step %d (the run continues, not bit-identical to an uninterrupted one)",
                path, saved_device or "another device", self.noise.device.type, self.step,
            )

    def _restore(self, ckpt: Checkpoint, changes: dict[str, tuple[Any, Any]]) -> None:
        """Load ``ckpt`` (whose config :func:`hetvae.runs.check_resume_config` accepted with ``changes``)."""
        path = ckpt.path
        if self.dist.main:
            logger.info("resuming from %s (step %d)", path, ckpt.step)
            if changes:
                logger.warning(
                    "resuming with changed settings (the checkpoints keep the config each was written with): %s",
                    "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                )

        def part(owner: str) -> dict[str, Tensor]:
            return runs.step_part(ckpt.tensors, owner)

        try:
            self.model.load_state_dict(part("autoencoder"), strict=True)
            if self.ema is not None:
                ema = part("ema")
                # a run that turns EMA on at resume starts the average from the current weights
                self.ema.module.load_state_dict(ema or self.model.state_dict(), strict=True)
            self.objective.nll.load_state_dict(part("loss"), strict=True)
            if self.discriminator is not None:
                disc = part("discriminator")
                if disc:
                    self.discriminator.load_state_dict(disc, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"{path}: the checkpoint does not fit the configured model: {detail}") from None
        state = ckpt.state
        optim.load_optimizer_state(self.g_opt, state["generator_optimizer"])
        if self.d_opt is not None and state.get("discriminator_optimizer") is not None:
            optim.load_optimizer_state(self.d_opt, state["discriminator_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self._restore_noise(state["rng"], path)
        cuda_states = state["rng"].get("cuda")
        if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        if state.get("head_phase", False):
            self._enter_head_phase(from_ema=False)  # the checkpoint holds the weights it began with
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.last_finite_step = None if state["last_finite_step"] < 0 else int(state["last_finite_step"])
        interval = state.get("log_interval")
        if isinstance(interval, dict) and {"sums", "counts", "steps"} <= interval.keys():
            self._interval = copy.deepcopy(interval)
        elif self.dist.main and not self._records_after(self.step):
            logger.warning("%s predates saved metric intervals: the first record averages the steps since the resume "
                           "(see steps_averaged)", path)
        if self.shards is not None:
            self._restore_stream(state, path)
        self._resumed_from = path
        if self.dist.main:
            runs.trim_metrics(self.run_dir, self.step)
            if self.cfg.train.keep_best:
                self.best_bpd = runs.best_value(self.run_dir, VAL_PREFIX + "nll_bpd")

    # -- tar shards ----------------------------------------------------------------------------

    def _setup_shards(self) -> None:
        """The layout of the shard stream: its workers (the same on every rank), checked against the shards."""
        d, t, world = self.cfg.data, self.cfg.train, self.dist.world_size
        workers = shard_workers(resolve_num_workers(d.num_workers), len(self.shards), world,
                                auto=d.num_workers == "auto")
        self.shard_num_workers = self.dist.minimum(workers)
        # each stream's restart point (epoch, batches taken): moved only by a resume on another world size
        self.shard_origins: dict[str, tuple[int, int]] = {"data": (0, 0), "final": (0, 0)}
        if d.samples_per_epoch is not None and self.dist.main:
            logger.warning("data.samples_per_epoch=%d does not apply to tar shards (an epoch reads every sample of the "
                           "shards once); ignored", d.samples_per_epoch)
        check_shards(self.shards, global_batch=t.batch_size, slots=world * max(1, self.shard_num_workers),
                     workers=max(1, self.shard_num_workers), world_size=world)

    def _stream_at(self, step: int) -> tuple[str, int]:
        """The stream optimizer step ``step`` reads (``"data"``, or ``"final"`` for the large crops of
        ``train.final_steps``) and the batches this rank has taken from it before that step."""
        t, final_from = self.cfg.train, self._final_from
        if final_from is not None and step >= final_from:
            return "final", (step - final_from) * t.grad_accum
        return "data", step * t.grad_accum

    def _shard_stream(self, name: str, *, start: int, rank: int | None = None, world_size: int | None = None,
                      num_workers: int | None = None) -> ShardStream:
        d, t = self.cfg.data, self.cfg.train
        world = self.dist.world_size if world_size is None else world_size
        final = name == "final"
        return ShardStream(
            self.shards,
            augment=augment_of(d, t.final_resolution if final else d.resolution),
            batch=(self.final_batch if final else t.batch_size) // world,
            seed=t.seed,
            start=start,
            rank=self.dist.rank if rank is None else rank,
            world_size=world,
            num_workers=self.shard_num_workers if num_workers is None else num_workers,
            shuffle_shards=d.shuffle_shards,
            procedural=d.procedural,
            origin=self.shard_origins[name],
        )

    def _restore_stream(self, state: dict[str, Any], path: Path) -> None:
        """Continue the shard stream of the checkpoint: with its worker count where the world size is
        the run's (every reader then resumes where it stopped), else from the next epoch."""
        saved = state.get(runs.SHARD_STREAM_KEY) or {}
        for name, origin in (saved.get("origins") or {}).items():
            if name in self.shard_origins:
                self.shard_origins[name] = (int(origin[0]), int(origin[1]))
        world_then = int(saved.get("world_size", state.get("world_size", self.dist.world_size)))
        workers_then = int(saved.get("num_workers", self.shard_num_workers))
        main, world = self.dist.main, self.dist.world_size
        if world_then == world:
            if workers_then != self.shard_num_workers and main:
                logger.info("data.num_workers: the tar-shard stream keeps the run's %d worker(s), on which each "
                            "reader's place depends (this config gives %d)", workers_then, self.shard_num_workers)
            self.shard_num_workers = workers_then
            return
        name, taken = self._stream_at(self.step)
        origin = self.shard_origins[name]
        if taken == origin[1]:  # nothing read since the stream's start: it starts as laid out now
            return
        then = self._shard_stream(name, start=taken, rank=0, world_size=world_then, num_workers=workers_then)
        furthest = then.furthest_epoch()
        self.shard_origins[name] = (furthest + 1, taken)
        if main:
            logger.warning(
                "%s: the run read its tar shards with world size %d (x %d data worker(s)), this run has world size %d: "
                "the readers' places in their epochs do not carry over to another world size, so the shard stream "
                "restarts at the start of epoch %d, the one after the furthest epoch any reader had reached (%d). "
                "Samples the readers had not reached in the epochs in progress are skipped; the run is no longer "
                "identical to one that was never interrupted",
                path, world_then, max(1, workers_then), world, furthest + 1, furthest,
            )

    # -- the run folder ----------------------------------------------------------------------

    def _begin_outputs(self) -> None:
        """Once the first step has trained: claim the run folder (:func:`hetvae.runs.claim`)."""
        self._started = True
        if not self.dist.main:
            return
        try:
            runs.claim(self.run_dir, self.cfg, overwrite=self.overwrite, fresh=self._resumed_from is None,
                       corrupt=self._corrupt, warn=logger.warning)
        except BaseException:
            self._started = False
            raise
        self._corrupt = []

    def _nonfinite_tensors(self) -> list[str]:
        """Names of the run's tensors (model, EMA, log-scales, discriminator) holding inf or NaN."""
        tensors = {k: v for k, v in self._tensors().items() if v.is_floating_point()}
        if not tensors:
            return []
        flags = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).cpu()
        return [k for k, ok in zip(tensors, flags.tolist()) if not ok]

    def _check_finite_weights(self) -> None:
        bad = self._nonfinite_tensors()
        if not bad:
            return
        t = self.cfg.train
        newest = runs.newest_checkpoint(self.run_dir)
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise NonFiniteLossError(
            f"training stopped at step {self.step}: the weights are no longer finite ({shown}). Nothing was "
            f"exported and no checkpoint of this step was written; the newest checkpoint, {newest or 'none'}, holds "
            f"finite weights. Likely causes: train.weight_decay={t.weight_decay} or train.lr={t.lr} too large, "
            "an optimiser step on non-finite gradients"
        )

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0) and prune old ones; all ranks wait.

        Raises:
            NonFiniteLossError: a weight is inf or NaN (the newest checkpoint stays the last good one).
            CheckpointError: the files could not be written (e.g. a full disk).
        """
        self._check_finite_weights()
        path = self._write_checkpoint() if self.dist.main else None
        self.dist.barrier()
        return path

    def _write_checkpoint(self) -> Path:
        return runs.save_step(self.run_dir, self.step, cfg=self.cfg, model_config=self.model.config,
                              tensors=self._tensors(), state=self._state())

    def export(self) -> Path | None:
        """Write ``model.safetensors`` (EMA when enabled) and ``loss.safetensors`` into the run folder."""
        if not self.dist.main:
            return None
        model = self.ema.module if self.ema is not None else self.model
        # the likelihood travels with the model
        model_file = runs.export(self.run_dir, model, self.objective.nll, cfg=self.cfg, step=self.step,
                                 warn=logger.warning)
        if self.cfg.train.head_only:  # the head alone, for the VAE it was trained on (attach_log_scale_head)
            save_log_scale_head(model, self.run_dir / runs.HEAD_FILE, likelihood=self.objective.nll,
                                base=self.cfg.model.init_from)
        return model_file

    # -- one step ----------------------------------------------------------------------------

    def _records_after(self, steps_done: int) -> bool:
        """Whether ``metrics.jsonl`` gets a record once ``steps_done`` steps are done."""
        t = self.cfg.train
        return bool(t.log_every and steps_done % t.log_every == 0) or steps_done >= self.total_steps

    @property
    def total_steps(self) -> int:
        """``steps`` plus the head-only phase's ``head_steps``."""
        return self.cfg.train.steps + self.cfg.train.head_steps

    def _enter_head_phase(self, from_ema: bool) -> None:
        """Freeze the autoencoder but for the log-scale head (see ``head_steps``); with ``from_ema``
        it first takes the EMA weights. Idempotent."""
        if self._head_phase:
            return
        if from_ema and self.ema is not None:
            with torch.no_grad():
                for p, ema_p in zip(self.model.parameters(), self.ema.module.parameters()):
                    p.copy_(ema_p)
        keep = self._head_parameters()
        for p in self.model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        # DDP expects a gradient for every parameter it was built with: the phase runs the plain
        # module and averages the head's gradients itself (_sync_grads)
        self.forward_module = self.generator
        self._head_phase = True
        if self.dist.main:
            logger.info("step %d: head-only phase, %d steps: only the log-scale trains", self.step, self.cfg.train.head_steps)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches: Iterator[Tensor]) -> tuple[bool, dict[str, float]]:
        """One optimiser step over ``grad_accum`` micro-batches; returns ``(applied, logs)``."""
        t, step = self.cfg.train, self.step
        factor = optim.lr_factor(t, step)
        for opt in (self.g_opt, self.d_opt):
            if opt is not None:
                optim.set_lr(opt, factor)
        self.g_opt.zero_grad(set_to_none=True)
        if self.d_opt is not None:
            self.d_opt.zero_grad(set_to_none=True)
        use_disc = self.objective.gan_factor(step) > 0 and not self._head_phase
        # the likelihood diagnostics (bits/dim, log-scale statistics) only on steps that are recorded
        details = self._records_after(step + 1)
        sums: dict[str, float] = {}
        finite = True
        for k in range(t.grad_accum):
            x = next(batches).to(self.device, non_blocking=True)
            last = k == t.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.forward_module.no_sync()
            g_logs, d_logs = self._micro_step(x, step, sync, use_disc, details)
            finite &= math.isfinite(g_logs["total"]) and math.isfinite(d_logs.get("d_loss", 0.0))
            for key, value in {**g_logs, **d_logs}.items():
                sums[key] = sums.get(key, 0.0) + value / t.grad_accum

        finite = not self.dist.any(not finite)  # every rank must take the same decision
        if finite:
            self._sync_grads(use_disc)
            self.scaler.unscale_(self.g_opt)
            for name, group, limit in self.clip_groups:  # optim.clip_groups
                norm = torch.nn.utils.clip_grad_norm_(group, limit or float("inf")) if group else torch.zeros(())
                sums[name] = float(norm)
                # fp16: the scaler skips overflowing steps itself (and lowers its scale); that is normal
                if not math.isfinite(sums[name]) and self.amp_dtype is not torch.float16:
                    finite = False
        if not finite:
            self.g_opt.zero_grad(set_to_none=True)
            if self.d_opt is not None:
                self.d_opt.zero_grad(set_to_none=True)
            return False, sums
        self._updating = True  # an error from here on may leave the weights half-updated
        self.scaler.step(self.g_opt)
        if use_disc and self.d_opt is not None:
            self.scaler.step(self.d_opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self._updating = False
        sums["lr"] = t.lr * factor
        return True, sums

    def _micro_step(
        self, x: Tensor, step: int, sync, use_disc: bool, details: bool
    ) -> tuple[dict[str, float], dict[str, float]]:
        t, world, rank = self.cfg.train, self.dist.world_size, self.dist.rank
        f = self.model.config.downsample_factor
        # the whole global batch's noise on every rank, each keeps its slice (see _Generator)
        local = x.shape[0]  # train.batch_size // world, or the large crops' batch (train.final_resolution)
        shape = (local * world, self.model.config.latent_channels, x.shape[-2] // f, x.shape[-1] // f)
        eps = torch.randn(shape, generator=self.noise, device=self.device)
        eps = eps[rank * local : (rank + 1) * local]
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)  # the generator loss must not train D
        with sync:
            with self._autocast():
                mean, log_scale, coupling, moments = self.forward_module(x, eps)
                rec = Reconstruction(mean=mean, log_scale=log_scale, coupling=coupling)
                loss, g_logs = self.objective.generator_loss(
                    x, rec, DiagonalGaussian(moments), step, last_layer=self.model.last_layer, details=details
                )
            self.scaler.scale(loss / t.grad_accum).backward()
        d_logs: dict[str, float] = {}
        if use_disc:
            self.discriminator.requires_grad_(True)
            # D sees this step's reconstruction (detached) rather than a second forward pass
            with self._autocast():
                d_loss, d_logs = self.objective.discriminator_loss(x, rec, step)
            self.scaler.scale(d_loss / t.grad_accum).backward()
        return g_logs, d_logs

    def _sync_grads(self, use_disc: bool) -> None:
        """Average the gradients DDP does not own: the loss's log-scales and the discriminator."""
        if not self.dist.enabled:
            return
        params = self.objective.trainable_parameters() + (self.d_params if use_disc else [])
        if self._head_phase:  # the head, run outside DDP in that phase
            params += [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean([p.grad for p in params], self.dist.world_size)

    # -- logging / samples -------------------------------------------------------------------

    def _write_metrics(self, record: dict[str, float]) -> None:
        runs.append_metrics(self.run_dir, record)
        self.loggers.log(record, record["step"])

    @torch.no_grad()
    def run_validation(self) -> dict[str, float] | None:
        """Score the model the run would export (the EMA when there is one) on the validation images,
        whole (rank 0; the other ranks wait): one ``metrics.jsonl`` record of ``val_*`` keys at this
        step, logged like the others; with ``train.keep_best`` a lower bits/dim than any before
        replaces ``best/`` (:func:`hetvae.runs.save_best`). Returns the record (None on other ranks)."""
        record = None
        if self.dist.main:
            model = self.ema.module if self.ema is not None else self.model
            record = {"step": self.step, **validate(model, self.objective.nll, self.val_images,
                                                     source=self.cfg.data.val_path or "held-out sample photographs")}
            self._write_metrics(record)
            bpd = record[VAL_PREFIX + "nll_bpd"]
            if self.cfg.train.keep_best and (self.best_bpd is None or bpd < self.best_bpd):
                runs.save_best(self.run_dir, model, self.objective.nll, cfg=self.cfg, step=self.step,
                               metrics={k: v for k, v in record.items() if k != "step"})
                self.best_bpd = bpd
                logger.info("step %d: validation bits/dim %.4f, the best so far: %s", self.step, bpd,
                            self.run_dir / runs.BEST_DIR)
        self.dist.barrier()
        return record

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """Write the uncertainty panel of the current step (rank 0); returns its path."""
        if not self.dist.main:
            return None
        if not hasattr(self, "_panel_inputs") and self.shards is not None and self.cfg.data.val_path is None:
            # centre crops of the first images of the first shards (the shards hold no held-out split)
            self._panel_inputs = first_crops(self.shards, _PANEL_IMAGES, max(self.cfg.data.resolution, _PANEL_RESOLUTION),
                                             least=self.cfg.data.resolution)
        if not hasattr(self, "_panel_inputs"):
            # crops large enough to see structure in (training crops may be 32 px), where the images allow
            # crops of the validation images where there are some, else of the training images' held-out part
            # (data.path unset: the bundled photographs' test split), else of the training images
            data = dataclasses.replace(self.cfg.data, resolution=max(self.cfg.data.resolution, _PANEL_RESOLUTION),
                                       eval_crop="center")
            if self.cfg.data.val_path is not None:
                data = dataclasses.replace(data, path=self.cfg.data.val_path)
            with _quiet_data():  # its skipped images are the panel's, not training's: one line below says so
                try:
                    held_out = build_dataset(data, train=False, seed=self.cfg.train.seed)
                except ValueError:  # images smaller than that: the training crop size
                    held_out = build_dataset(dataclasses.replace(data, resolution=self.cfg.data.resolution),
                                             train=False, seed=self.cfg.train.seed)
            if held_out.resolution < data.resolution:
                logger.info("sample panel: the images are smaller than its %d px crops; it shows %d px crops",
                            data.resolution, held_out.resolution)
            elif held_out.skipped_small:
                logger.info("sample panel: %d image(s) smaller than its %d px crops are not shown in it",
                            len(held_out.skipped_small), data.resolution)
            n = min(_PANEL_IMAGES, len(held_out))
            self._panel_inputs = torch.stack([held_out[i] for i in range(n)])
        x = self._panel_inputs.to(self.device)
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        rec, _ = model(x)
        model.train(was_training)
        log_scale = self.objective.nll.log_scale(
            x, rec.mean.float(), rec.log_scale.float() if self.objective.nll.granularity == "pixel" else None
        )
        path = runs.sample_file(self.run_dir, self.step)
        title = f"step {self.step}  ({self.cfg.log_scale.granularity} log-scale{', EMA' if self.ema else ''})"
        nll, centre, maps = self.objective.nll, None, None
        if nll.channel_coupling != "none":  # the conditional error beside the conditional scale
            a = nll.coefficients(rec.coupling if nll.channel_coupling == "pixel" else None).detach()
            centre = coupled_mean(x, rec.mean.float(), a.float(), nll.coupling_order)
            maps = a if a.ndim == 4 else None
        save_uncertainty_panel(path, x, rec.mean, log_scale, title=title, centre=centre, coupling=maps)
        shutil.copyfile(path, runs.latest_sample_file(self.run_dir))
        return path

    # -- signals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def request_stop(signum, _frame):
            if self._stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            self._stop_signal = signum
            if self.dist.main:
                print(
                    f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then checkpointing "
                    "(again to abort)",
                    file=sys.stderr,
                    flush=True,
                )

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _should_stop(self) -> bool:
        return self.dist.any(self._stop_requested)  # a signal may reach one rank only

    # -- the loop ----------------------------------------------------------------------------

    def _nonfinite_error(self) -> NonFiniteLossError:
        t, ls = self.cfg.train, self.cfg.log_scale
        last = "none (not one finite step)" if self.last_finite_step is None else f"step {self.last_finite_step}"
        newest = runs.newest_checkpoint(self.run_dir)
        causes = [
            f"a learning rate too high for this model (train.lr={t.lr}, warmup_steps={t.warmup_steps})",
            f"log-scales pinned at their bounds (log_scale.bounds={list(ls.bounds)}; see log_scale_min/max in metrics.jsonl)",
        ]
        if t.precision == "fp16":
            causes.insert(0, "fp16 overflow in the autoencoder (train.precision=bf16 or fp32 avoids it)")
        if t.grad_clip is None:
            causes.append("exploding gradients without clipping (train.grad_clip)")
        bad = self._nonfinite_tensors()
        if bad:  # e.g. a huge weight_decay: every later loss is NaN because the weights are
            causes.insert(0, f"the weights themselves are no longer finite ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}; train.weight_decay={t.weight_decay})")
        return NonFiniteLossError(
            f"training stopped at step {self.step}: {self.nonfinite_run} consecutive non-finite losses or "
            f"gradients (train.max_nonfinite={t.max_nonfinite}). The last finite step was {last}. Likely "
            f"causes: {'; '.join(causes)}. Newest checkpoint: {newest or 'none'}."
        )

    def run(self) -> TrainResult:
        """Train up to ``cfg.train.steps`` (plus ``head_steps``); see the module docstring."""
        t = self.cfg.train
        main = self.dist.main
        final_from = self._final_from
        batches = self._batches_from(self.step)
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=str(self.run_dir), unit="step",
            disable=not (main and self.progress), dynamic_ncols=True, mininterval=1.0,
        )
        # the interval's sums survive a resume (self._interval is checkpointed); its timing does not
        local_steps, interval_start = 0, time.perf_counter()
        last_logs: dict[str, float] = {}
        interrupted = False
        try:
            with self._signals():
                while self.step < self.total_steps:
                    if self.step == final_from and self.step > 0:
                        batches = self._batches_from(self.step)  # the large crops from here on
                    if self.step >= t.steps and not self._head_phase:
                        self._enter_head_phase(from_ema=True)
                    self._step_start = self._snapshot()
                    applied, logs = self._train_step(batches)
                    self.step += 1
                    self._step_start = None
                    if not self._started:
                        self._begin_outputs()
                    if applied:
                        self.nonfinite_run = 0
                        self.last_finite_step = self.step
                    else:
                        self.nonfinite_total += 1
                        self.nonfinite_run += 1
                        if main:
                            logger.warning("step %d: non-finite loss or gradient, step skipped", self.step)
                        if self.nonfinite_run >= max(t.max_nonfinite, 1):
                            raise self._nonfinite_error()
                    sums, counts = self._interval["sums"], self._interval["counts"]
                    for key, value in logs.items():
                        if math.isfinite(value):
                            sums[key] = sums.get(key, 0.0) + value
                            counts[key] = counts.get(key, 0) + 1
                    self._interval["steps"] += 1
                    local_steps += 1
                    if main and "total" in logs and math.isfinite(logs["total"]):
                        postfix = {"loss": f"{logs['total']:.4g}"}
                        if "log_scale_mean" in logs:
                            postfix["scale"] = f"{math.exp(logs['log_scale_mean']):.3g}"
                        bar.set_postfix(postfix, refresh=False)
                    bar.update(1)

                    done = self.step >= self.total_steps
                    if self._records_after(self.step):
                        record = self.dist.mean({k: v / counts[k] for k, v in sums.items()})
                        elapsed = time.perf_counter() - interval_start
                        record.update(
                            step=self.step,
                            steps_averaged=self._interval["steps"],
                            steps_per_s=local_steps / max(elapsed, 1e-9),
                            nonfinite_total=self.nonfinite_total,
                        )
                        last_logs = record
                        if main:
                            self._write_metrics(record)
                        self._interval = {"sums": {}, "counts": {}, "steps": 0}
                        local_steps, interval_start = 0, time.perf_counter()
                    val_due = bool(t.val_every) and self.val_images is not None and (
                        self.step % t.val_every == 0 or done)
                    if val_due:
                        self._check_finite_weights()
                        began = time.perf_counter()
                        self.run_validation()
                        interval_start += time.perf_counter() - began  # steps_per_s counts training alone
                    stop = self._should_stop()
                    sample_due = (t.sample_every and self.step % t.sample_every == 0) or done or stop
                    # during a non-finite streak the newest checkpoint stays the last good one
                    due = (t.checkpoint_every and self.step % t.checkpoint_every == 0) or done or stop
                    if sample_due or due:
                        self._check_finite_weights()
                    if sample_due:
                        self.write_samples()
                    if due and self.nonfinite_run == 0:
                        self.save_checkpoint()
                    if stop:
                        interrupted = True
                        break
        except Exception as exc:
            self._checkpoint_on_error(exc)
            raise
        finally:
            bar.close()
        model_file = self.export()  # the loop checked the weights are finite at its last step
        if main and interrupted:
            print(f"stopped at step {self.step}; resume with --resume (checkpoint {runs.newest_checkpoint(self.run_dir)})",
                  file=sys.stderr)
        self._close()
        return TrainResult(run_dir=self.run_dir, step=self.step, interrupted=interrupted, model_file=model_file,
                           logs=last_logs, signal=self._stop_signal if interrupted else None)

    @property
    def _final_from(self) -> int | None:
        """The step from which training takes the large crops (``train.final_steps``), or None."""
        t = self.cfg.train
        return t.steps - t.final_steps if t.final_steps else None

    def _batches_from(self, step: int) -> Iterator[Tensor]:
        """This rank's batches from optimizer step ``step`` on: ``data.resolution`` crops, or from
        the start of the last ``train.final_steps`` on the large crops, each stream counted from
        its own beginning (so a resume finds the same batches)."""
        t = self.cfg.train
        if self.shards is not None:
            name, taken = self._stream_at(step)
            return stream_batches(self._shard_stream(name, start=taken), num_workers=self.shard_num_workers)
        final_from = self._final_from
        final = final_from is not None and step >= final_from
        dataset = self.final_dataset if final else self.dataset
        return local_batches(
            dataset,
            global_batch=self.final_batch if final else t.batch_size,
            seed=t.seed,
            start=((step - final_from) if final else step) * t.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=resolve_num_workers(self.cfg.data.num_workers, dataset),
        )

    def _snapshot(self) -> dict[str, Any]:
        """What a failed step may have changed without changing the weights: the RNG streams it
        drew from and the discriminator's BatchNorm statistics."""
        snap: dict[str, Any] = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if torch.cuda.is_available():
            snap["cuda"] = torch.cuda.get_rng_state_all()
        if self.discriminator is not None:
            snap["disc_buffers"] = [b.detach().clone() for b in self.discriminator.buffers()]
        return snap

    def _checkpoint_on_error(self, exc: Exception) -> None:
        """Write a checkpoint of the last finished step before an error ends the run (rank 0, no
        collective: the other ranks may be gone). Skipped where it would be wrong or pointless."""
        if not self.dist.main:
            return
        newest = runs.newest_checkpoint(self.run_dir)
        why_not = None
        if isinstance(exc, (NonFiniteLossError, CheckpointError)):
            why_not = "skipped"  # the newest checkpoint is already the last good one / saving is what failed
        elif not self._started or self.step == 0:
            why_not = "nothing trained yet"
        elif self._updating:
            why_not = "the error struck during the weight update, so the weights may be half-updated"
        elif self.nonfinite_run or self._nonfinite_tensors():
            why_not = "the current weights are not finite"
        elif newest is not None and newest.name == runs.step_dir(self.run_dir, self.step).name:
            why_not = "already saved"
        if why_not is None:
            if self._step_start is not None:  # roll back what the unfinished step drew / changed
                snap = self._step_start
                torch.set_rng_state(snap["torch"])
                self.noise.set_state(snap["noise"])
                if "cuda" in snap:
                    torch.cuda.set_rng_state_all(snap["cuda"])
                with torch.no_grad():
                    for b, saved in zip(self.discriminator.buffers() if self.discriminator else [],
                                        snap.get("disc_buffers", [])):
                        b.copy_(saved)
            try:
                newest = self._write_checkpoint()
                logger.error("training failed after step %d: wrote checkpoint %s before stopping", self.step, newest)
            except Exception as save_error:  # keep the original error; say why there is no checkpoint
                why_not = f"it failed too ({save_error})"
        if why_not is None:
            exc.add_note(f"checkpoint of step {self.step} written before stopping: {newest} (resume with --resume)")
        elif why_not == "already saved":
            exc.add_note(f"the newest checkpoint holds step {self.step}: {newest} (resume with --resume)")
        elif why_not != "skipped":
            newest = runs.newest_checkpoint(self.run_dir)
            exc.add_note(
                f"no checkpoint written at step {self.step} ({why_not}); newest checkpoint: {newest or 'none'}"
            )

    def _close(self) -> None:
        if getattr(self, "loggers", None) is not None:
            self.loggers.close()
        self.dist.close()


def train(
    cfg: Config,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train or fine-tune the model of ``cfg``; see the module docstring for the run folder.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite`` consecutive non-finite steps, or non-finite weights.
        FileNotFoundError: ``resume=True`` and no checkpoint.
        FileExistsError: the run folder holds checkpoints, resuming is off and ``overwrite`` is not set.
        ConfigError: resuming with a config that differs beyond :data:`~hetvae.runs.RESUME_MAY_CHANGE`.
        CheckpointError: no readable checkpoint, one that does not fit the model, or a failed save.
    """
    trainer = Trainer(cfg, out_dir=out_dir, resume=resume, progress=progress, overwrite=overwrite)
    try:
        return trainer.run()
    except BaseException:
        trainer._close()
        raise
