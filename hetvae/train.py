"""Training and fine-tuning of a heteroscedastic autoencoder from a :class:`hetvae.config.Config`.

``train(cfg)`` (or ``hetvae train CONFIG``) builds the model and objective with
``build_model`` / ``build_objective``, then runs ``cfg.train.steps`` optimiser steps:

* two AdamW optimisers: the generator's holds the autoencoder's trainable parameters *and* the
  objective's learned log-scales (``objective.trainable_parameters()``); those and the pixel
  head's bias (the log-scale offsets) form a group with ``log_scale_lr`` and no weight decay
  (a frozen log-scale, ``log_scale.trainable: false`` as in SD, is in no optimiser and never moves);
  with ``head_lr`` set, the pixel head's other weights form a group of their own at that lr;
  the discriminator's runs only once ``objective.gan_factor(step) > 0``;
* ``decoder_only``: the encoder and ``quant_conv`` are frozen (no gradient, not in the optimiser),
  so the latent space of a pretrained VAE stays exactly what its diffusion model expects;
* ``head_steps``: after ``steps``, a phase that trains only the log-scale (the pixel head's layers
  and offsets, or the global / per-channel scale) on the frozen autoencoder, which first takes the
  EMA weights when there is an EMA, so the map is fitted to the mean that is exported; the lr
  restarts and follows ``lr_schedule`` over the phase; the discriminator rests. Under DDP the phase
  bypasses the wrapper and averages the few trainable gradients by hand;
* ``final_steps``: the last steps (and the head phase) train on ``final_resolution`` crops in
  batches of the same pixels, so GroupNorm adapts to statistics closer to a whole image's; that
  phase's batches are a stream of their own, counted from the switch;
* gradient accumulation, linear lr warm-up, gradient clipping (with ``head_grad_clip``, of the
  log-scale's parameters apart from the autoencoder's), EMA of the autoencoder, autocast
  to bf16/fp16 (fp16 with a ``GradScaler``; the NLL upcasts to float32 itself);
* a non-finite loss or gradient skips the step (counted, logged); ``max_nonfinite`` in a row stop
  training with :class:`NonFiniteLossError` naming the last finite step and the likely causes;
* SIGINT / SIGTERM finish the current step, write a checkpoint and the model, and return with
  ``TrainResult.interrupted`` and ``.signal`` set (``hetvae train`` then exits 130 / 143, as a shell
  reports a process killed by that signal, so a script never mistakes it for a finished run);
* any other error during training first writes a checkpoint of the last finished step (unless the
  error struck mid-update, or the weights are not finite), then propagates with a note naming it;
  nothing is exported;
* weights that stop being finite are never checkpointed nor exported: training stops with
  :class:`NonFiniteLossError` naming the tensors and the newest (finite) checkpoint;
* under ``torchrun`` (``WORLD_SIZE > 1``): DistributedDataParallel (gloo on CPU, NCCL on GPU), each
  rank takes its contiguous share of every global batch (``batch_size`` is the global micro-batch
  and must divide by the world size), all file output on rank 0 only. The loss's log-scales and
  the discriminator stay outside DDP and have their gradients averaged by hand. Two things remain
  per rank: the discriminator's BatchNorm statistics (rank 0's are saved; ``disc_norm: actnorm``
  avoids them) and the adaptive GAN weight, computed from each rank's local gradient norms.

Determinism: epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)``, cut into
full global batches; crops come from ``(seed, e, index)`` (``hetvae.data``); the posterior noise of
the whole global batch comes from one seeded generator on every rank (each rank keeps its slice).
So the data and noise of step ``s`` are a pure function of ``(seed, s)``, and a resumed run
continues exactly: on the CPU, N steps + resume + N steps give bit-identical weights to 2N steps,
and a 2-process run matches a 1-process one up to float summation order.

Run folder (``cfg.out_dir``, or ``out_dir=``). Nothing is written before the first step has
trained: a run that fails to start leaves no folder (or a user's folder as it was)::

    config.yaml               the resolved config, every key (load_config(...) gives it back)
    metrics.jsonl             one JSON object per log interval: step, lr, losses, log-scale stats,
                              grad norm, steps/s, non-finite counts (averaged over the interval of
                              ``steps_averaged`` steps; a resumed run continues the interval it was
                              stopped in, so its records equal an uninterrupted run's)
    samples/step_XXXXXXX.png  uncertainty panels (EMA model when enabled): input | reconstruction |
                              |error| | predicted scale, on crops of the built-in held-out photographs;
                              with data.path set there is no held-out split, so they are crops of
                              your training images (fixed crops, not held out)
    samples/latest.png        a copy of the newest panel
    checkpoints/step_XXXXXXXX/
        weights.safetensors   autoencoder.*, ema.*, loss.*, discriminator.* (+ config metadata)
        state.pt              optimisers, grad scaler, RNG states, counters (weights_only-loadable)
    model.safetensors         the final model (EMA weights when enabled) in hetvae format:
                              hetvae.convert.load_autoencoder(run_dir) reads it
    loss.safetensors          the NLL's learned log-scale parameters (global / channel) + its config
    tensorboard/              scalars, when the ``tensorboard`` package is installed

Resuming: ``resume=True`` (``--resume``) continues from the newest checkpoint and fails if there is
none; ``cfg.train.resume == "auto"`` continues when one exists; ``"never"`` refuses a folder that
already holds checkpoints rather than mixing two runs. ``overwrite=True`` (``--overwrite``) starts
over instead, deleting the previous run's files (checkpoints, metrics, samples, exports; nothing
else) once the first step has trained.

A resume may change only what :data:`RESUME_MAY_CHANGE` lists (steps, logging and checkpoint
cadence, optimiser settings, data workers); any other difference from the checkpoint's embedded
config is a :class:`~hetvae.config.ConfigError` naming the keys, so ``config.yaml`` never describes
a model that was trained otherwise. A newest checkpoint that cannot be read is skipped with a
warning (and renamed ``corrupt-step_...`` once training starts): the run resumes from the previous
intact one. A fresh start replaces a stale ``metrics.jsonl`` (from a run that never checkpointed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
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

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetvae.autoencoder import AutoencoderKL, Reconstruction
from hetvae.checkpoint import (
    STATE_FILE,
    Checkpoint,
    atomic_write_text,
    fsync_file,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside,
    tensors_under,
)
from hetvae.config import (
    Config,
    ConfigError,
    build_model,
    build_objective,
    config_to_dict,
    from_dict,
    save_config,
)
from hetvae.convert import CheckpointError
from hetvae.data import ImageDataset, build_dataset
from hetvae.distributions import DiagonalGaussian

__all__ = ["train", "Trainer", "TrainResult", "NonFiniteLossError", "EMA", "TRAIN_CONFIG_KEY", "RESUME_MAY_CHANGE"]

logger = logging.getLogger("hetvae.train")

TRAIN_CONFIG_KEY = "hetvae_train_config"
"""safetensors metadata key holding the run's resolved config (JSON) in every checkpoint."""
_PANEL_IMAGES = 4
_PANEL_RESOLUTION = 128  # side of the held-out crops in the training panels
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

