"""Training loop: exact resume, frozen encoder, learned log-scales, non-finite handling, run folder,
crash safety (kill -9), signals, DDP equivalence and the CLI. Tiny models on 16 px crops."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
from hetvae.cli import main as cli_main
from hetvae.config import Config, load_config, save_config
from hetvae.schema import ConfigError, apply_overrides, from_dict
from hetvae.convert import load_autoencoder
from hetvae.train import NonFiniteLossError, Trainer, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four 40x40 images with edges and texture (seeded), as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    for i in range(4):
        base = ((xx + 3 * i) // 8 + yy // 8) % 2 * 160 + 40  # checker edges
        noise = rng.integers(0, 40, size=(40, 40))
        rgb = np.stack([base + noise, base[::-1] + noise, np.full_like(base, 90 + 20 * i)], axis=-1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def make_cfg(images: Path, out_dir: Path, *overrides: str) -> Config:
    base = [
        "model.block_out_channels=[16, 32]",
        "model.norm_num_groups=8",
        "model.layers_per_block=1",
        "model.mid_block_attention=false",
        f"data.path={images}",
        "data.resolution=16",
        "data.samples_per_epoch=12",
        "train.steps=4",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=0",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=0",
        "train.seed=3",
        "train.device=cpu",  # bit-exact resumes and gloo DDP: CPU semantics, also where a GPU is
        f"out_dir={out_dir}",
    ]
    return apply_overrides(Config(), base + list(overrides))


def all_tensors(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer._tensors().items()}


# --- exactness ----------------------------------------------------------------------------------

# One run that carries every kind of state a sloppy resume would lose: the loss's own log-scale
# parameters (channel), the discriminator and its optimiser (BatchNorm buffers included), EMA,
# gradient accumulation (data position = step * grad_accum) and the warm-up schedule.
RESUME_OVERRIDES = [
    "log_scale.granularity=channel", "objective.disc_start=1", "objective.disc_layers=1",
    "train.ema_decay=0.9", "train.grad_accum=2", "train.warmup_steps=3", "data.samples_per_epoch=20",
]


def test_resume_is_bit_exact(images, tmp_path):
    overrides = RESUME_OVERRIDES
    straight = train(make_cfg(images, tmp_path / "a", *overrides), progress=False)
    assert straight.step == 4

    half = make_cfg(images, tmp_path / "b", *overrides, "train.steps=2")
    assert train(half, progress=False).step == 2
    resumed = Trainer(make_cfg(images, tmp_path / "b", *overrides), resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()

    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert a.step == b.step == 4
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    # the optimiser moments too: the next step would diverge otherwise
    for sa, sb in zip(a.state["generator_optimizer"]["state"].values(), b.state["generator_optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # and something did train, the discriminator included
    assert b.state["discriminator_optimizer"]["state"]
    first = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000002")
    assert not torch.equal(first.tensors["autoencoder.decoder.conv_out.weight"], a.tensors["autoencoder.decoder.conv_out.weight"])


def test_decoder_only_freezes_encoder_and_quant_conv(images, tmp_path):
    trainer = Trainer(make_cfg(images, tmp_path / "run", "train.decoder_only=true", "train.steps=3"), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)


@pytest.mark.parametrize("granularity", ["global", "channel", "pixel"])
def test_log_scale_is_trained(images, tmp_path, granularity):
    trainer = Trainer(make_cfg(images, tmp_path / "run", f"log_scale.granularity={granularity}", "train.lr=1e-2"), progress=False)
    if granularity == "pixel":
        param = trainer.model.decoder.log_scale_head.bias
    else:
        (param,) = trainer.objective.trainable_parameters()
        assert any(param is p for group in trainer.g_opt.param_groups for p in group["params"])
    before = param.detach().clone()
    trainer.run()
    assert not torch.allclose(param.detach(), before)


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.slow), "fp16"])  # CPU bf16 is slow
def test_mixed_precision_trains(images, tmp_path, precision):
    """Autocast on the CPU (bf16 / fp16 with a grad scaler): finite losses, the model moves."""
    trainer = Trainer(make_cfg(images, tmp_path / "run", f"train.precision={precision}", "train.steps=2",
                               "log_scale.granularity=pixel"), progress=False)
    before = trainer.model.decoder.conv_out.weight.detach().clone()
    result = trainer.run()
    # fp16 overflow at the scaler's initial scale is normal: the scaler skips and backs off, and
    # those steps are not counted as non-finite
    assert trainer.nonfinite_total == 0 and np.isfinite(result.logs["total"])
    assert trainer.model.decoder.conv_out.weight.dtype == torch.float32  # master weights stay fp32
    moved = not torch.equal(before, trainer.model.decoder.conv_out.weight)
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and (moved or trainer.scaler.get_scale() < 2.0**16)
    else:
        assert moved and not trainer.scaler.is_enabled()


# --- non-finite losses --------------------------------------------------------------------------


def _poison(trainer: Trainer, bad_steps) -> None:
    real = trainer.objective.generator_loss

    def generator_loss(inputs, reconstruction, posterior, step, **kwargs):
        loss, logs = real(inputs, reconstruction, posterior, step, **kwargs)
        if step in bad_steps:
            loss = loss * float("nan")
            logs["total"] = float("nan")
        return loss, logs

    trainer.objective.generator_loss = generator_loss


def test_nonfinite_step_is_skipped_and_counted(images, tmp_path):
    trainer = Trainer(make_cfg(images, tmp_path / "run", "train.checkpoint_every=1"), progress=False)
    _poison(trainer, bad_steps={1})  # the second step (0-based step index 1)
    real_step, seen = trainer._train_step, []

    def watched(batches):
        before = {k: v.clone() for k, v in trainer._tensors().items()}
        applied, logs = real_step(batches)
        changed = any(not torch.equal(v, trainer._tensors()[k]) for k, v in before.items())
        seen.append((applied, changed))
        return applied, logs

    trainer._train_step = watched
    trainer.run()
    assert seen == [(True, True), (False, False), (True, True), (True, True)]  # the bad step changed nothing
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_total"] for r in records] == [0, 1, 1, 1]
    assert all(np.isfinite(r["total"]) for r in records if "total" in r)
    # no checkpoint of the bad step: the newest stays the last good one until training recovers
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1, 3, 4]


def test_consecutive_nonfinite_steps_stop_training(images, tmp_path):
    trainer = Trainer(make_cfg(images, tmp_path / "run", "train.steps=10", "train.max_nonfinite=3"), progress=False)
    _poison(trainer, bad_steps=set(range(2, 10)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive.*last finite step was step 2.*learning rate"):
        trainer.run()
    # the last good checkpoint is intact and resumable
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"  # none during the streak


# --- run folder -----------------------------------------------------------------------------------


def test_run_folder_layout_and_exports(images, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "log_scale.granularity=pixel", "train.ema_decay=0.5", "train.steps=5",
                   "train.keep_checkpoints=2", "train.checkpoint_every=1", "train.sample_every=2", "train.log_every=2")
    trainer = Trainer(cfg, progress=False)
    real, asked = trainer.objective.generator_loss, []

    def generator_loss(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        asked.append((kwargs["details"], "bpd" in logs))
        return loss, logs

    trainer.objective.generator_loss = generator_loss
    result = trainer.run()
    assert result.model_file == run / "model.safetensors"
    assert load_config(run / "config.yaml") == cfg
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [4, 5]  # keep last 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "latest.png", "step_0000002.png", "step_0000004.png", "step_0000005.png"
    ]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    # the diagnostics are computed on the recorded steps only, and every record has them
    assert asked == [(False, False), (True, True), (False, False), (True, True), (True, True)]
    assert all(0 < r["bpd"] < 16 and "log_scale_std" in r for r in records)

    # the exported model is the EMA, loadable with no other file
    model = load_autoencoder(run)
    assert model.has_log_scale_head
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.ema.module.state_dict()[k]), k
    # the checkpoint embeds its config, and its state is plain data
    ckpt = load_checkpoint(run / "checkpoints" / "step_00000005")
    assert from_dict(Config, json.loads(ckpt.metadata["hetvae_train_config"])) == cfg
    torch.load(run / "checkpoints" / "step_00000005" / STATE_FILE, weights_only=True)


def test_resume_flags(images, tmp_path):
    cfg = make_cfg(images, tmp_path / "run", "train.steps=2")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg, resume=True, progress=False)
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        Trainer(apply_overrides(cfg, ["train.resume=never"]), progress=False)
    assert Trainer(cfg, progress=False).step == 2  # resume: auto
    # a resumed run takes the configured hyper-parameters, not the checkpoint's
    changed = Trainer(apply_overrides(cfg, ["train.lr=1e-5", "train.betas=[0.5, 0.9]"]), progress=False)
    assert changed.step == 2 and changed.g_opt.state  # moments restored
    assert changed.g_opt.param_groups[0]["base_lr"] == 1e-5 and changed.g_opt.param_groups[0]["betas"] == (0.5, 0.9)


# --- processes: kill -9, signals, DDP, CLI -------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the training process")


def _start(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hetvae.cli", "train", str(cfg_path), "--no-progress"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_kill_9_leaves_a_loadable_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "train.steps=100000", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                   "train.log_every=1")
    cfg_path = save_config(cfg, tmp_path / "cfg.yaml")
    proc = _start(cfg_path)
    ckpts = run / "checkpoints"
    _wait_for(lambda: len(list_checkpoints(ckpts)) >= 2, proc)
    time.sleep(0.137)  # land somewhere inside a later step or save
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    newest = latest_checkpoint(ckpts)
    ckpt = load_checkpoint(newest)
    assert ckpt.step >= 2 and "autoencoder.decoder.conv_out.weight" in ckpt.tensors
    # resume from it for two more steps
    result = train(apply_overrides(cfg, [f"train.steps={ckpt.step + 2}"]), resume=True, progress=False)
    assert result.step == ckpt.step + 2
    assert not list(ckpts.glob(".tmp-*"))  # the next save cleaned up a half-written folder, if any
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, ckpt.step + 3))  # log lines past the checkpoint were dropped


def test_sigint_finishes_the_step_and_checkpoints(images, tmp_path):
    trainer = Trainer(make_cfg(images, tmp_path / "run", "train.steps=50", "train.checkpoint_every=0"), progress=False)
    real_step = trainer._train_step

    def step_then_ctrl_c(batches):
        out = real_step(batches)
        if trainer.step == 2:  # arrives mid-step 3 (self.step counts finished steps)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer._train_step = step_then_ctrl_c
    handler = signal.getsignal(signal.SIGINT)
    result = trainer.run()
    assert result.interrupted and result.step == 3
    assert load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints")).step == 3
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run
    resumed = Trainer(make_cfg(images, tmp_path / "run", "train.steps=4"), progress=False)
    assert resumed.step == 3 and resumed.run().step == 4


def test_sigterm_in_a_subprocess_exits_143_with_a_checkpoint(images, tmp_path):
    signum = signal.SIGTERM
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "train.steps=100000", "train.checkpoint_every=0", "train.log_every=1")
    proc = _start(save_config(cfg, tmp_path / "cfg.yaml"))
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]  # not 0: it did not finish
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and load_checkpoint(newest).step >= 2
    assert (run / "model.safetensors").is_file()
    assert b"interrupted at step" in out


def _one_and_two_processes(images: Path, tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    """The same config trained in this process (run "one") and by torchrun in 2 gloo processes
    (run "two"); returns the newest checkpoint's tensors of each."""
    train(make_cfg(images, tmp_path / "one", *overrides), progress=False)
    cfg_path = save_config(make_cfg(images, tmp_path / "two", *overrides), tmp_path / "cfg.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "hetvae.cli", "train", str(cfg_path), "--no-progress"],
        env=_env(), capture_output=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    batch = make_cfg(images, tmp_path / "two", *overrides).train.batch_size
    # the start line says train.batch_size is the global micro-batch, once (rank 0)
    assert proc.stderr.decode().count(f"train.batch_size={batch} images is the global micro-batch, split over 2 "
                                      f"processes: {batch // 2} images per process") == 1
    return tuple(load_checkpoint(latest_checkpoint(tmp_path / run / "checkpoints")).tensors for run in ("one", "two"))


def test_ddp_two_processes_match_one(images, tmp_path):
    """gloo, 2 CPU processes x 2 images = 1 process x 4 images. No discriminator: its BatchNorm
    statistics are per rank by design (see hetvae.train), so they would differ."""
    common = ["log_scale.granularity=channel", "train.ema_decay=0.8", "train.grad_accum=2",
              "data.samples_per_epoch=20", "train.steps=3", "train.checkpoint_every=0",
              f"data.val_path={images}", "train.val_every=2", "train.keep_best=true"]  # rank 0 validates, rank 1 waits
    a, b = _one_and_two_processes(images, tmp_path, common)
    assert a.keys() == b.keys()
    val = {run: [r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                 if "val_nll_bpd" in r] for run in ("one", "two")}
    assert [r["step"] for r in val["two"]] == [r["step"] for r in val["one"]] == [2, 3]
    for x, y in zip(val["one"], val["two"]):
        assert y["val_nll_bpd"] == pytest.approx(x["val_nll_bpd"], abs=1e-3)
    assert (tmp_path / "two" / "best" / "model.safetensors").is_file()
    # Summation order differs, and Adam divides by sqrt(v): an element whose gradient is ~0 can move
    # by up to lr from rounding alone. So: every element within half an lr step, and nearly all
    # within 1e-6 (a wrong split or missing gradient average moves most elements by ~lr).
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-6).float().mean() < 1e-3
    first = load_autoencoder(tmp_path / "one")
    assert first is not None and load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints")).step == 3
    # the two runs trained (compare to a fresh init with the same seed)
    torch.manual_seed(3)
    from hetvae.build import build_model

    init = build_model(make_cfg(images, tmp_path / "x", *common)).state_dict()
    moved = sum(not torch.allclose(init[k], a[f"autoencoder.{k}"]) for k in init)
    assert moved > 10


