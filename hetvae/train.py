"""Training and fine-tuning of a heteroscedastic autoencoder from a :class:`hetvae.config.Config`.

``train(cfg)`` (or ``hetvae train CONFIG``) builds the model and objective with
``build_model`` / ``build_objective``, then runs ``cfg.train.steps`` optimiser steps:

* two AdamW optimisers: the generator's holds the autoencoder's trainable parameters *and* the
  objective's learned log-scales (``objective.trainable_parameters()``); those and the pixel
  head's bias (the log-scale offsets) form a group with ``log_scale_lr`` and no weight decay;
  the discriminator's runs only once ``objective.gan_factor(step) > 0``;
* ``decoder_only``: the encoder and ``quant_conv`` are frozen (no gradient, not in the optimiser),
  so the latent space of a pretrained VAE stays exactly what its diffusion model expects;
* gradient accumulation, linear lr warm-up, gradient clipping, EMA of the autoencoder, autocast
  to bf16/fp16 (fp16 with a ``GradScaler``; the NLL upcasts to float32 itself);
* a non-finite loss or gradient skips the step (counted, logged); ``max_nonfinite`` in a row stop
  training with :class:`NonFiniteLossError` naming the last finite step and the likely causes;
* SIGINT / SIGTERM finish the current step, write a checkpoint and the model, and return normally;
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

Run folder (``cfg.out_dir``, or ``out_dir=``)::

    config.yaml               the resolved config, every key (load_config(...) gives it back)
    metrics.jsonl             one JSON object per log interval: step, lr, losses, log-scale stats,
                              grad norm, steps/s, non-finite counts (averaged over the interval)
    samples/step_XXXXXXX.png  uncertainty panels of held-out crops (EMA model when enabled):
                              input | reconstruction | |error| | predicted scale
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
already holds checkpoints rather than mixing two runs.
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
    fsync_file,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from hetvae.config import Config, build_model, build_objective, config_to_dict, from_dict, save_config
from hetvae.data import ImageDataset, build_dataset
from hetvae.distributions import DiagonalGaussian
from hetvae.objective import AutoencoderObjective

__all__ = ["train", "Trainer", "TrainResult", "NonFiniteLossError", "EMA", "TRAIN_CONFIG_KEY"]

logger = logging.getLogger("hetvae.train")

TRAIN_CONFIG_KEY = "hetvae_train_config"
"""safetensors metadata key holding the run's resolved config (JSON) in every checkpoint."""
_PANEL_IMAGES = 4
_PANEL_RESOLUTION = 128  # side of the held-out crops in the training panels
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``train.max_nonfinite`` consecutive non-finite steps."""


@dataclass
class TrainResult:
    """What :func:`train` returns. ``step``: steps done; ``interrupted``: stopped by a signal;
    ``model_file``: the exported ``model.safetensors`` (None on ranks other than 0);
    ``logs``: the last logged metrics."""

    run_dir: Path
    step: int
    interrupted: bool = False
    model_file: Path | None = None
    logs: dict[str, float] = field(default_factory=dict)


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
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
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


def _setup_distributed() -> _Dist:
    """Process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size <= 1:
        return _Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)


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
    """This rank's share of global batches ``start, start + 1, ...`` forever.

    Epoch ``e`` is the permutation of the dataset drawn from ``(seed, e)`` cut into
    ``len(dataset) // global_batch`` full batches (the remainder is dropped, so every batch has the
    same size and the position of batch ``k`` is ``(k // per_epoch, k % per_epoch)``).
    """
    per_epoch = len(dataset) // global_batch
    if per_epoch < 1:
        raise ValueError(
            f"the dataset has {len(dataset)} samples per epoch, fewer than one global batch of {global_batch}: "
            "set data.samples_per_epoch (crops per epoch, cycling through the images) or lower train.batch_size"
        )
    local = global_batch // world_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        # a separate stream from the crops' (seed, epoch, index): different entropy tuple
        order = np.random.default_rng((seed, epoch)).permutation(len(dataset))[: per_epoch * global_batch]
        batches = order.reshape(per_epoch, global_batch)[skip:, rank * local : (rank + 1) * local]
        dataset.set_epoch(epoch)  # before the loader: workers copy the dataset at iterator creation
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches.tolist(),
            num_workers=num_workers,
            worker_init_fn=_ignore_sigint if num_workers else None,
        )
        yield from loader
        epoch, skip = epoch + 1, 0


