"""hetvae.optim without a Trainer: which parameters land in which group at which lr and weight
decay, which each gradient-clip group clips, the lr schedule, AdamW's fused kernel against the
per-tensor loop, loading an optimiser state, and the EMA against its closed form."""

import math

import pytest
import torch
from torch import nn

from hetvae.build import build_model, build_nll
from hetvae.config import Config
from hetvae.optim import (
    EMA,
    adamw,
    clip_groups,
    discriminator_groups,
    load_optimizer_state,
    lr_factor,
    parameter_groups,
    set_lr,
)
from hetvae.schema import apply_overrides

TINY = ["model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.layers_per_block=1",
        "model.mid_block_attention=false", "train.lr=1e-3", "train.weight_decay=0.05", "train.head_lr=null"]
PIXEL = ["log_scale.granularity=pixel", "log_scale.head_layers=1", "log_scale.head_channels=8"]


def build(*overrides: str):
    cfg = apply_overrides(Config(), TINY + list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, build_nll(cfg, model)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def head_layers(model) -> list[nn.Parameter]:
    decoder = model.decoder
    return [*decoder.log_scale_trunk.parameters(), decoder.log_scale_head.weight]


# --- parameter groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["global", "channel"])
@pytest.mark.parametrize("log_scale_lr", [None, 0.05])
def test_a_learned_scale_is_a_group_of_its_own_without_decay(granularity, log_scale_lr):
    cfg, model, nll = build(f"log_scale.granularity={granularity}",
                            f"train.log_scale_lr={'null' if log_scale_lr is None else log_scale_lr}")
    network, scale = parameter_groups(cfg.train, model, nll)
    assert ids(network["params"]) == ids(model.parameters())
    assert (network["base_lr"], network["weight_decay"]) == (1e-3, 0.05)
    assert scale["params"] == [nll.head.free]
    assert (scale["base_lr"], scale["weight_decay"]) == (log_scale_lr or 1e-3, 0.0)


def test_a_frozen_scale_is_in_no_group():
    """log_scale.trainable: false (SD's logvar): the scale never moves, so no optimiser holds it."""
    cfg, model, nll = build("log_scale.granularity=global", "log_scale.trainable=false")
    (network,) = parameter_groups(cfg.train, model, nll)
    assert ids(network["params"]) == ids(model.parameters())


def test_the_pixel_heads_bias_is_an_offset_and_its_layers_train_with_the_autoencoder():
    cfg, model, nll = build(*PIXEL, "train.log_scale_lr=1e-2")
    network, offsets = parameter_groups(cfg.train, model, nll)
    bias = model.decoder.log_scale_head.bias
    assert offsets["params"] == [bias] and offsets["base_lr"] == 1e-2 and offsets["weight_decay"] == 0.0
    assert ids(head_layers(model)) <= ids(network["params"])
    assert ids(network["params"]) == ids(model.parameters()) - {id(bias)}


def test_head_lr_puts_the_heads_layers_in_a_group_at_that_lr():
    cfg, model, nll = build(*PIXEL, "train.head_lr=1e-5", "train.log_scale_lr=1e-2")
    groups = parameter_groups(cfg.train, model, nll)
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-5, 1e-2]
    network, head, offsets = groups
    assert ids(head["params"]) == ids(head_layers(model)) and head["weight_decay"] == 0.05
    assert offsets["params"] == [model.decoder.log_scale_head.bias]
    # every trainable tensor in exactly one group
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(ids(every)) == len(ids(model.parameters()))


def test_a_frozen_encoder_is_in_no_group():
    cfg, model, nll = build("train.decoder_only=true", "log_scale.granularity=global")
    model.encoder.requires_grad_(False)  # as the Trainer freezes it, before building the groups
    network, _ = parameter_groups(cfg.train, model, nll)
    assert not ids(network["params"]) & ids(model.encoder.parameters())
    assert ids(network["params"]) == ids(p for p in model.parameters() if p.requires_grad)


def test_the_discriminator_group_takes_disc_lr_or_lr():
    params = [nn.Parameter(torch.zeros(2))]
    cfg = apply_overrides(Config(), TINY)
    assert discriminator_groups(cfg.train, params) == [{"params": params, "base_lr": 1e-3}]
    cfg = apply_overrides(Config(), [*TINY, "train.disc_lr=2e-4"])
    assert discriminator_groups(cfg.train, params)[0]["base_lr"] == 2e-4


# --- clip groups ---------------------------------------------------------------------------------


def test_one_clip_group_by_default_covers_every_generator_parameter():
    cfg, model, nll = build(*PIXEL, "train.grad_clip=0.5", "train.head_lr=1e-4")
    (group,) = clip_groups(cfg.train, model, nll)
    assert (group.name, group.max_norm) == ("grad_norm", 0.5)
    assert ids(group.params) == ids(p for g in parameter_groups(cfg.train, model, nll) for p in g["params"])


@pytest.mark.parametrize("granularity", ["global", "pixel"])
def test_head_grad_clip_clips_the_log_scale_apart(granularity):
    extra = PIXEL[1:] if granularity == "pixel" else []
    cfg, model, nll = build(f"log_scale.granularity={granularity}", *extra, "train.grad_clip=0.5",
                            "train.head_grad_clip=1e-3")
    autoencoder, log_scale = clip_groups(cfg.train, model, nll)
    assert (autoencoder.name, autoencoder.max_norm) == ("grad_norm", 0.5)
    assert (log_scale.name, log_scale.max_norm) == ("head_grad_norm", 1e-3)
    if granularity == "pixel":
        expected = ids(head_layers(model)) | {id(model.decoder.log_scale_head.bias)}
    else:
        expected = {id(nll.head.free)}
    assert ids(log_scale.params) == expected
    assert ids(autoencoder.params) == ids(model.parameters()) - expected