def _head_names(model) -> set[str]:
    return {f"autoencoder.{k}" for k, _ in model.named_parameters() if k.startswith("decoder.log_scale_")}


def test_head_steps_fit_only_the_head_on_the_ema_mean(images, tmp_path):
    """train.head_steps: after `steps`, the autoencoder takes its EMA weights and freezes; only the
    pixel head (its layers and offset) trains. Everything else ends where the EMA of the first
    phase was, which a run of `steps` alone exports."""
    common = ["log_scale.granularity=pixel", "log_scale.head_layers=1", "log_scale.head_channels=8",
              "train.ema_decay=0.5", "train.steps=2", "train.checkpoint_every=0"]
    first = train(make_cfg(images, tmp_path / "a", *common), progress=False)
    assert first.step == 2
    both = Trainer(make_cfg(images, tmp_path / "b", *common, "train.head_steps=3"), progress=False)
    result = both.run()
    assert result.step == 5 and both._head_phase
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints")).tensors
    b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints")).tensors
    head = _head_names(both.model)
    assert len(head) == 4  # one hidden conv and the output conv, weights and biases
    for key, value in a.items():
        if key.startswith("ema.") and f"autoencoder.{key[4:]}" not in head:
            # the frozen autoencoder is the first phase's EMA, in the model and in its own EMA
            assert torch.equal(b[f"autoencoder.{key[4:]}"], value), key
            assert torch.equal(b[key], value), key
    for key in head:
        assert not torch.equal(b[key], a[f"ema.{key[len('autoencoder.'):]}"]), key
    assert all(p.requires_grad == (f"autoencoder.{n}" in head) for n, p in both.model.named_parameters())