def _load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore moments and step counts, but keep the *configured* hyper-parameters.

    ``Optimizer.load_state_dict`` also restores each group's lr, betas and weight decay; a run
    resumed with a changed ``train.lr`` would silently keep the old one.
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, configured):
        group.update(settings)


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Everything a run needs, built from ``cfg``; :meth:`run` trains.

    Args:
        cfg: the run's config.
        out_dir: replaces ``cfg.out_dir`` (the resolved config records it).
        resume: True: continue from the newest checkpoint (error if none); False: start fresh;
            None: follow ``cfg.train.resume``.
        progress: show a tqdm bar (rank 0).

    Attributes of interest to tests and tools: ``model`` (the autoencoder), ``objective``,
    ``ema`` (or None), ``g_opt``, ``d_opt``, ``step``, ``run_dir``.
    """

    def __init__(
        self, cfg: Config, *, out_dir: str | os.PathLike | None = None, resume: bool | None = None, progress: bool = True
    ) -> None:
        if out_dir is not None:
            cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
        self.cfg = cfg
        t = cfg.train
        self.dist = _setup_distributed()
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
        head = self.model.decoder.log_scale_head
        offsets = [head.bias] if head is not None and head.bias is not None and head.bias.requires_grad else []
        scale_params = self.objective.trainable_parameters() + offsets
        ae_params = [p for p in self.model.parameters() if p.requires_grad and not any(p is o for o in offsets)]
        self.g_params = ae_params + scale_params
        groups = [{"params": ae_params, "weight_decay": t.weight_decay, "base_lr": t.lr}]
        if scale_params:
            # decay would pull the log-scale towards its init: a prior nobody asked for
            groups.append({"params": scale_params, "weight_decay": 0.0, "base_lr": t.log_scale_lr or t.lr})
        self.g_opt = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
        self.d_params = self.objective.discriminator_parameters()
        self.d_opt = (
            torch.optim.AdamW(
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
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.last_finite_step: int | None = None
        self._stop_requested = False
        self._tb = None

        checkpoint = self._pick_checkpoint(resume)
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.dist.main:
            save_config(cfg, self.run_dir / "config.yaml")

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
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
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
        }

    def _pick_checkpoint(self, resume: bool | None) -> Path | None:
        newest = latest_checkpoint(self.ckpt_dir)
        if resume is True:
            if newest is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_dir}")
            return newest
        if resume is None and self.cfg.train.resume == "auto":
            return newest
        if newest is not None:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (newest: {newest.name}) and resuming is off: "
                "resume it (--resume or train.resume=auto), or choose another out_dir"
            )
        return None

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if self.dist.main:
            logger.info("resuming from %s (step %d)", path, ckpt.step)
        saved_cfg = ckpt.metadata.get(TRAIN_CONFIG_KEY)
        if saved_cfg is not None:
            old = from_dict(Config, json.loads(saved_cfg))
            if (old.model, old.log_scale) != (self.cfg.model, self.cfg.log_scale) and self.dist.main:
                logger.warning("the model / log_scale config differs from the checkpoint's (%s)", path)

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}

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
            raise RuntimeError(f"{path}: the checkpoint does not fit the configured model: {exc}") from None
        state = ckpt.state
        _load_optimizer(self.g_opt, state["generator_optimizer"])
        if self.d_opt is not None and state.get("discriminator_optimizer") is not None:
            _load_optimizer(self.d_opt, state["discriminator_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.noise.set_state(state["rng"]["noise"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.last_finite_step = None if state["last_finite_step"] < 0 else int(state["last_finite_step"])
        if self.dist.main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the resumed step (written by a run killed after its last checkpoint)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a half-written last line
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0) and prune old ones; all ranks wait."""
        path = None
        if self.dist.main:
            metadata = {
                TRAIN_CONFIG_KEY: json.dumps(config_to_dict(self.cfg)),
                "hetvae_config": json.dumps(self.model.config.to_dict()),
                "step": str(self.step),
            }
            path = save_checkpoint(self.ckpt_dir, self.step, tensors=self._tensors(), metadata=metadata, state=self._state())
            prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self._barrier()
        return path

    def export(self) -> Path | None:
        """Write ``model.safetensors`` (EMA when enabled) and ``loss.safetensors`` into the run folder."""
        if not self.dist.main:
            return None
        from safetensors.torch import save_file

        model = self.ema.module if self.ema is not None else self.model
        final = self.run_dir / "model.safetensors"
        tmp = self.run_dir / ".model.tmp.safetensors"
        model.save_pretrained(tmp, format="hetvae")
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
        return bool(t.log_every and steps_done % t.log_every == 0) or steps_done >= t.steps

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        factor = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        if t.lr_schedule == "cosine" and step >= t.warmup_steps:
            progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
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
        use_disc = self.objective.gan_factor(step) > 0
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
            grad_norm = torch.nn.utils.clip_grad_norm_(self.g_params, t.grad_clip or float("inf"))
            sums["grad_norm"] = float(grad_norm)
            # fp16: the scaler skips overflowing steps itself (and lowers its scale); that is normal
            if not math.isfinite(sums["grad_norm"]) and self.amp_dtype is not torch.float16:
                finite = False
        if not finite:
            self.g_opt.zero_grad(set_to_none=True)
            if self.d_opt is not None:
                self.d_opt.zero_grad(set_to_none=True)
            return False, sums
        self.scaler.step(self.g_opt)
        if use_disc and self.d_opt is not None:
            self.scaler.step(self.d_opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        sums["lr"] = t.lr * factor
        return True, sums

    def _micro_step(
        self, x: Tensor, step: int, sync, use_disc: bool, details: bool
    ) -> tuple[dict[str, float], dict[str, float]]:
        t, world, rank = self.cfg.train, self.dist.world_size, self.dist.rank
        f = self.model.config.downsample_factor
        # the whole global batch's noise on every rank, each keeps its slice (see _Generator)
        shape = (t.batch_size, self.model.config.latent_channels, x.shape[-2] // f, x.shape[-1] // f)
        eps = torch.randn(shape, generator=self.noise, device=self.device)
        local = t.batch_size // world
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
        return NonFiniteLossError(
            f"training stopped at step {self.step}: {self.nonfinite_run} consecutive non-finite losses or "
            f"gradients (train.max_nonfinite={t.max_nonfinite}). The last finite step was {last}. Likely "
            f"causes: {'; '.join(causes)}. Newest checkpoint: {newest or 'none'}."
        )

    def run(self) -> TrainResult:
        """Train up to ``cfg.train.steps``; see the module docstring."""
        t = self.cfg.train
        main = self.dist.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        batches = _local_batches(
            self.dataset,
            global_batch=t.batch_size,
            seed=t.seed,
            start=self.step * t.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=self.cfg.data.num_workers,
        )
        bar = tqdm(
            total=t.steps, initial=self.step, desc=str(self.run_dir), unit="step",
            disable=not (main and self.progress), dynamic_ncols=True, mininterval=1.0,
        )
        interval: dict[str, float] = {}
        counts: dict[str, int] = {}  # steps each key was logged in (diagnostics: only the recorded step)
        interval_steps, interval_start = 0, time.perf_counter()
        last_logs: dict[str, float] = {}
        interrupted = False
        try:
            with self._signals():
                while self.step < t.steps:
                    applied, logs = self._train_step(batches)
                    self.step += 1
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
                    for key, value in logs.items():
                        if math.isfinite(value):
                            interval[key] = interval.get(key, 0.0) + value
                            counts[key] = counts.get(key, 0) + 1
                    interval_steps += 1
                    if main and "total" in logs and math.isfinite(logs["total"]):
                        postfix = {"loss": f"{logs['total']:.4g}"}
                        if "log_scale_mean" in logs:
                            postfix["scale"] = f"{math.exp(logs['log_scale_mean']):.3g}"
                        bar.set_postfix(postfix, refresh=False)
                    bar.update(1)

                    done = self.step >= t.steps
                    if self._records_after(self.step):
                        record = self._reduce_logs({k: v / counts[k] for k, v in interval.items()})
                        elapsed = time.perf_counter() - interval_start
                        record.update(
                            step=self.step,
                            steps_per_s=interval_steps / max(elapsed, 1e-9),
                            nonfinite_total=self.nonfinite_total,
                        )
                        last_logs = record
                        if main:
                            self._write_metrics(record)
                        interval, counts, interval_steps, interval_start = {}, {}, 0, time.perf_counter()
                    stop = self._should_stop()
                    if (t.sample_every and self.step % t.sample_every == 0) or done or stop:
                        self.write_samples()
                    # during a non-finite streak the newest checkpoint stays the last good one
                    due = (t.checkpoint_every and self.step % t.checkpoint_every == 0) or done or stop
                    if due and self.nonfinite_run == 0:
                        self.save_checkpoint()
                    if stop:
                        interrupted = True
                        break
        finally:
            bar.close()
        model_file = self.export()
        if main and interrupted:
            print(f"stopped at step {self.step}; resume with --resume (checkpoint {latest_checkpoint(self.ckpt_dir)})",
                  file=sys.stderr)
        self._close()
        return TrainResult(run_dir=self.run_dir, step=self.step, interrupted=interrupted, model_file=model_file, logs=last_logs)

    def _close(self) -> None:
        if self._tb:
            self._tb.close()
        if self.dist.owns_group:
            dist.destroy_process_group()
            self.dist.owns_group = False


def train(
    cfg: Config, *, out_dir: str | os.PathLike | None = None, resume: bool | None = None, progress: bool = True
) -> TrainResult:
    """Train or fine-tune the model of ``cfg``; see the module docstring for the run folder.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite`` consecutive non-finite steps.
        FileNotFoundError: ``resume=True`` and no checkpoint.
        FileExistsError: the run folder holds checkpoints and resuming is off.
    """
    trainer = Trainer(cfg, out_dir=out_dir, resume=resume, progress=progress)
    try:
        return trainer.run()
    except BaseException:
        trainer._close()
        raise