RESUME_MAY_CHANGE = frozenset({
    "out_dir",  # the run folder may have been moved
    # how long, and how often to log, sample and checkpoint
    "train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.resume", "train.max_nonfinite",
    # optimiser settings: a resume takes the configured ones (see _load_optimizer), e.g. a lower lr
    "train.lr", "train.betas", "train.weight_decay", "train.warmup_steps", "train.lr_schedule", "train.disc_lr",
    "train.log_scale_lr", "train.grad_clip", "train.head_grad_clip",
    "train.head_steps",  # e.g. a finished run resumed to fit its head on the converged mean
    "train.device",  # a run moved to another machine (a checkpoint is device-independent)
    # how, not what: same data, same gradients
    "train.gradient_checkpointing", "data.num_workers", "data.cache_mb",
})
"""Dotted config keys a resumed run may change; any other difference from the run's config is refused."""
_STATE_KEYS = ("step", "generator_optimizer", "scaler", "rng", "nonfinite_total", "nonfinite_run", "last_finite_step")
# files a run writes (and --overwrite deletes), relative to the run folder
_RUN_FILES = ("metrics.jsonl", "model.safetensors", "loss.safetensors", "config.yaml")
_RUN_GLOBS = (("checkpoints", "step_*"), ("checkpoints", ".tmp-*"), ("checkpoints", "corrupt-step_*"),
              ("samples", "step_*.png"), ("samples", "latest.png"), ("tensorboard", "events.out.tfevents.*"))


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


