"""Issue 13, the training run's lifecycle: resume rules, metrics, checkpoints, exit codes.

Each test stages one hostile situation (a changed config, a corrupt or half-written file, a full
disk, a crash mid-run, a signal, non-finite weights) on tiny 16 px runs and checks that nothing is
lost and nothing is silently wrong."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import signal

import pytest
import torch

import hetvae.checkpoint as checkpoint_module
from conftest import write_noise_photos
from hetvae.checkpoint import WEIGHTS_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
from hetvae.cli import build_parser
from hetvae.cli import main as cli_main
from hetvae.config import Config, load_config, save_config
from hetvae.schema import ConfigError, apply_overrides
from hetvae.files import CheckpointError
from hetvae.train import NonFiniteLossError, Trainer, train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
    return write_noise_photos(tmp_path_factory.mktemp("images"), 4, 24, seed=1)


def make_cfg(images: pathlib.Path, out_dir: pathlib.Path, *overrides: str) -> Config:
    base = [
        "model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.layers_per_block=1",
        "model.mid_block_attention=false", f"data.path={images}", "data.resolution=16",
        "data.samples_per_epoch=8", "train.steps=4", "train.batch_size=4", "train.log_every=1",
        "train.sample_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.seed=5",
        f"out_dir={out_dir}",
    ]
    return apply_overrides(Config(), base + list(overrides))


def steps_in(run: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_train(cfg: Config, tmp_path: pathlib.Path, *extra: str) -> int:
    path = save_config(cfg, tmp_path / "cli-cfg.yaml")
    return cli_main(["train", str(path), "--no-progress", *extra])


# --- item 1: resuming refuses a changed config ----------------------------------------------------


def test_resume_refuses_a_changed_config_and_names_the_keys(images, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_cfg(images, run)
    train(cfg, progress=False)
    saved = (run / "config.yaml").read_text()
    changed = apply_overrides(cfg, ["log_scale.family=gaussian", "train.seed=9"])
    with pytest.raises(ConfigError) as info:
        train(changed, progress=False)
    message = str(info.value)
    for part in ("log_scale.family", "'laplace'", "'gaussian'", "train.seed", str(run), "out_dir", "--overwrite"):
        assert part in message, part
    assert (run / "config.yaml").read_text() == saved  # the record of the run is untouched
    assert cli_train(changed, tmp_path) == 1
    assert "log_scale.family" in capsys.readouterr().err

    # what a resume may change: steps, logging and checkpoint cadence
    more = apply_overrides(cfg, ["train.steps=5", "train.log_every=2", "train.checkpoint_every=1",
                                 "train.keep_checkpoints=3", "data.num_workers=0",
                                 "data.cache_mb=0"])
    assert train(more, progress=False).step == 5

    # the explicit way out: start over in the same folder
    fresh = train(changed, progress=False, overwrite=True)
    assert fresh.step == 4 and steps_in(run) == [1, 2, 3, 4]
    assert load_config(run / "config.yaml").log_scale.family == "gaussian"
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]


def test_resuming_into_a_different_architecture_is_a_clear_error(images, tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(images, run, "train.steps=2"), progress=False)
    other = make_cfg(images, run, "train.steps=3", "model.block_out_channels=[8, 8]")
    with pytest.raises(ConfigError, match=r"model\.block_out_channels.*\[8, 16\].*\[8, 8\]"):
        Trainer(other, progress=False)
    assert cli_train(other, tmp_path) == 1
    assert "model.block_out_channels" in capsys.readouterr().err
    # a checkpoint without an embedded config still gets a clear error naming the folder and the keys
    ckpt = latest_checkpoint(run / "checkpoints")
    loaded = load_checkpoint(ckpt)
    from safetensors.torch import save_file

    save_file(loaded.tensors, str(ckpt / WEIGHTS_FILE), metadata={})
    with pytest.raises(CheckpointError, match=r"step_00000002.*does not fit.*decoder"):
        Trainer(other, progress=False)


# --- items 3 and 4: metrics.jsonl -----------------------------------------------------------------


def test_metrics_trim_on_resume_is_atomic(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(make_cfg(images, run, "train.steps=2"), progress=False)
    with open(run / "metrics.jsonl", "a") as f:  # lines of a run killed after its last checkpoint
        f.write(json.dumps({"step": 3, "total": 1.0}) + "\n" + '{"step": 4, "tot')
    before = (run / "metrics.jsonl").read_text()

    def killed_while_writing(self, *args, **kwargs):  # opened (truncated), then the process dies
        self.open("w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", killed_while_writing)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_cfg(images, run, "train.steps=3"), progress=False)
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_text() == before  # never empty, never half
    assert not [p.name for p in run.iterdir() if "tmp" in p.name]
    assert train(make_cfg(images, run, "train.steps=3"), progress=False).step == 3
    assert steps_in(run) == [1, 2, 3]


def test_a_fresh_start_replaces_stale_metrics(images, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # a run killed before its first checkpoint: metrics but nothing to resume
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "total": 9.0}) + "\n" for s in (1, 2, 3, 4)))
    train(make_cfg(images, run, "train.steps=2"), progress=False)
    assert steps_in(run) == [1, 2]


# --- item 5: a corrupt newest checkpoint ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["weights", "state"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(images, tmp_path, caplog, damage):
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "train.steps=4")
    train(cfg, progress=False)
    newest = run / "checkpoints" / "step_00000004"
    victim = newest / (WEIGHTS_FILE if damage == "weights" else "state.pt")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # torn by a failing disk
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        trainer = Trainer(apply_overrides(cfg, ["train.steps=5"]), progress=False)
    assert trainer.step == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_00000004" in warned and "step_00000002" in warned
    assert steps_in(run) == [1, 2]
    trainer.run()
    # the torn folder was set aside (kept for inspection), not reused as "step 4 already saved"
    assert load_checkpoint(newest).step == 4 and load_checkpoint(run / "checkpoints" / "step_00000005").step == 5
    assert any(p.name.startswith("corrupt-step_00000004") for p in (run / "checkpoints").iterdir())


def test_no_intact_checkpoint_is_a_clear_error(images, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "train.steps=2")
    train(cfg, progress=False)
    (run / "checkpoints" / "step_00000002" / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*checkpoints.*step_00000002"):
        Trainer(cfg, progress=False)
    assert cli_train(cfg, tmp_path) == 1
    assert "step_00000002" in capsys.readouterr().err


# --- item 6: a fatal error mid-run writes a checkpoint first ------------------------------------


def _fail_at(monkeypatch, step: int, micro: int, error: BaseException) -> None:
    """Make micro-step ``micro`` of step ``step`` (0-based) raise after it has drawn its noise."""
    real, calls = Trainer._micro_step, {}

    def micro_step(self, x, s, *args):
        out = real(self, x, s, *args)
        key = (id(self), s)  # per trainer: the same patch serves several runs
        calls[key] = calls.get(key, 0) + 1
        if s == step and calls[key] == micro + 1:
            raise error
        return out

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)


def test_a_fatal_error_mid_run_writes_an_exact_checkpoint_first(images, tmp_path, monkeypatch, capsys):
    common = ["train.checkpoint_every=0", "train.grad_accum=2", "train.ema_decay=0.5", "data.samples_per_epoch=16"]
    straight = Trainer(make_cfg(images, tmp_path / "a", *common, "train.steps=3"), progress=False)
    straight.run()

    _fail_at(monkeypatch, step=3, micro=1, error=OSError(errno.EIO, "Input/output error", "im2.png"))
    run = tmp_path / "b"
    with pytest.raises(OSError, match="im2.png"):
        train(make_cfg(images, run, *common, "train.steps=6"), progress=False)
    ckpt = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert ckpt.step == 3
    want = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    for key, value in want.tensors.items():
        assert torch.equal(value, ckpt.tensors[key]), key
    # the RNG state is that of the end of step 3, not of the half-done step 4
    assert torch.equal(ckpt.state["rng"]["noise"], want.state["rng"]["noise"])
    assert torch.equal(ckpt.state["rng"]["torch"], want.state["rng"]["torch"])
    assert not (run / "model.safetensors").exists()  # no export of a run that did not finish

    # the command line: a one-line error naming the checkpoint, exit 1, no traceback
    assert cli_train(make_cfg(images, tmp_path / "c", *common, "train.steps=6"), tmp_path) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "im2.png" in err and "step_00000003" in err and "Traceback" not in err


# --- item 16: non-finite weights ----------------------------------------------------------------


def test_non_finite_weights_are_never_exported(images, tmp_path, monkeypatch, capsys):
    real = Trainer._train_step

    def step_then_blow_up(self, batches):  # what weight_decay=inf does to the weights
        applied, logs = real(self, batches)
        if self.step == 2:
            with torch.no_grad():
                self.model.decoder.conv_out.weight.fill_(float("nan"))
        return applied, logs

    monkeypatch.setattr(Trainer, "_train_step", step_then_blow_up)
    run = tmp_path / "run"
    cfg = make_cfg(images, run, "train.steps=4", "train.checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match=r"decoder\.conv_out\.weight.*step_00000002"):
        train(cfg, progress=False)
    assert not (run / "model.safetensors").exists() and not (run / "loss.safetensors").exists()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]  # the newest is the last good one
    assert torch.isfinite(load_checkpoint(run / "checkpoints" / "step_00000002").tensors[
        "autoencoder.decoder.conv_out.weight"]).all()
    assert cli_train(make_cfg(images, tmp_path / "cli", "train.steps=4"), tmp_path) == 1
    assert "non-finite" in capsys.readouterr().err


# --- item 17: metrics right after a resume ----------------------------------------------------------


def test_metrics_after_a_resume_match_an_uninterrupted_run(images, tmp_path, monkeypatch):
    common = ["train.steps=6", "train.log_every=3", "train.checkpoint_every=0"]
    train(make_cfg(images, tmp_path / "a", *common), progress=False)

    trainer = Trainer(make_cfg(images, tmp_path / "b", *common), progress=False)
    real = trainer._train_step

    def step_then_ctrl_c(batches):
        out = real(batches)
        if trainer.step == 3:  # self.step counts finished steps: this is the end of the 4th
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer._train_step = step_then_ctrl_c
    assert trainer.run().step == 4  # stopped mid-interval (records at 3 and 6)
    train(make_cfg(images, tmp_path / "b", *common), progress=False)

    def records(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == [3, 6]
    for step in (3, 6):
        assert a[step]["steps_averaged"] == b[step]["steps_averaged"] == 3
        for key in a[step]:
            if key != "steps_per_s":
                assert a[step][key] == b[step][key], (step, key)


# --- clear errors: a full disk ----------------------------------------------------------------------


def _disk_full_after(monkeypatch, target, name: str, calls_ok: int) -> None:
    real, count = getattr(target, name), [0]

    def write(tensors, filename, *args, **kwargs):
        count[0] += 1
        if count[0] > calls_ok:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 100)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(target, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(images, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _disk_full_after(monkeypatch, checkpoint_module, "save_file", calls_ok=1)
    with pytest.raises(CheckpointError) as info:
        train(make_cfg(images, run), progress=False)
    message = str(info.value)
    assert str(run / "checkpoints") in message and "No space left" in message and "step_00000002" in message
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert load_checkpoint(run / "checkpoints" / "step_00000002").step == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # nothing half-written
    assert cli_train(make_cfg(images, tmp_path / "cli"), tmp_path) == 1
    assert "No space left" in capsys.readouterr().err


def test_a_full_disk_while_saving_the_config_leaves_no_half_file(images, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def disk_full(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match=rf"{run}.*No space left"):
        train(make_cfg(images, run), progress=False)
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert not [name for name in left if "config" in name], left


# --- clear errors: signals and exit codes ---------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_run_exits_with_the_shells_code(images, tmp_path, monkeypatch, capsys, signum, code):
    real = Trainer._train_step

    def step_then_signal(self, batches):
        out = real(self, batches)
        if self.step == 1:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)
    run = tmp_path / "run"
    assert cli_train(make_cfg(images, run, "train.steps=50", f"out_dir={run}"), tmp_path) == code
    assert "interrupted at step 2" in capsys.readouterr().out
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 2


def test_train_help_documents_the_exit_codes():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = sub.format_help()
    for part in ("143", "130", "SIGTERM", "SIGINT", "--overwrite"):
        assert part in text, part


# --- clear errors: a failed start leaves nothing behind -------------------------------------------


def test_a_failed_start_leaves_no_run_folder(images, tmp_path, capsys):
    run = tmp_path / "new-run"
    bad = make_cfg(images, run, "data.samples_per_epoch=2")  # fewer crops than one batch of 4
    assert cli_train(bad, tmp_path) == 1
    assert "samples per epoch" in capsys.readouterr().err
    assert not run.exists()
    # a folder the user made (with their own files) keeps exactly those
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="samples per epoch"):
        train(bad, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