def test_head_steps_resume_is_bit_exact(images, tmp_path):
    """A run resumed inside the head phase, or a finished run resumed with head_steps added (a
    key a resume may change), ends bit for bit where the straight run does."""
    common = ["log_scale.granularity=pixel", "log_scale.head_channels=8", "train.ema_decay=0.5",
              "train.steps=2", "train.checkpoint_every=1"]
    train(make_cfg(images, tmp_path / "straight", *common, "train.head_steps=3"), progress=False)
    train(make_cfg(images, tmp_path / "inside", *common, "train.head_steps=1"), progress=False)
    inside = Trainer(make_cfg(images, tmp_path / "inside", *common, "train.head_steps=3"), resume=True, progress=False)
    assert inside.step == 3 and inside._head_phase  # restored frozen, not switched to the EMA again
    inside.run()
    train(make_cfg(images, tmp_path / "added", *common), progress=False)
    added = Trainer(make_cfg(images, tmp_path / "added", *common, "train.head_steps=3"), resume=True, progress=False)
    assert added.step == 2 and not added._head_phase
    added.run()
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert a.step == 5
    for run in ("inside", "added"):
        b = load_checkpoint(latest_checkpoint(tmp_path / run / "checkpoints"))
        assert b.step == 5 and a.tensors.keys() == b.tensors.keys()
        for key in a.tensors:
            assert torch.equal(a.tensors[key], b.tensors[key]), (run, key)