def test_mean_scale_global_clips_the_means_scale_alone():
    cfg, model, nll = build(*PIXEL, "log_scale.faithful=true", "log_scale.mean_scale=global",
                            "train.head_grad_clip=1.0")
    groups = clip_groups(cfg.train, model, nll)
    assert [g.name for g in groups] == ["grad_norm", "head_grad_norm", "mean_scale_grad_norm"]
    mean_scale = groups[2]
    assert ids(mean_scale.params) == ids(nll.mean_head.parameters()) and mean_scale.max_norm == 1.0
    assert not ids(mean_scale.params) & ids(groups[1].params)
    # every generator parameter clipped once
    every = [p for g in groups for p in g.params]
    assert len(every) == len(ids(every)) == len(ids(model.parameters())) + len(ids(nll.parameters()))


# --- the lr schedule -----------------------------------------------------------------------------


def train_cfg(*overrides: str):
    return apply_overrides(Config(), list(overrides)).train


def test_cosine_schedule_warms_up_then_decays_to_zero():
    t = train_cfg("train.steps=12", "train.warmup_steps=2", "train.lr_schedule=cosine")
    factors = [lr_factor(t, step) for step in range(12)]
    assert factors[:2] == [0.5, 1.0]  # linear warm-up, then the cosine starts at its top
    assert factors[2] == 1.0 and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[7] == pytest.approx(0.5)  # half-way through the decay
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    constant = train_cfg("train.steps=12", "train.warmup_steps=2", "train.lr_schedule=constant")
    assert [lr_factor(constant, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_the_head_phase_restarts_the_schedule_without_warm_up():
    t = train_cfg("train.steps=4", "train.head_steps=4", "train.warmup_steps=2", "train.lr_schedule=cosine")
    assert [lr_factor(t, s) for s in range(4, 8)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_set_lr_scales_each_groups_base_lr():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "base_lr": 1.0}, {"params": [b], "base_lr": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.05]


# --- AdamW and its state -------------------------------------------------------------------------


def test_adamw_is_fused_where_the_device_has_the_kernel_and_matches_the_loop():
    """The trainer's AdamW uses PyTorch's fused kernel on the CPU (PyTorch >= 2.4): the same update as
    the per-tensor loop it replaces, within float rounding, over steps with weight decay and
    several groups; and it takes an optimiser state written by the per-tensor loop (older runs)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this PyTorch has no fused AdamW on the CPU")
    cfg, model, nll = build("log_scale.granularity=channel")
    assert adamw(parameter_groups(cfg.train, model, nll), lr=1e-3).defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (3,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]

    def steps(make, params, grads, state=None):
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-2}]
        opt = make(groups, lr=1e-2, betas=(0.5, 0.9))
        if state is not None:
            opt.load_state_dict(state)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        return opt

    def fresh():
        return [nn.Parameter(t.clone()) for t in start]

    loop, fused = fresh(), fresh()
    steps(torch.optim.AdamW, loop, grads)
    assert steps(adamw, fused, grads).defaults["fused"]
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # 3 steps of the per-tensor loop, its state resumed by the fused optimiser for the last 2
    resumed = fresh()
    state = steps(torch.optim.AdamW, resumed, grads[:3]).state_dict()
    steps(adamw, resumed, grads[3:], state=state)
    for a, b in zip(resumed, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_loading_an_optimiser_state_keeps_the_configured_settings():
    """A resumed run takes the moments and step counts of the checkpoint but its own lr, betas and
    weight decay (``Optimizer.load_state_dict`` alone would restore the old ones)."""
    p = nn.Parameter(torch.ones(3))
    old = adamw([{"params": [p], "weight_decay": 0.1, "base_lr": 1e-2}], lr=1e-2, betas=(0.5, 0.9))
    p.grad = torch.full((3,), 0.5)
    old.step()
    q = nn.Parameter(p.detach().clone())
    new = adamw([{"params": [q], "weight_decay": 0.0, "base_lr": 1e-4}], lr=1e-4, betas=(0.9, 0.99))
    load_optimizer_state(new, old.state_dict())
    (group,) = new.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["base_lr"]) == (1e-4, (0.9, 0.99), 0.0, 1e-4)
    assert torch.equal(new.state[q]["exp_avg"], old.state[p]["exp_avg"])
    assert float(new.state[q]["step"]) == 1.0


# --- EMA -----------------------------------------------------------------------------------------


def test_ema_update_is_the_moving_average():
    """ema <- decay * ema + (1 - decay) * param for every parameter; buffers are copied."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.5)
        model[1].running_mean.fill_(2.0)
    ema.update(model)
    for e, s, p in zip(ema.module.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)


def test_ema_of_a_fixed_model_approaches_it_geometrically():
    """k updates towards fixed weights w from e0: e_k = w + decay**k * (e0 - w), in float64."""
    model = nn.Linear(4, 2).double()
    ema = EMA(model, decay=0.8)
    e0 = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(0.25)
    for _ in range(7):
        ema.update(model)
    for e, s, w in zip(ema.module.parameters(), e0, model.parameters()):
        torch.testing.assert_close(e, w + 0.8**7 * (s - w), rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(nn.Linear(1, 1), decay=decay)