class EMA:
    """Exponential moving average of a model: ``ema = decay * ema + (1 - decay) * param`` per step.

    ``module`` is a frozen deep copy of the model (buffers copied as they are); export or
    evaluate it directly.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # one multi-tensor call, not a Python loop over ~140 small tensors (half the time on a CPU)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)


# ---------------------------------------------------------------------------------------------
# distributed plumbing
# ---------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device: str = "auto") -> _Dist:
    """Process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) on
    ``device`` (``train.device``): ``"auto"`` is CUDA when available, else CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("train.device", f"is {device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
    if world_size <= 1:
        return _Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if device != "cuda":
            raise ConfigError(
                "train.device",
                f"is {device!r} under torchrun (WORLD_SIZE={world_size}): each process takes "
                "the GPU of its LOCAL_RANK, so use 'cuda' or 'auto' (or CUDA_VISIBLE_DEVICES to choose GPUs)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                "train.device",
                f"is '{device}' but process LOCAL_RANK={local_rank} has no GPU of its own: this machine shows {count} CUDA "
                f"device(s); start at most {count} processes per node, or set train.device=cpu to train "
                "on the CPU with gloo"
            )
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    placed = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=placed, owns_group=owns)


def _all_reduce_mean(tensors: list[Tensor], world_size: int) -> None:
    """Average ``tensors`` in place across ranks (one flattened collective)."""
    if not tensors or world_size <= 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class _Generator(nn.Module):
    """The autoencoder's training forward with the posterior noise passed in.

    Taking ``eps`` from outside lets every DDP rank draw the noise of the whole global batch from
    one seeded generator and keep its slice, so the noise does not depend on the world size.
    Returns plain tensors ``(mean, log_scale | None, moments)`` for DDP.
    """

    def __init__(self, autoencoder: AutoencoderKL, *, freeze_encoder: bool) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.freeze_encoder = freeze_encoder

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        rec = self.autoencoder.decode(z)
        return rec.mean, rec.log_scale, posterior.parameters


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------


def _ignore_sigint(_: int) -> None:
    # DataLoader workers share the terminal's process group; the main process handles Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _epoch_batches(
    n: int, *, global_batch: int, seed: int, start: int, rank: int, world_size: int
) -> Iterator[list[tuple[int, int]]]:
    """This rank's share of global batches ``start, start + 1, ...`` forever, as lists of
    ``(epoch, index)`` keys (:class:`~hetvae.data.ImageDataset` draws each crop from them).

    Epoch ``e`` is the permutation of the ``n`` samples drawn from ``(seed, e)`` cut into
    ``per_epoch = n // global_batch`` full batches (the remainder is dropped, so every batch has
    the same size and the position of batch ``k`` is ``(k // per_epoch, k % per_epoch)``).
    """
    per_epoch = n // global_batch
    local = global_batch // world_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        # a separate stream from the crops' (seed, epoch, index): different entropy tuple
        order = np.random.default_rng((seed, epoch)).permutation(n)[: per_epoch * global_batch]
        for row in order.reshape(per_epoch, global_batch)[skip:, rank * local : (rank + 1) * local].tolist():
            yield [(epoch, i) for i in row]
        epoch, skip = epoch + 1, 0