def test_final_steps_train_on_large_crops_with_the_same_pixels(images, tmp_path, monkeypatch):
    """train.final_steps: the last steps (and the head phase after them) see final_resolution
    crops in batches holding the same pixels, and the posterior noise matches the batch."""
    seen = []
    original = Trainer._micro_step

    def record(self, x, step, *args):
        seen.append((step, tuple(x.shape)))
        return original(self, x, step, *args)

    monkeypatch.setattr(Trainer, "_micro_step", record)
    cfg = make_cfg(images, tmp_path / "run", "log_scale.granularity=pixel", "log_scale.head_channels=8",
                   "train.final_steps=2", "train.final_resolution=32", "train.head_steps=1", "train.ema_decay=0.5")
    train(cfg, progress=False)
    assert seen == [(0, (4, 3, 16, 16)), (1, (4, 3, 16, 16)), (2, (1, 3, 32, 32)), (3, (1, 3, 32, 32)),
                    (4, (1, 3, 32, 32))]
    # the same pixels must make whole crops: 4 crops of 16 px are 1.78 crops of 24 px, refused
    with pytest.raises(ConfigError, match="whole number"):
        make_cfg(images, tmp_path / "r", "train.final_steps=1", "train.final_resolution=24")


def test_final_steps_resume_is_bit_exact(images, tmp_path):
    """A run resumed at the switch to the large crops, or inside that phase, ends bit for bit
    where the uninterrupted run does: each stream restarts at its own position."""
    common = ["train.final_steps=2", "train.final_resolution=32", "train.checkpoint_every=1",
              "train.ema_decay=0.5", "train.warmup_steps=2"]
    train(make_cfg(images, tmp_path / "straight", *common), progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert a.step == 4
    for name, kept in (("at-switch", 2), ("inside", 3)):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "straight", folder)
        for step, path in list_checkpoints(folder / "checkpoints"):
            if step > kept:
                shutil.rmtree(path)
        resumed = Trainer(make_cfg(images, folder, *common), resume=True, progress=False)
        assert resumed.step == kept
        resumed.run()
        b = load_checkpoint(latest_checkpoint(folder / "checkpoints"))
        assert b.step == 4 and a.tensors.keys() == b.tensors.keys()
        for key in a.tensors:
            assert torch.equal(a.tensors[key], b.tensors[key]), (name, key)
    # and the large crops did something: the same run without them ends elsewhere
    train(make_cfg(images, tmp_path / "small", *common[2:]), progress=False)
    c = load_checkpoint(latest_checkpoint(tmp_path / "small" / "checkpoints"))
    assert not torch.equal(a.tensors["autoencoder.decoder.conv_out.weight"], c.tensors["autoencoder.decoder.conv_out.weight"])


