"""The config check refuses a head-only phase with nothing to train (issue 35, item 13) and a final
phase whose batch is not a whole number of crops (item 20), naming the keys and the value, instead
of training and then crashing (13) or silently rounding the batch (20)."""

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetvae.config import Config, load_config
from hetvae.schema import ConfigError, apply_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# --- item 13: the head-only phase needs a log-scale with parameters ------------------------------


@pytest.mark.parametrize("granularity", ["global", "channel"])
@pytest.mark.parametrize("head_steps", [1, 300])
@pytest.mark.parametrize("extra", [[], ["log_scale.faithful=true"], ["log_scale.faithful=true", "log_scale.mean_scale=global"],
                                   ["train.head_grad_clip=1.0"]])
def test_optimal_fit_with_head_steps_is_refused(granularity, head_steps, extra):
    """It trained the main steps and then stopped with 'element 0 of tensors does not require grad'."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [f"log_scale.granularity={granularity}", "log_scale.fit=optimal", *extra,
                                   f"train.head_steps={head_steps}"])
    message = str(info.value)
    assert info.value.key == "train.head_steps"
    assert message.startswith("train.head_steps:") and "log_scale.fit=optimal" in message and f"got {head_steps}" in message
    assert "log_scale.fit=learned" in message and "train.head_steps=0" in message  # what to write instead


def test_optimal_fit_with_head_steps_is_refused_from_a_file_and_on_a_resume(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("log_scale: {fit: optimal}\ntrain: {head_steps: 10}\n")
    with pytest.raises(ConfigError, match=r"^train\.head_steps: .*log_scale\.fit=optimal.*cfg\.yaml"):
        load_config(path)
    # the way docs/config.md suggests fitting a finished run's head: --resume --set train.head_steps=300
    finished = apply_overrides(Config(), ["log_scale.fit=optimal"])
    with pytest.raises(ConfigError, match=r"^train\.head_steps:"):
        apply_overrides(finished, ["train.head_steps=300"])
    assert apply_overrides(finished, ["train.head_steps=0"]) == finished


LOG_SCALES = [
    dict(zip(("granularity", "fit", "trainable", "faithful", "mean_scale"), combo))
    for combo in itertools.product(["global", "channel", "pixel"], ["learned", "optimal"], [True, False], [False, True],
                                   ["map", "global"])
]


@pytest.mark.parametrize("log_scale", LOG_SCALES, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_a_head_phase_is_accepted_exactly_where_it_has_parameters(log_scale):
    """Every log-scale setting with train.head_steps > 0: the config is refused, or the head-only
    phase finds parameters to train (the sibling of fit=optimal is trainable=false)."""
    import torch

    from hetvae.build import build_model, build_objective

    overrides = [f"log_scale.{k}={str(v).lower()}" for k, v in log_scale.items()]
    small = ["model.block_out_channels=[8, 8]", "data.resolution=16", "train.batch_size=2"]
    try:
        apply_overrides(Config(), [*small, *overrides])  # the setting itself, without a head phase
    except ConfigError:
        return  # refused whatever the phases
    try:
        cfg = apply_overrides(Config(), [*small, *overrides, "train.head_steps=5"])
    except ConfigError as error:
        assert error.key == "train.head_steps", str(error)
        assert log_scale["fit"] == "optimal" or not log_scale["trainable"], log_scale
        return
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = build_objective(cfg, model)
    decoder = model.decoder
    head = [p for m in (decoder.log_scale_trunk, decoder.log_scale_head) if m is not None for p in m.parameters()]
    assert head + objective.trainable_parameters(), log_scale


# --- item 20: the final phase's batch is a whole number of crops ---------------------------------


@pytest.mark.parametrize(
    "batch, resolution, final, shown, multiple",
    [(8, 16, 24, "32/9", 9), (4, 16, 24, "16/9", 9), (1, 32, 128, "1/16", 16), (16, 32, 96, "16/9", 9),
     (3, 32, 64, "3/4", 4), (1, 24, 16, "9/4", 4)],
)
def test_a_final_batch_that_is_not_whole_is_refused(batch, resolution, final, shown, multiple):
    """Was rounded (at least 1) without a word: 8 crops of 16 px became 4 of 24 px, not 3.56."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["model.block_out_channels=[8, 8]", f"data.resolution={resolution}",
                                   f"train.batch_size={batch}", "train.final_steps=1", f"train.final_resolution={final}"])
    message = str(info.value)
    assert info.value.key == "train.final_resolution"
    for words in ("train.batch_size", "data.resolution", "train.final_resolution", f"= {shown} =", "whole number",
                  f"multiple of {multiple}"):
        assert words in message, (words, message)


@given(
    batch=st.integers(1, 64),
    resolution=st.integers(1, 32).map(lambda k: 8 * k),
    final=st.integers(1, 32).map(lambda k: 8 * k),
    final_steps=st.sampled_from([0, 1, 7]),
)
def test_the_final_batch_is_whole_or_refused(batch, resolution, final, final_steps):
    from hetvae.config import final_batch_size

    overrides = ["model.block_out_channels=[8, 8]", f"data.resolution={resolution}", f"train.batch_size={batch}",
                 f"train.final_steps={final_steps}", f"train.final_resolution={final}"]
    whole = (batch * resolution**2) % final**2 == 0
    try:
        cfg = apply_overrides(Config(), overrides)
    except ConfigError as error:
        assert final_steps and not whole, (overrides, str(error))
        assert error.key == "train.final_resolution"
        return
    assert whole or not final_steps, overrides  # an unused final_resolution (final_steps 0) is not checked
    if final_steps:
        assert final_batch_size(cfg) == batch * resolution**2 // final**2  # exact, nothing rounded


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_have_whole_final_batches(path):
    from hetvae.config import final_batch_size

    cfg = load_config(path)
    if cfg.train.final_steps:
        crops = cfg.train.batch_size * cfg.data.resolution**2 / cfg.train.final_resolution**2
        assert final_batch_size(cfg) == crops
