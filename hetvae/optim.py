"""What the trainer optimises and how: the generator's parameter groups, the gradient-clip groups,
AdamW, the learning-rate schedule, loading an optimiser state, and the EMA of the weights.

Plain functions of a config and the modules, so each is testable without a Trainer.

Parameter groups (``train.*`` settings):

* the autoencoder's trainable parameters: ``lr``, ``weight_decay``;
* with ``head_lr``: the pixel head's layers (its hidden convs and output weight) at that lr;
  without, they stay in the autoencoder's group;
* the log-scale *offsets*, the NLL's learned log-scales and the pixel head's bias: ``log_scale_lr``
  (or ``lr``), no weight decay (decay would pull the log-scale towards its init: a prior nobody
  asked for). A frozen log-scale (``log_scale.trainable: false``, as in SD) is in no group.

Each group carries ``base_lr``, which :func:`set_lr` scales by the schedule's factor (:func:`lr_factor`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import nn

from hetvae.autoencoder import AutoencoderKL
from hetvae.config import TrainConfig
from hetvae.loss import HeteroscedasticNLL

__all__ = [
    "EMA",
    "ClipGroup",
    "adamw",
    "clip_groups",
    "discriminator_groups",
    "load_optimizer_state",
    "lr_factor",
    "parameter_groups",
    "set_lr",
]


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


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
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


class _Split(NamedTuple):
    autoencoder: list[nn.Parameter]  # the autoencoder's own group
    head: list[nn.Parameter]  # the pixel head's layers when they have a group of their own (head_lr)
    head_layers: list[nn.Parameter]  # the pixel head's trainable layers, wherever their group
    scale: list[nn.Parameter]  # the log-scale offsets: the NLL's learned log-scales, the head's bias


def _split(train: TrainConfig, model: AutoencoderKL, nll: HeteroscedasticNLL) -> _Split:
    head, trunk = model.decoder.log_scale_head, model.decoder.log_scale_trunk
    offsets = [head.bias] if head is not None and head.bias is not None and head.bias.requires_grad else []
    scale = [p for p in nll.parameters() if p.requires_grad] + offsets
    layers = [*(trunk.parameters() if trunk is not None else ()), *([head.weight] if head is not None else [])]
    head_layers = [p for p in layers if p.requires_grad]
    own_head = head_layers if train.head_lr is not None else []
    special = offsets + own_head
    autoencoder = [p for p in model.parameters() if p.requires_grad and not any(p is o for o in special)]
    return _Split(autoencoder, own_head, head_layers, scale)


def parameter_groups(train: TrainConfig, model: AutoencoderKL, nll: HeteroscedasticNLL) -> list[dict[str, Any]]:
    """The generator optimiser's groups (see the module docstring): the autoencoder's, the head's
    (only with ``train.head_lr``), the log-scale offsets' (only when something there trains), each
    with ``params``, ``weight_decay`` and ``base_lr``. Parameters with ``requires_grad`` off (a
    frozen encoder: freeze before calling) are in none."""
    split = _split(train, model, nll)
    groups = [{"params": split.autoencoder, "weight_decay": train.weight_decay, "base_lr": train.lr}]
    if split.head:
        groups.append({"params": split.head, "weight_decay": train.weight_decay, "base_lr": train.head_lr})
    if split.scale:
        groups.append({"params": split.scale, "weight_decay": 0.0, "base_lr": train.log_scale_lr or train.lr})
    return groups


def discriminator_groups(train: TrainConfig, params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """The discriminator optimiser's one group, at ``train.disc_lr`` (or ``lr``)."""
    return [{"params": params, "base_lr": train.disc_lr or train.lr}]


class ClipGroup(NamedTuple):
    """Parameters whose gradients are clipped to one norm; ``name`` is the norm's key in the
    logs, ``max_norm`` None: measured, not clipped."""

    name: str
    params: list[nn.Parameter]
    max_norm: float | None


def clip_groups(train: TrainConfig, model: AutoencoderKL, nll: HeteroscedasticNLL) -> list[ClipGroup]:
    """The gradient-clip groups. By default one, ``grad_norm``: every generator parameter to
    ``train.grad_clip``. With ``train.head_grad_clip`` the log-scale's parameters (the pixel head
    whole, the global / channel scale) are clipped on their own, ``head_grad_norm``, so the map's
    gradient never rescales the mean's; and with ``log_scale.mean_scale=global`` the mean's own
    scale alone too, ``mean_scale_grad_norm``, as a global model's is."""
    split = _split(train, model, nll)
    everything = split.autoencoder + split.head + split.scale
    if train.head_grad_clip is None:
        return [ClipGroup("grad_norm", everything, train.grad_clip)]
    log_scale = split.head_layers + split.scale
    mean_scale = [] if nll.mean_head is None else [p for p in nll.mean_head.parameters() if p.requires_grad]
    groups = [
        ClipGroup("grad_norm", [p for p in everything if not any(p is q for q in log_scale)], train.grad_clip),
        ClipGroup("head_grad_norm", [p for p in log_scale if not any(p is q for q in mean_scale)], train.head_grad_clip),
    ]
    if mean_scale:
        groups.append(ClipGroup("mean_scale_grad_norm", mean_scale, train.head_grad_clip))
    return groups


def lr_factor(train: TrainConfig, step: int) -> float:
    """The factor of every group's ``base_lr`` at optimiser step ``step`` (0-based): a linear
    warm-up over ``warmup_steps``, then 1 (``lr_schedule: constant``) or a cosine decay to 0 at
    ``steps`` (``cosine``). The head-only phase (``head_steps`` after ``steps``) restarts at 1
    without warm-up and follows the schedule over its own length."""
    if step >= train.steps:  # the head-only phase: a restart without warm-up
        factor, progress = 1.0, (step - train.steps) / max(train.head_steps, 1)
    else:
        factor = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps > 0 else 1.0
        progress = (
            (step - train.warmup_steps) / max(train.steps - train.warmup_steps, 1) if step >= train.warmup_steps else None
        )
    if train.lr_schedule == "cosine" and progress is not None:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its ``base_lr`` times ``factor``."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore moments and step counts, but keep the *configured* hyper-parameters.

    ``Optimizer.load_state_dict`` also restores each group's lr, betas and weight decay; a run
    resumed with a changed ``train.lr`` would silently keep the old one.
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, configured):
        group.update(settings)