def test_head_steps_global_scale_trains_alone(images, tmp_path):
    """Without a head the phase trains the loss's global log-scale only; the model stands still
    (no EMA: the weights the first phase ended with)."""
    trainer = Trainer(make_cfg(images, tmp_path / "g", "train.steps=2", "train.head_steps=2",
                               "train.log_scale_lr=0.1"), progress=False)
    trainer.run()
    mid = load_checkpoint(tmp_path / "g" / "checkpoints" / "step_00000002").tensors
    end = load_checkpoint(latest_checkpoint(tmp_path / "g" / "checkpoints")).tensors
    for key, value in mid.items():
        if key.startswith("autoencoder."):
            assert torch.equal(end[key], value), key
    (scale,) = [k for k in mid if k.startswith("loss.")]
    assert not torch.equal(end[scale], mid[scale])


def test_head_steps_config_errors():
    with pytest.raises(ConfigError, match=r"train.head_steps.*log_scale.trainable=false"):
        apply_overrides(Config(), ["log_scale.trainable=false", "train.head_steps=5"])
    with pytest.raises(ConfigError, match=r"head_steps.*must be >= 0, got -1"):
        apply_overrides(Config(), ["train.head_steps=-1"])


def test_ddp_head_phase_matches_one_process(images, tmp_path):
    """The head phase runs outside DDP (frozen parameters get no gradient, which DDP refuses) and
    averages the head's gradients by hand: 2 gloo processes still match one."""
    common = ["log_scale.granularity=pixel", "log_scale.head_channels=8", "train.ema_decay=0.8",
              "data.samples_per_epoch=20", "train.steps=1", "train.head_steps=2", "train.checkpoint_every=1"]
    a, b = _one_and_two_processes(images, tmp_path, common)
    for key in a:  # within half an lr step: see test_ddp_two_processes_match_one
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)
    first = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000001").tensors
    head_key = "autoencoder.decoder.log_scale_head.weight"
    assert not torch.equal(first[head_key], a[head_key])  # the head trained in the phase


