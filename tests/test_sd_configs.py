"""The shipped SD configs (configs/sd-*.yaml) stand alone: none takes a CPU-demo choice, by a
``base:`` file or by a key. Every file the glob finds is checked, so a new SD config is too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hetvae.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SD_CONFIGS = sorted((REPO / "configs").glob("sd-*.yaml"))


def demo_choices(cfg: Config) -> list[str]:
    """The CPU demo's choices (configs/tiny.yaml, pixel.yaml) that ``cfg`` makes: augmentations that
    change the photographs, procedural images, a low-resolution final phase, an epoch of a fixed
    number of crops, the loader in the main process, crops of demo size."""
    d, t = cfg.data, cfg.train
    found = []
    if d.tint_gray > 0:
        found.append(f"data.tint_gray={d.tint_gray} (grey photographs tinted)")
    if d.procedural > 0:
        found.append(f"data.procedural={d.procedural} (dead-leaves images)")
    if d.rescale is not None:
        found.append(f"data.rescale={list(d.rescale)}")
    if d.color_jitter > 0:
        found.append(f"data.color_jitter={d.color_jitter}")
    if d.samples_per_epoch is not None:
        found.append(f"data.samples_per_epoch={d.samples_per_epoch}")
    if d.num_workers == 0:
        found.append("data.num_workers=0 (the loader in the training process)")
    if t.final_steps or t.final_resolution is not None:
        found.append(f"train.final_steps={t.final_steps}, final_resolution={t.final_resolution}")
    if d.resolution < 256:
        found.append(f"data.resolution={d.resolution} (SD trains on 256 px crops)")
    return found


def test_the_glob_finds_the_sd_configs():
    names = {p.name for p in SD_CONFIGS}
    assert {"sd-finetune-pixel.yaml", "sd-reference.yaml"} <= names


def test_demo_choices_are_found_in_the_demo_configs():
    """The check can fail: every demo config makes several of these choices."""
    for name in ("tiny", "pixel"):
        found = demo_choices(load_config(REPO / "configs" / f"{name}.yaml"))
        assert len(found) >= 6, (name, found)


@pytest.mark.parametrize("path", SD_CONFIGS, ids=lambda p: p.name)
def test_sd_config_makes_no_demo_choice(path):
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.get("base")
    assert base is None or Path(base).name.startswith("sd-"), f"{path.name}: base: {base} (a demo config)"
    found = demo_choices(load_config(path))
    assert not found, f"{path.name} makes the CPU demo's choices: {'; '.join(found)}"


def test_sd_finetune_is_an_sd_recipe():
    """Decoder-only, EMA, LPIPS at SD's weight, a discriminator that starts later, bf16, gradient
    checkpointing, loader workers on."""
    cfg = load_config(REPO / "configs" / "sd-finetune-pixel.yaml")
    t, o = cfg.train, cfg.objective
    assert cfg.model.init_from != "scratch" and t.decoder_only
    assert t.ema_decay is not None and 0.99 <= t.ema_decay < 1
    assert o.perceptual_weight == 1.0 and o.perceptual_mode == "sd" and o.perceptual_weights != "random"
    assert o.disc_start is not None and 0 < o.disc_start < t.steps
    assert t.precision == "bf16" and t.gradient_checkpointing
    assert cfg.data.num_workers == "auto"
    assert cfg.log_scale.granularity == "pixel" and cfg.log_scale.init == -3.0