def _local_batches(
    dataset: ImageDataset,
    *,
    global_batch: int,
    seed: int,
    start: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> Iterator[Tensor]:
    """This rank's share of global batches ``start, start + 1, ...`` forever (:func:`_epoch_batches`).

    One ``DataLoader`` serves every epoch: the batches carry their epoch, so its workers live as
    long as the stream, keeping their decoded files and dead-leaves images. (A loader per epoch
    started its workers again at every epoch boundary, every few dozen steps for a folder of a few
    hundred photographs, each decoding its files anew.)
    """
    if len(dataset) < global_batch:
        raise ValueError(
            f"the dataset has {len(dataset)} samples per epoch, fewer than one global batch of {global_batch}: "
            "set data.samples_per_epoch (crops per epoch, cycling through the images) or lower train.batch_size"
        )
    keys = _epoch_batches(
        len(dataset), global_batch=global_batch, seed=seed, start=start, rank=rank, world_size=world_size
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=keys,
        num_workers=num_workers,
        worker_init_fn=_ignore_sigint if num_workers else None,
    )
    yield from loader


def _adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where every parameter's device has one (CPU and
    CUDA among them): the same update as the default per-tensor loop, up to float rounding, in one
    kernel. The per-tensor loop took 16 ms a step for tiny.yaml's 138 tensors on 2 CPU cores, the
    fused one 3 ms (benchmarks/optimizer_step.py); checkpoints load either way."""
    try:  # the devices with fused kernels depend on the PyTorch version (CPU from 2.4)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = set()
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in devices and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def _load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore moments and step counts, but keep the *configured* hyper-parameters.

    ``Optimizer.load_state_dict`` also restores each group's lr, betas and weight decay; a run
    resumed with a changed ``train.lr`` would silently keep the old one.
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, configured):
        group.update(settings)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


def final_batch_size(cfg: Config) -> int:
    """The global batch of the last ``train.final_steps``: about the pixels of a normal step at
    ``train.final_resolution`` (16 crops of 32 px -> one of 128 px)."""
    t = cfg.train
    return max(1, round(t.batch_size * cfg.data.resolution**2 / t.final_resolution**2))


class Trainer:
    """Everything a run needs, built from ``cfg``; :meth:`run` trains.

    Args:
        cfg: the run's config.
        out_dir: replaces ``cfg.out_dir`` (the resolved config records it).
        resume: True: continue from the newest checkpoint (error if none); False: start fresh;
            None: follow ``cfg.train.resume``.
        progress: show a tqdm bar (rank 0).
        overwrite: start fresh even where ``out_dir`` holds a previous run; its files are deleted
            (see ``_RUN_FILES``) once the first step has trained. Contradicts ``resume=True``.

    Raises (besides config errors):
        ConfigError: resuming with a config that differs in a key outside :data:`RESUME_MAY_CHANGE`.
        CheckpointError: no checkpoint can be read, or the checkpoint does not fit the model.

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
        self.cfg = cfg
        t = cfg.train
        self.dist = _setup_distributed(t.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress = progress
        if t.batch_size % self.dist.world_size:
            raise ValueError(
                f"train.batch_size={t.batch_size} is the global micro-batch and must divide by the "
                f"world size {self.dist.world_size}"
            )

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
        self.discriminator = self.objective.discriminator
        self.ema = EMA(self.model, decay=t.ema_decay) if t.ema_decay is not None else None

        # log-scale offsets (the loss's global/channel values, the pixel head's bias) get their own lr
        head, trunk = self.model.decoder.log_scale_head, self.model.decoder.log_scale_trunk
        offsets = [head.bias] if head is not None and head.bias is not None and head.bias.requires_grad else []
        scale_params = self.objective.trainable_parameters() + offsets
        # the head's other weights: with train.head_lr a group of their own at that lr
        layers = [*(trunk.parameters() if trunk is not None else ()), *([head.weight] if head is not None else [])]
        head_weights = [p for p in layers if p.requires_grad]
        head_params = head_weights if t.head_lr is not None else []
        special = offsets + head_params
        ae_params = [p for p in self.model.parameters() if p.requires_grad and not any(p is o for o in special)]
        self.g_params = ae_params + head_params + scale_params
        # train.head_grad_clip: the log-scale's parameters (the pixel head whole, the global /
        # channel scale) are clipped on their own, so the map's gradient never rescales the mean's
        # log_scale.mean_scale=global: the mean's own scale is clipped alone, as a global model's is
        mean_scale = [] if self.objective.nll.mean_head is None else [
            p for p in self.objective.nll.mean_head.parameters() if p.requires_grad
        ]
        self.clip_groups = [("grad_norm", self.g_params, t.grad_clip)]
        if t.head_grad_clip is not None:
            log_scale = [p for p in head_weights + scale_params if not any(p is q for q in mean_scale)]
            self.clip_groups = [
                ("grad_norm", [p for p in self.g_params if not any(p is q for q in head_weights + scale_params)], t.grad_clip),
                ("head_grad_norm", log_scale, t.head_grad_clip),
            ]
            if mean_scale:
                self.clip_groups.append(("mean_scale_grad_norm", mean_scale, t.head_grad_clip))
        groups = [{"params": ae_params, "weight_decay": t.weight_decay, "base_lr": t.lr}]
        if head_params:
            groups.append({"params": head_params, "weight_decay": t.weight_decay, "base_lr": t.head_lr})
        if scale_params:
            # decay would pull the log-scale towards its init: a prior nobody asked for
            groups.append({"params": scale_params, "weight_decay": 0.0, "base_lr": t.log_scale_lr or t.lr})
        self.g_opt = _adamw(groups, lr=t.lr, betas=t.betas)
        self.d_params = self.objective.discriminator_parameters()
        self.d_opt = (
            _adamw(
                [{"params": self.d_params, "base_lr": t.disc_lr or t.lr}],
                lr=t.disc_lr or t.lr,
                betas=t.betas,
                weight_decay=t.weight_decay,
            )
            if self.d_params
            else None
        )
        self.generator = _Generator(self.model, freeze_encoder=t.decoder_only)
        self.forward_module: nn.Module = self.generator
        if self.dist.enabled:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.generator, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            # the loss's log-scales and the discriminator live outside DDP: synchronised by hand
            with torch.no_grad():
                for tensor in list(self.objective.nll.state_dict().values()) + self._discriminator_state():
                    dist.broadcast(tensor, src=0)

        self.amp_dtype = _DTYPES[t.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(t.seed + 1)  # not the init seed: the noise stream is its own

        self.dataset = build_dataset(cfg.data, train=True, seed=t.seed)
        # the last train.final_steps: larger crops, the same pixels per step (train.final_resolution)
        self.final_dataset: ImageDataset | None = None
        self.final_batch = t.batch_size
        if t.final_steps:
            self.final_dataset = build_dataset(
                dataclasses.replace(cfg.data, resolution=t.final_resolution), train=True, seed=t.seed
            )
            self.final_batch = final_batch_size(cfg)
            if self.final_batch % self.dist.world_size:
                raise ValueError(
                    f"train.final_resolution={t.final_resolution} gives global batches of {self.final_batch} crops, "
                    f"which must divide by the world size {self.dist.world_size}"
                )
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.last_finite_step: int | None = None
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._tb = None
        self.overwrite = overwrite
        self._started = False  # outputs exist (config.yaml written): set after the first trained step
        self._corrupt: list[Path] = []  # unreadable checkpoints newer than the one resumed from
        self._resumed_from: Path | None = None
        self._step_start: dict[str, Any] | None = None  # RNG etc. at the start of the step in progress
        self._updating = False  # inside the optimiser / EMA update (weights possibly half-written)
        # the metrics interval in progress (checkpointed, so a resumed run averages the same steps)
        self._interval: dict[str, Any] = {"sums": {}, "counts": {}, "steps": 0}
        self._head_phase = False  # in the head-only phase (train.head_steps): the autoencoder is frozen

        checkpoint = self._pick_checkpoint(resume, overwrite)
        if checkpoint is not None:
            self._restore(checkpoint)

    # -- parameters / state ------------------------------------------------------------------

    def _discriminator_state(self) -> list[Tensor]:
        return [] if self.discriminator is None else list(self.discriminator.state_dict().values())

    def _tensors(self) -> dict[str, Tensor]:
        tensors = {f"autoencoder.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        tensors.update({f"loss.{k}": v for k, v in self.objective.nll.state_dict().items()})
        if self.discriminator is not None:
            tensors.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        return tensors

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
        }

    def _pick_checkpoint(self, resume: bool | None, overwrite: bool) -> Checkpoint | None:
        """The checkpoint to resume from (loaded), or None for a fresh start."""
        found = list_checkpoints(self.ckpt_dir)
        if overwrite:
            if resume is True:
                raise ValueError("resume=True (--resume) and overwrite=True (--overwrite) contradict each other")
            return None
        if resume is False or (resume is None and self.cfg.train.resume == "never"):
            if found:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints (newest: {found[-1][1].name}) and resuming is off: "
                    "resume it (--resume or train.resume=auto), start over there with --overwrite (deletes that "
                    "run's checkpoints, metrics, samples and exports), or choose another out_dir"
                )
            return None
        if not found:
            if resume is True:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_dir}")
            return None
        bad: list[tuple[Path, Exception]] = []
        for _, path in reversed(found):
            try:
                ckpt = load_checkpoint(path)
                missing = [k for k in _STATE_KEYS if k not in ckpt.state]
                if missing:
                    raise CheckpointError(f"{path / STATE_FILE}: not a training state (lacks {', '.join(missing)})")
            except (CheckpointError, FileNotFoundError) as exc:
                bad.append((path, exc))
                continue
            if bad and self.dist.main:
                logger.warning(
                    "skipping unreadable checkpoint(s) %s; resuming from the previous intact one, %s (the unreadable "
                    "ones are renamed corrupt-step_... once training starts)",
                    "; ".join(f"{p} ({e})" for p, e in bad), path,
                )
            self._corrupt = [p for p, _ in bad]
            return ckpt
        raise CheckpointError(
            f"no intact checkpoint under {self.ckpt_dir}: "
            + "; ".join(f"{p.name}: {e}" for p, e in bad)
            + ". Move the folder away to keep it, then start over with --overwrite, or choose another out_dir"
        )

    def _check_resume_config(self, ckpt: Checkpoint) -> dict[str, tuple[Any, Any]]:
        """Refuse a config that differs from the checkpoint's beyond :data:`RESUME_MAY_CHANGE`;
        returns the (allowed) changes as ``{key: (old, new)}``."""
        text = ckpt.metadata.get(TRAIN_CONFIG_KEY)
        if text is None:  # not written by Trainer: only the weights' shapes can be checked
            return {}
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"{ckpt.path / 'weights.safetensors'}: corrupt {TRAIN_CONFIG_KEY} metadata: {exc}"
            ) from None
        try:  # defaults filled in, values normalised as today's schema reads them
            raw = config_to_dict(from_dict(Config, raw))
        except (ConfigError, TypeError):
            pass  # a schema that has moved on: compare the keys both sides still have
        saved = _flatten(json.loads(json.dumps(raw)))
        now = _flatten(json.loads(json.dumps(config_to_dict(self.cfg))))
        differ = sorted(k for k in now if k in saved and saved[k] != now[k])
        refused = [k for k in differ if k not in RESUME_MAY_CHANGE]
        if refused:
            details = "; ".join(f"{k}: the run used {saved[k]!r}, this config says {now[k]!r}" for k in refused)
            raise ConfigError(
                ", ".join(refused),
                f"resuming the run in {self.run_dir} (checkpoint {ckpt.path.name}) with a config that differs from "
                f"the run's: {details}. A resume may change only the steps, the logging and checkpoint cadence and "
                f"the optimiser settings ({', '.join(sorted(RESUME_MAY_CHANGE))}). To train this config, give it a "
                "new out_dir, or start over in this folder with --overwrite (train(..., overwrite=True)), which "
                "deletes the previous run's checkpoints, metrics, samples and exported model",
            )
        return {k: (saved[k], now[k]) for k in differ if k != "out_dir"}

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

    def _restore(self, ckpt: Checkpoint) -> None:
        path = ckpt.path
        changes = self._check_resume_config(ckpt)
        if self.dist.main:
            logger.info("resuming from %s (step %d)", path, ckpt.step)
            if changes:
                logger.warning(
                    "resuming with changed settings (the checkpoints keep the config each was written with): %s",
                    "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                )

        def part(prefix: str) -> dict[str, Tensor]:
            return tensors_under(ckpt.tensors, prefix)

        try:
            self.model.load_state_dict(part("autoencoder."), strict=True)
            if self.ema is not None:
                ema = part("ema.")
                # a run that turns EMA on at resume starts the average from the current weights
                self.ema.module.load_state_dict(ema or self.model.state_dict(), strict=True)
            self.objective.nll.load_state_dict(part("loss."), strict=True)
            if self.discriminator is not None:
                disc = part("discriminator.")
                if disc:
                    self.discriminator.load_state_dict(disc, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"{path}: the checkpoint does not fit the configured model: {detail}") from None
        state = ckpt.state
        _load_optimizer(self.g_opt, state["generator_optimizer"])
        if self.d_opt is not None and state.get("discriminator_optimizer") is not None:
            _load_optimizer(self.d_opt, state["discriminator_optimizer"])
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
        self._resumed_from = path
        if self.dist.main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the resumed step (written by a run killed after its last checkpoint).

        Atomic: a kill during the rewrite leaves the old file, never an empty or half one."""
        path = self.run_dir / "metrics.jsonl"
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

    # -- the run folder ----------------------------------------------------------------------

    def _begin_outputs(self) -> None:
        """Once the first step has trained: clear a previous run (overwrite) or stale metrics, set
        unreadable checkpoints aside and write ``config.yaml``. A failure here removes the run
        folder again if this call created it (and it is empty)."""
        self._started = True
        if not self.dist.main:
            return
        created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                self._remove_previous_run()
            elif self._resumed_from is None and (self.run_dir / "metrics.jsonl").is_file():
                logger.warning("%s: replacing metrics.jsonl of an earlier start that left no checkpoint",
                               self.run_dir)
                (self.run_dir / "metrics.jsonl").unlink()
            for path in self._corrupt:
                if path.is_dir():
                    logger.warning("unreadable checkpoint %s renamed %s", path, set_aside(path).name)
            self._corrupt = []
            self._save_config()
        except BaseException:
            self._started = False
            if created:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()  # only if empty: never a file this run did not write
            raise

    def _remove_previous_run(self) -> None:
        removed = 0
        for name in _RUN_FILES:
            if (self.run_dir / name).is_file():
                (self.run_dir / name).unlink()
                removed += 1
        for folder, pattern in _RUN_GLOBS:
            for path in (self.run_dir / folder).glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
        for folder in {f for f, _ in _RUN_GLOBS}:
            with contextlib.suppress(OSError):
                (self.run_dir / folder).rmdir()  # only if nothing else is in it
        if removed:
            logger.warning("--overwrite: deleted %d files or folders of the previous run in %s", removed, self.run_dir)

    def _save_config(self) -> None:
        path = self.run_dir / "config.yaml"
        try:
            save_config(self.cfg, path)
        except OSError as exc:
            for tmp in self.run_dir.glob("*config.yaml.tmp*"):
                tmp.unlink(missing_ok=True)
            detail = f"could not write {path}: {exc.strerror or exc}; no half-written file was left"
            raise OSError(exc.errno, detail) from exc

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
        newest = latest_checkpoint(self.ckpt_dir)
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
        self._barrier()
        return path

    def _write_checkpoint(self) -> Path:
        metadata = {
            TRAIN_CONFIG_KEY: json.dumps(config_to_dict(self.cfg)),
            "hetvae_config": json.dumps(self.model.config.to_dict()),
            "step": str(self.step),
        }
        path = save_checkpoint(self.ckpt_dir, self.step, tensors=self._tensors(), metadata=metadata, state=self._state())
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        return path

    def export(self) -> Path | None:
        """Write ``model.safetensors`` (EMA when enabled) and ``loss.safetensors`` into the run folder."""
        if not self.dist.main:
            return None
        from safetensors.torch import save_file

        model = self.ema.module if self.ema is not None else self.model
        final = self.run_dir / "model.safetensors"
        tmp = self.run_dir / ".model.tmp.safetensors"
        model.save_pretrained(tmp, format="hetvae", likelihood=self.objective.nll)  # the likelihood travels with it
        fsync_file(tmp)
        os.replace(tmp, final)
        loss_sd = {k: v.detach().cpu().contiguous() for k, v in self.objective.nll.state_dict().items()}
        meta = {"hetvae_log_scale": json.dumps(config_to_dict(self.cfg.log_scale)), "step": str(self.step)}
        tmp = self.run_dir / ".loss.tmp.safetensors"
        save_file(loss_sd, str(tmp), metadata=meta)
        fsync_file(tmp)
        os.replace(tmp, self.run_dir / "loss.safetensors")
        return final

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

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
        decoder = self.model.decoder
        keep = {id(p) for m in (decoder.log_scale_trunk, decoder.log_scale_head) if m is not None for p in m.parameters()}
        for p in self.model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        # DDP expects a gradient for every parameter it was built with: the phase runs the plain
        # module and averages the head's gradients itself (_sync_grads)
        self.forward_module = self.generator
        self._head_phase = True
        if self.dist.main:
            logger.info("step %d: head-only phase, %d steps: only the log-scale trains", self.step, self.cfg.train.head_steps)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step >= t.steps:  # the head-only phase: a restart without warm-up
            factor, progress = 1.0, (step - t.steps) / max(t.head_steps, 1)
        else:
            factor = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
            progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1) if step >= t.warmup_steps else None
        if t.lr_schedule == "cosine" and progress is not None:
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return factor

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches: Iterator[Tensor]) -> tuple[bool, dict[str, float]]:
        """One optimiser step over ``grad_accum`` micro-batches; returns ``(applied, logs)``."""
        t, step = self.cfg.train, self.step
        factor = self._lr_factor(step)
        for opt in (self.g_opt, self.d_opt):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
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

        if self.dist.enabled:  # every rank must take the same decision
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            dist.all_reduce(flag)
            finite = flag.item() == 0.0
        if finite:
            self._sync_grads(use_disc)
            self.scaler.unscale_(self.g_opt)
            for name, group, limit in self.clip_groups:
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
                mean, log_scale, moments = self.forward_module(x, eps)
                rec = Reconstruction(mean=mean, log_scale=log_scale)
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
        _all_reduce_mean([p.grad for p in params], self.dist.world_size)

    # -- logging / samples -------------------------------------------------------------------

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        if not self.dist.enabled or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        values /= self.dist.world_size
        return dict(zip(keys, values.tolist()))

    def _write_metrics(self, record: dict[str, float]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl is enough
                self._tb = False
        if self._tb:
            for key, value in record.items():
                if key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """Write the uncertainty panel of the current step (rank 0); returns its path."""
        if not self.dist.main:
            return None
        from hetvae.viz import save_uncertainty_panel

        if not hasattr(self, "_panel_inputs"):
            # crops large enough to see structure in (training crops may be 32 px), where the images allow
            data = dataclasses.replace(self.cfg.data, resolution=max(self.cfg.data.resolution, _PANEL_RESOLUTION))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    held_out = build_dataset(data, train=False, seed=self.cfg.train.seed)
            except ValueError:  # images smaller than that: the training crop size
                held_out = build_dataset(self.cfg.data, train=False, seed=self.cfg.train.seed)
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
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        title = f"step {self.step}  ({self.cfg.log_scale.granularity} log-scale{', EMA' if self.ema else ''})"
        save_uncertainty_panel(path, x, rec.mean, log_scale, title=title)
        shutil.copyfile(path, path.with_name("latest.png"))
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
        stop = self._stop_requested
        if self.dist.enabled:  # a signal may reach one rank only
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        return stop

    # -- the loop ----------------------------------------------------------------------------

    def _nonfinite_error(self) -> NonFiniteLossError:
        t, ls = self.cfg.train, self.cfg.log_scale
        last = "none (not one finite step)" if self.last_finite_step is None else f"step {self.last_finite_step}"
        newest = latest_checkpoint(self.ckpt_dir)
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
                        record = self._reduce_logs({k: v / counts[k] for k, v in sums.items()})
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
            print(f"stopped at step {self.step}; resume with --resume (checkpoint {latest_checkpoint(self.ckpt_dir)})",
                  file=sys.stderr)
        self._close()
        return TrainResult(run_dir=self.run_dir, step=self.step, interrupted=interrupted, model_file=model_file,
                           logs=last_logs, signal=self._stop_signal if interrupted else None)

    @property
    def _final_from(self) -> int | None:
        """The step from which training takes the large crops (``train.final_steps``), or None."""
        t = self.cfg.train
        return t.steps - t.final_steps if self.final_dataset is not None else None

    def _batches_from(self, step: int) -> Iterator[Tensor]:
        """This rank's batches from optimizer step ``step`` on: ``data.resolution`` crops, or from
        the start of the last ``train.final_steps`` on the large crops, each stream counted from
        its own beginning (so a resume finds the same batches)."""
        t = self.cfg.train
        final_from = self._final_from
        final = final_from is not None and step >= final_from
        return _local_batches(
            self.final_dataset if final else self.dataset,
            global_batch=self.final_batch if final else t.batch_size,
            seed=t.seed,
            start=((step - final_from) if final else step) * t.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=self.cfg.data.num_workers,
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
        newest = latest_checkpoint(self.ckpt_dir)
        why_not = None
        if isinstance(exc, (NonFiniteLossError, CheckpointError)):
            why_not = "skipped"  # the newest checkpoint is already the last good one / saving is what failed
        elif not self._started or self.step == 0:
            why_not = "nothing trained yet"
        elif self._updating:
            why_not = "the error struck during the weight update, so the weights may be half-updated"
        elif self.nonfinite_run or self._nonfinite_tensors():
            why_not = "the current weights are not finite"
        elif newest is not None and newest.name == f"step_{self.step:08d}":
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
            newest = latest_checkpoint(self.ckpt_dir)
            exc.add_note(
                f"no checkpoint written at step {self.step} ({why_not}); newest checkpoint: {newest or 'none'}"
            )

    def _close(self) -> None:
        if self._tb:
            self._tb.close()
        if self.dist.owns_group:
            dist.destroy_process_group()
            self.dist.owns_group = False


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
        ConfigError: resuming with a config that differs beyond :data:`RESUME_MAY_CHANGE`.
        CheckpointError: no readable checkpoint, one that does not fit the model, or a failed save.
    """
    trainer = Trainer(cfg, out_dir=out_dir, resume=resume, progress=progress, overwrite=overwrite)
    try:
        return trainer.run()
    except BaseException:
        trainer._close()
        raise
