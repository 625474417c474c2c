"""Training on tar shards: a resumed run (in the large-crop phase too, with DataLoader workers, after
kill -9) ends bit for bit where the uninterrupted one does; the stream's layout is checkpointed;
2 gloo processes read different shards; a resume on another world size restarts the stream at the
next epoch and says so. Tiny models on 16 px crops, as tests/test_train.py."""

from __future__ import annotations

import io
import json
import logging
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

from hetvae.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from hetvae.config import Config, save_config
from hetvae.runs import SHARD_STREAM_KEY
from hetvae.schema import apply_overrides
from hetvae.shards import expand_shards, index_shard
from hetvae.train import Trainer, train

wds = pytest.importorskip("webdataset")

REPO = Path(__file__).resolve().parents[1]
WRITE_SAMPLES = Trainer.write_samples


@pytest.fixture(autouse=True)
def no_panels(monkeypatch):
    """The end-of-run panel (matplotlib, ~2 s on 2 cores) is left out: it reads no training batch.
    test_sample_panel_from_shards draws one."""
    monkeypatch.setattr(Trainer, "write_samples", lambda self: None)


@pytest.fixture
def one_thread():
    """Bit-exact comparisons with a subprocess (OMP_NUM_THREADS=1): the same summation order here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def textured_png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:40, :40]
    base = ((xx + 3 * i) // 8 + yy // 8) % 2 * 160 + 40
    noise = rng.integers(0, 40, size=(40, 40))
    rgb = np.stack([base + noise, base[::-1] + noise, np.full_like(base, (90 + 20 * i) % 256)], axis=-1)
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, format="png")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Six shards of four 40x40 images, written by webdataset's ShardWriter; a glob pattern."""
    folder = tmp_path_factory.mktemp("shards")
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(24):
            sink.write({"__key__": f"s{i:05d}", "png": textured_png(i), "cls": i})
    return str(folder / "train-*.tar")


def make_cfg(path: str, out_dir: Path, *overrides: str) -> Config:
    base = [
        "model.block_out_channels=[16, 32]",
        "model.norm_num_groups=8",
        "model.layers_per_block=1",
        "model.mid_block_attention=false",
        f"data.path={path}",
        "data.resolution=16",
        "data.shuffle_shards=2",
        "train.steps=4",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=0",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=0",
        "train.seed=3",
        "train.device=cpu",
        f"out_dir={out_dir}",
    ]
    return apply_overrides(Config(), base + list(overrides))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _assert_same_checkpoint(a: Path, b: Path, what: str) -> None:
    ca, cb = (load_checkpoint(latest_checkpoint(p / "checkpoints")) for p in (a, b))
    assert ca.step == cb.step and ca.tensors.keys() == cb.tensors.keys()
    for key in ca.tensors:
        assert torch.equal(ca.tensors[key], cb.tensors[key]), (what, key)


def test_resume_is_bit_exact_with_workers_and_the_large_crop_phase(shards, tmp_path):
    """2 DataLoader workers; steps 0-1 on 16 px crops (4 a batch), 2-3 on 32 px ones (1 a batch).
    Resumed after step 1 and after step 3 (an odd number of batches taken from the stream in use: the
    loader's first batch is then worker 1's slot's), the run ends where the straight one does."""
    common = ["data.num_workers=2", "train.final_steps=2", "train.final_resolution=32", "train.steps=4",
              "train.ema_decay=0.5"]
    straight = tmp_path / "straight"
    train(make_cfg(shards, straight, *common), progress=False)
    ckpt = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    assert ckpt.step == 4
    assert ckpt.state[SHARD_STREAM_KEY] == {"world_size": 1, "num_workers": 2, "origins": {"data": [0, 0], "final": [0, 0]}}
    for kept in (1, 3):
        folder = tmp_path / f"kept{kept}"
        shutil.copytree(straight, folder)
        for step, path in list_checkpoints(folder / "checkpoints"):
            if step > kept:
                shutil.rmtree(path)
        resumed = Trainer(make_cfg(shards, folder, *common), resume=True, progress=False)
        assert resumed.step == kept
        resumed.run()
        _assert_same_checkpoint(straight, folder, kept)


def test_auto_workers_are_stored_and_kept_on_resume(shards, tmp_path, caplog):
    """num_workers 'auto' is stored as resolved; a resume that asks for another count keeps the
    stored one (each reader's place depends on it), says so, and stays bit-exact."""
    straight, part = tmp_path / "straight", tmp_path / "part"
    train(make_cfg(shards, straight, "data.num_workers=2", "train.steps=3", "train.checkpoint_every=0"),
          progress=False)
    train(make_cfg(shards, part, "data.num_workers=2", "train.steps=1"), progress=False)
    with caplog.at_level(logging.INFO, logger="hetvae.train"):
        train(make_cfg(shards, part, "data.num_workers=0", "train.steps=3", "train.checkpoint_every=0"), resume=True,
              progress=False)
    assert "keeps the run's 2 worker(s)" in caplog.text
    _assert_same_checkpoint(straight, part, "num_workers")
    trainer = Trainer(make_cfg(shards, tmp_path / "auto"), progress=False)  # data.num_workers: auto
    assert trainer.shard_num_workers == min(len(os.sched_getaffinity(0)), 4, 6)  # at most one per shard
    assert trainer._state()[SHARD_STREAM_KEY]["num_workers"] == trainer.shard_num_workers