def test_cli_train(images, tmp_path):
    cfg_path = save_config(make_cfg(images, tmp_path / "ignored", "train.steps=2"), tmp_path / "cfg.yaml")
    out = tmp_path / "cli_run"
    assert cli_main(["train", str(cfg_path), "--set", "train.steps=1", "--out", str(out), "--no-progress"]) == 0
    assert load_config(out / "config.yaml").train.steps == 1
    assert (out / "model.safetensors").is_file()
    assert cli_main(["train", str(cfg_path), "--set", "train.steps=3", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(latest_checkpoint(out / "checkpoints")).step == 3
    assert cli_main(["train", str(cfg_path), "--set", "train.stepz=3"]) == 1  # a config error is exit 1


def test_cli_train_a_run_folder(images, tmp_path, capsys):
    """`hetvae train RUN --resume`: a run folder stands for its config.yaml and is the run folder,
    also when it was copied (its config.yaml names the original out_dir)."""
    import shutil

    run = tmp_path / "run"
    cfg_path = save_config(make_cfg(images, run, "train.steps=2", "log_scale.granularity=pixel",
                                    "log_scale.head_channels=8", "train.checkpoint_every=1"), tmp_path / "cfg.yaml")
    assert cli_main(["train", str(cfg_path), "--no-progress"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (run / "model.safetensors").read_bytes()
    assert cli_main(["train", str(copy), "--resume", "--set", "train.head_steps=2", "--no-progress"]) == 0
    assert load_checkpoint(latest_checkpoint(copy / "checkpoints")).step == 4
    assert (run / "model.safetensors").read_bytes() == before  # the original is untouched
    assert (copy / "model.safetensors").read_bytes() != before
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["train", str(empty), "--no-progress"]) == 1
    assert f"{empty}: is a folder without a config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_demo_config(tmp_path):
    """configs/tiny.yaml, the README's first command, end to end (about 5 minutes on 2 quiet cores)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    result = train(cfg, out_dir=tmp_path / "tiny", progress=False)
    assert result.step == cfg.train.steps + cfg.train.head_steps and not result.interrupted
    assert (tmp_path / "tiny" / "samples" / "latest.png").is_file()
    assert result.logs["log_scale_std"] > 0.1  # the map varies across the image


# --- recipe switches ------------------------------------------------------------------------------


def test_zero_init_residual_applies_to_scratch_models_only(images, tmp_path):
    from hetvae.layers import ResnetBlock

    trainer = Trainer(make_cfg(images, tmp_path / "z", "train.zero_init_residual=true"), progress=False)
    blocks = [m for m in trainer.model.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(torch.all(b.conv2.weight == 0) for b in blocks)
    trainer.run()
    assert all(b.conv2.weight.abs().sum() > 0 for b in blocks)  # and they train
    export = tmp_path / "z" / "model.safetensors"
    loaded = Trainer(make_cfg(images, tmp_path / "z2", f"model.init_from={export}", "train.zero_init_residual=true"),
                     progress=False)
    assert all(b.conv2.weight.abs().sum() > 0 for b in loaded.model.modules() if isinstance(b, ResnetBlock))


def test_init_logvar_applies_to_scratch_models_only(images, tmp_path):
    """train.init_logvar: a scratch model's posterior starts with log-variance near the value (the
    weights add a little), for the EMA copy too; a loaded model keeps its own; out of the
    posterior's clamp is a ConfigError naming the key."""
    from hetvae.schema import ConfigError

    trainer = Trainer(make_cfg(images, tmp_path / "v", "train.init_logvar=-8", "train.ema_decay=0.9"), progress=False)
    half = trainer.model.quant_conv.out_channels // 2
    for model in (trainer.model, trainer.ema.module):
        assert torch.all(model.quant_conv.bias[half:] == -8.0)
        assert torch.all(model.quant_conv.bias[:half] != -8.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logvar = trainer.model.encode(x).latent_dist.logvar
    assert -10 < logvar.mean().item() < -6
    trainer.run()
    export = tmp_path / "v" / "model.safetensors"
    loaded = Trainer(make_cfg(images, tmp_path / "v2", f"model.init_from={export}", "train.init_logvar=0"),
                     progress=False)
    torch.testing.assert_close(loaded.model.quant_conv.bias, load_autoencoder(export).quant_conv.bias)
    with pytest.raises(ConfigError, match=r"train\.init_logvar: must be in \[-30, 20\]"):
        make_cfg(images, tmp_path / "x", "train.init_logvar=-40")


def test_init_chroma_gain_applies_to_scratch_models_only(images, tmp_path):
    """train.init_chroma_gain: a scratch model's first convolution is the same seed's plain init
    times T = P + g (I - P) and nothing else differs (no random draw added); a loaded model keeps its
    own; a non-positive gain is a ConfigError naming the key."""
    from hetvae.build import build_model
    from hetvae.schema import ConfigError

    plain_cfg = make_cfg(images, tmp_path / "c", "train.zero_init_residual=true")
    gain_cfg = make_cfg(images, tmp_path / "c", "train.zero_init_residual=true", "train.init_chroma_gain=4")
    torch.manual_seed(0)
    plain = build_model(plain_cfg)
    torch.manual_seed(0)
    amplified = build_model(gain_cfg)
    grey = torch.full((3, 3), 1 / 3)
    transform = grey + 4 * (torch.eye(3) - grey)
    expected = torch.einsum("oikl,ij->ojkl", plain.encoder.conv_in.weight, transform)
    torch.testing.assert_close(amplified.encoder.conv_in.weight, expected)
    a, b = plain.state_dict(), amplified.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "encoder.conv_in.weight")
    Trainer(make_cfg(images, tmp_path / "c0"), progress=False).run()
    export = tmp_path / "c0" / "model.safetensors"
    loaded = Trainer(make_cfg(images, tmp_path / "c1", f"model.init_from={export}", "train.init_chroma_gain=4"),
                     progress=False)
    torch.testing.assert_close(loaded.model.encoder.conv_in.weight, load_autoencoder(export).encoder.conv_in.weight)
    with pytest.raises(ConfigError, match=r"train\.init_chroma_gain: must be finite and > 0"):
        make_cfg(images, tmp_path / "x", "train.init_chroma_gain=0")


@pytest.mark.parametrize("sees_latent, sees_edges", [(False, False), (True, False), (True, True)])
def test_faithful_deep_head_trains_end_to_end(images, tmp_path, sees_latent, sees_edges):
    cfg = make_cfg(images, tmp_path / "f", "log_scale.granularity=pixel", "log_scale.faithful=true",
                   "log_scale.head_layers=2", "log_scale.head_channels=8", "log_scale.head_sees_mean=true",
                   "log_scale.detach_features=true", f"log_scale.head_sees_latent={str(sees_latent).lower()}",
                   f"log_scale.head_sees_edges={str(sees_edges).lower()}")
    result = train(cfg, progress=False)
    model = load_autoencoder(tmp_path / "f" / "model.safetensors")
    assert model.config.log_scale_head_layers == 2 and model.config.log_scale_head_sees_mean
    assert model.config.log_scale_head_sees_latent is sees_latent
    assert model.config.log_scale_head_sees_edges is sees_edges
    assert model.decoder.log_scale_trunk[0].in_channels == (
        16 + 3 + (model.config.latent_channels if sees_latent else 0) + (3 if sees_edges else 0))
    assert model.decoder.log_scale_head.weight.abs().sum() > 0
    assert result.step == 4 and math.isfinite(result.logs["nll"])


@pytest.mark.parametrize("bad", ["gpu", "cuda:-1", "cuda:x", "mps", ""])
def test_train_device_is_validated(bad):
    from hetvae.schema import ConfigError

    with pytest.raises(ConfigError, match=r"train\.device: .*'auto', 'cpu', 'cuda' or 'cuda:N'"):
        apply_overrides(Config(), [f"train.device={bad!s}" if bad else "train.device=''"])


def test_train_device_places_the_run(monkeypatch):
    """'cpu' trains on the CPU wherever a GPU is; asking for CUDA where torch sees none, or more
    torchrun processes per node than GPUs, is a ConfigError naming train.device (it used to be
    CUDA's 'invalid device ordinal' from inside the trainer)."""
    from hetvae.schema import ConfigError
    from hetvae.distributed import setup_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup_distributed("cpu").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_distributed("auto").device == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"train\.device: is 'cuda:1' but torch sees no CUDA device"):
        setup_distributed("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 has no GPU of its own: this machine shows 1 CUDA"):
        setup_distributed("auto")
    with pytest.raises(ConfigError, match=r"is 'cuda:0' under torchrun"):
        setup_distributed("cuda:0")


def test_resume_may_move_to_another_device(images, tmp_path):
    half = make_cfg(images, tmp_path / "r", "train.steps=2")
    train(half, progress=False)
    resumed = Trainer(make_cfg(images, tmp_path / "r", "train.device=auto"), resume=True, progress=False)
    assert resumed.step == 2


def test_resume_from_a_noise_stream_of_another_device(images, tmp_path, caplog):
    """A checkpoint written on a GPU holds a CUDA generator's state (16 bytes), which a CPU generator
    cannot take (and vice versa): the resumed run restarts the posterior noise from the seed and the
    step, says so, and trains on. Found on an H200 resuming a CPU checkpoint with train.device=auto."""
    train(make_cfg(images, tmp_path / "r", "train.steps=2"), progress=False)
    state_file = latest_checkpoint(tmp_path / "r" / "checkpoints") / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    assert state["rng"]["noise_device"] == "cpu"
    state["rng"]["noise"] = torch.arange(16, dtype=torch.uint8)  # the size of a CUDA Philox state
    state["rng"]["noise_device"] = "cuda"
    torch.save(state, state_file)
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        resumed = Trainer(make_cfg(images, tmp_path / "r", "train.steps=4"), resume=True, progress=False)
    assert "posterior-noise stream was drawn on cuda, this run draws it on cpu" in caplog.text
    expected = torch.Generator().manual_seed(resumed.cfg.train.seed + 1 + 2).get_state()
    assert torch.equal(resumed.noise.get_state(), expected)
    resumed.run()
    assert load_checkpoint(latest_checkpoint(tmp_path / "r" / "checkpoints")).step == 4


def test_head_lr_moves_only_the_head_at_its_rate(images, tmp_path):
    """train.head_lr: the pixel head's hidden convs and output weight form one group at that lr
    (its bias stays with the log-scale offsets); every trainable tensor is in exactly one group.
    A tiny head_lr leaves those weights where the init put them while the rest trains."""
    cfg = make_cfg(images, tmp_path / "h", "log_scale.granularity=pixel", "log_scale.head_layers=1",
                   "log_scale.head_channels=8", "train.head_lr=1e-12", "train.log_scale_lr=1e-2", "train.steps=3")
    trainer = Trainer(cfg, progress=False)
    decoder = trainer.model.decoder
    head = [*decoder.log_scale_trunk.parameters(), decoder.log_scale_head.weight]
    groups = trainer.g_opt.param_groups
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups})
    assert {id(p) for p in in_groups} == {id(p) for p in trainer.model.parameters() if p.requires_grad} | {
        id(p) for p in trainer.objective.trainable_parameters()}
    (head_group,) = [g for g in groups if g["base_lr"] == 1e-12]
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head}
    assert any(p is decoder.log_scale_head.bias for g in groups if g["base_lr"] == 1e-2 for p in g["params"])
    before = [p.detach().clone() for p in head]
    other = decoder.conv_out.weight.detach().clone()
    trainer.run()
    for p, b in zip(head, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-9)
    assert not torch.allclose(decoder.conv_out.weight, other)
    without = Trainer(make_cfg(images, tmp_path / "n", "log_scale.granularity=pixel"), progress=False)
    assert len(without.g_opt.param_groups) == 2  # unset: the head trains in the autoencoder's group