def test_kill_9_then_resume_matches_the_uninterrupted_run(shards, tmp_path, one_thread):
    run = tmp_path / "run"
    cfg = make_cfg(shards, run, "data.num_workers=2", "train.steps=100000", "train.keep_checkpoints=2")
    proc = subprocess.Popen([sys.executable, "-m", "hetvae.cli", "train", str(save_config(cfg, tmp_path / "c.yaml")),
                             "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 120
    while len(list_checkpoints(ckpts)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    time.sleep(0.137)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
    proc.wait()
    step = load_checkpoint(latest_checkpoint(ckpts)).step
    train(apply_overrides(cfg, [f"train.steps={step + 2}"]), resume=True, progress=False)
    straight = tmp_path / "straight"
    train(make_cfg(shards, straight, "data.num_workers=2", f"train.steps={step + 2}"), progress=False)
    _assert_same_checkpoint(straight, run, "kill -9")


def test_truncated_and_empty_shards_warn_and_training_goes_on(shards, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for path in expand_shards(shards):
        shutil.copy(path, folder / path.name)
    first = folder / "train-000000.tar"
    with open(first, "r+b") as f:
        f.truncate(os.path.getsize(first) // 2)
    with wds.TarWriter(str(folder / "train-000006.tar")) as sink:
        sink.write({"__key__": "x", "txt": "no image"})
    with pytest.warns(UserWarning, match=r"train-000000\.tar: .*(extends past the end|breaks off after member)") as caught:
        result = train(make_cfg(str(folder / "train-*.tar"), tmp_path / "run", "data.num_workers=0", "train.steps=3",
                                "train.checkpoint_every=0"), progress=False)
    assert result.step == 3
    assert any("train-000006.tar holds no image member" in str(w.message) for w in caught)
    assert 0 < len(index_shard(first)) < 4


def test_a_shard_pattern_that_matches_nothing_is_an_error_naming_it(shards, tmp_path):
    pattern = str(Path(shards).parent / "valid-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match=r"valid-\{000000\.\.000003\}\.tar"):
        Trainer(make_cfg(pattern, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"6 tar shard\(s\) for 8 readers \(world size 1 x 8 data worker\(s\)\)"):
        Trainer(make_cfg(shards, tmp_path / "run", "data.num_workers=8"), progress=False)


TWO_RANKS = """
import json, sys
from hetvae.config import load_config
from hetvae.train import Trainer
trainer = Trainer(load_config(sys.argv[1]), progress=False)
stream = trainer._shard_stream("data", start=0)
slots = [trainer.dist.rank * stream.workers + w for w in range(stream.workers)]
shards = {str(stream.shards[s]) for slot in slots for s in stream.epoch_shards(0, slot)}
seen = [str(m[0]) for slot in slots for m in stream.epoch_members(0, slot)]
result = trainer.run()
with open(sys.argv[2] + f"/rank{trainer.dist.rank}.json", "w") as f:
    json.dump({"shards": sorted(shards), "seen": sorted(set(seen)), "workers": stream.workers,
               "step": result.step}, f)
"""


def test_two_gloo_processes_read_different_shards_and_a_resume_on_one_restarts_the_epoch(shards, tmp_path, caplog):
    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS)
    run = tmp_path / "run"
    cfg_path = save_config(make_cfg(shards, run, "data.num_workers=1", "train.steps=3", "train.checkpoint_every=0"),
                           tmp_path / "cfg.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(cfg_path), str(tmp_path)],
        env=_env(), capture_output=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["step"] == 3 and r["workers"] == 1 for r in ranks)
    assert len(ranks[0]["shards"]) == len(ranks[1]["shards"]) == 3
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])  # disjoint readers
    assert all(r["seen"] == r["shards"] for r in ranks)
    state = load_checkpoint(latest_checkpoint(run / "checkpoints")).state
    assert state[SHARD_STREAM_KEY]["world_size"] == 2
    # resumed in one process: the readers' places cannot carry over; the stream restarts at the next epoch
    with caplog.at_level(logging.WARNING, logger="hetvae.train"):
        resumed = Trainer(make_cfg(shards, run, "data.num_workers=1", "train.steps=4", "train.checkpoint_every=0"),
                          resume=True, progress=False)
    assert "restarts at the start of epoch 1" in caplog.text and "world size 2" in caplog.text
    assert resumed.shard_origins["data"] == (1, 3)  # epoch 1 from the 3 batches taken on
    resumed.run()


def test_sample_panel_from_shards(shards, tmp_path):
    """The panel shows centre crops of the first images of the first shard (no held-out split)."""
    trainer = Trainer(make_cfg(shards, tmp_path / "run", "data.num_workers=0"), progress=False)
    path = WRITE_SAMPLES(trainer)
    # the images (40 px) are smaller than the panel's 128 px crops: the training side, as for folders
    assert path.is_file() and trainer._panel_inputs.shape == (4, 3, 16, 16)
    first = expand_shards(shards)[0]
    from hetvae.images import decode_image

    index = index_shard(first)
    with open(first, "rb") as f:
        pixels = decode_image(index.read(f, 0), index.names[0])
    centre = torch.from_numpy(pixels[12:28, 12:28].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(trainer._panel_inputs[0], centre)