class _WhoLoads(torch.utils.data.Dataset):
    """``(epoch, index)`` -> ``[pid of the loading process, epoch, index]``."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        epoch, index = key
        return torch.tensor([os.getpid(), epoch, index])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_one_loader_serves_every_epoch(num_workers):
    """Batches follow the documented order (epoch e: the permutation of (seed, e), cut into full
    batches, this rank's columns), and one set of loader workers serves them across epochs."""
    from hetvae.distributed import local_batches

    stream = local_batches(_WhoLoads(), global_batch=4, seed=7, start=3, rank=1, world_size=2, num_workers=num_workers)
    got = [next(stream) for _ in range(6)]  # 2 full batches per epoch: from epoch 1's second, into epoch 4
    expected = []
    for epoch in (1, 2, 3, 4):
        order = np.random.default_rng((7, epoch)).permutation(10)[:8].reshape(2, 4)
        expected += [[(epoch, int(i)) for i in row[2:4]] for row in order]
    expected = expected[1:7]
    assert [[(int(e), int(i)) for _, e, i in b.tolist()] for b in got] == expected
    pids = {int(p) for b in got for p in b[:, 0]}
    assert len(pids) == 1 and (pids == {os.getpid()}) == (num_workers == 0)


def test_the_trainers_adamw_is_fused_where_the_device_has_the_kernel(images, tmp_path):
    """hetvae.optim.adamw in the Trainer (its parity with the per-tensor loop: tests/test_optim.py)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this PyTorch has no fused AdamW on the CPU")
    trainer = Trainer(make_cfg(images, tmp_path / "f", "log_scale.granularity=channel"), progress=False)
    assert trainer.g_opt.defaults["fused"]


def _autoencoder_after(images: Path, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    trainer = Trainer(make_cfg(images, out, "log_scale.granularity=pixel", "log_scale.faithful=true",
                               "log_scale.detach_features=true", "log_scale.head_layers=1",
                               "log_scale.head_channels=8", "train.log_scale_lr=1e-2", "train.steps=4",
                               *overrides), progress=False)
    trainer.run()
    decoder = trainer.model.decoder
    head = {id(p) for m in (decoder.log_scale_trunk, decoder.log_scale_head) for p in m.parameters()}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if id(p) not in head}


def test_head_grad_clip_makes_the_mean_independent_of_the_head(images, tmp_path):
    """train.head_grad_clip clips the log-scale's parameters on their own. With a faithful head on
    detached features the head's training then cannot reach the autoencoder: two runs whose heads
    train at rates 1e6 apart end with the same autoencoder (but for the KL term's share, which
    the mean's scale weighs: 3e-5 relative). Under one shared norm they differ at once (0.9)."""
    def gap(name, *overrides):
        slow = _autoencoder_after(images, tmp_path / f"{name}-slow", "train.head_lr=1e-6", *overrides)
        fast = _autoencoder_after(images, tmp_path / f"{name}-fast", "train.head_lr=1.0", *overrides)
        return max(float((slow[n] - fast[n]).abs().max() / slow[n].abs().max().clamp_min(1e-12)) for n in slow)

    apart, shared = gap("apart", "train.head_grad_clip=1.0"), gap("shared")
    assert apart < 1e-4 and shared > 1e-3, (apart, shared)


def test_mean_scale_global_trains_the_global_models_autoencoder(images, tmp_path):
    """log_scale.mean_scale=global with train.head_grad_clip: the per-pixel model's autoencoder
    takes the very steps of its global twin (the same config, granularity global): bit for bit
    equal weights after training, the mean's own scale equal to the twin's, and the map trained
    beside them. With the map's level as the mean's scale (the default) they drift apart."""
    common = ("log_scale.faithful=true", "log_scale.detach_features=true", "log_scale.head_layers=1",
              "log_scale.head_channels=8", "train.log_scale_lr=1e-2", "train.head_grad_clip=1.0",
              "train.grad_clip=1.0", "train.steps=6", "log_scale.mean_scale=global")

    def run(name, *overrides):
        trainer = Trainer(make_cfg(images, tmp_path / name, *common, *overrides), progress=False)
        trainer.run()
        return trainer

    twin = run("global", "log_scale.granularity=global")
    pixel = run("pixel", "log_scale.granularity=pixel")
    drifted = run("map", "log_scale.granularity=pixel", "log_scale.mean_scale=map")
    weights = {n: p.detach() for n, p in twin.model.named_parameters()}
    for other, equal in ((pixel, True), (drifted, False)):
        named = dict(other.model.named_parameters())
        assert all(torch.equal(named[n], w) for n, w in weights.items()) == equal
    (twin_scale,) = twin.objective.trainable_parameters()
    assert torch.equal(pixel.objective.nll.mean_head.free, twin_scale)
    assert pixel.objective.nll.mean_head.free.item() != 0.0
    record = json.loads((tmp_path / "pixel" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["mean_scale_grad_norm"] > 0 and record["head_grad_norm"] > 0


def test_mean_scale_global_is_refused_without_faithful(images, tmp_path):
    with pytest.raises(ConfigError, match="log_scale.mean_scale"):
        make_cfg(images, tmp_path, "log_scale.granularity=pixel", "log_scale.mean_scale=global")
    with pytest.raises(ConfigError, match="log_scale.mean_scale"):
        make_cfg(images, tmp_path, "log_scale.granularity=pixel", "log_scale.faithful=true",
                 "log_scale.mean_scale=everywhere")
    # one config for every granularity: the global one ignores it, like faithful
    make_cfg(images, tmp_path, "log_scale.granularity=global", "log_scale.mean_scale=global")


def test_head_grad_clip_clips_each_group_to_its_own_norm(images, tmp_path):
    cfg = make_cfg(images, tmp_path / "c", "log_scale.granularity=global", "train.grad_clip=0.5",
                   "train.head_grad_clip=1e-3")
    trainer = Trainer(cfg, progress=False)
    applied, logs = trainer._train_step(trainer._batches_from(0))
    assert applied
    (scale,) = trainer.objective.trainable_parameters()
    rest = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]))
    # the logs report the norms before clipping; the gradients left are clipped group by group
    assert logs["head_grad_norm"] > 1e-3 and logs["grad_norm"] > 0.5
    assert float(scale.grad.norm()) == pytest.approx(1e-3, rel=1e-4)
    assert float(rest) == pytest.approx(0.5, rel=1e-4)
