"""Where ``hetvae train`` trains: ``--set out_dir=...`` is honoured when the config argument is a
run folder (it was silently ignored: the folder won), and ``--out`` with a different
``--set out_dir=...`` is refused rather than one of them ignored (issue 35, item 23)."""

from __future__ import annotations

import pathlib
import types

import pytest

from conftest import write_noise_photos
from hetvae.cli import main as cli_main
from hetvae.config import Config, load_config, save_config
from hetvae.schema import apply_overrides


def _run_folder(tmp_path) -> pathlib.Path:
    run = tmp_path / "run"
    save_config(apply_overrides(Config(), [f"out_dir={tmp_path / 'elsewhere'}"]), run / "config.yaml")
    return run


@pytest.fixture
def captured(monkeypatch):
    """``hetvae train`` up to the call of ``train()``: the run folder it would train in."""
    import hetvae.train

    calls = []

    def fake_train(cfg, out_dir=None, **kwargs):
        calls.append(pathlib.Path(out_dir if out_dir is not None else cfg.out_dir))
        return types.SimpleNamespace(model_file=None, interrupted=False, signal=None, step=0, run_dir=None)

    monkeypatch.setattr(hetvae.train, "train", fake_train)
    return calls


@pytest.mark.parametrize("source", ["yaml", "run folder"])
@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "default"),
        (["--out", "{a}"], "a"),
        (["--set", "out_dir={b}"], "b"),
        (["--set", " out_dir = {b}"], "b"),
        (["--set", "out_dir={a}", "--set", "out_dir={b}"], "b"),  # the later override wins, as for any key
        (["--out", "{a}", "--set", "out_dir={a}"], "a"),
        (["--out", "{a}", "--set", "out_dir={a}/"], "a"),  # the same folder, spelled otherwise
        (["--out", "{a}", "--set", "out_dir={b}"], None),  # two folders: refused
    ],
)
def test_the_run_folder_is_the_one_asked_for(tmp_path, captured, capsys, source, flags, expected):
    run = _run_folder(tmp_path)
    config = str(run) if source == "run folder" else str(run / "config.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["train", config, "--no-progress", *(f.format(a=a, b=b) for f in flags)]
    code = cli_main(argv)
    if expected is None:
        assert code == 1 and captured == []
        err = capsys.readouterr().err
        assert err.startswith("error: out_dir: ") and str(a) in err and str(b) in err, err
        return
    assert code == 0, capsys.readouterr().err
    default = run if source == "run folder" else tmp_path / "elsewhere"  # a folder stands for itself
    assert captured == [{"default": default, "a": a, "b": b}[expected]], argv


def test_a_run_folder_trains_into_set_out_dir(tmp_path):
    """End to end: ``hetvae train RUN --set out_dir=NEW`` trains a new run in NEW from RUN's config
    and leaves RUN as it was."""
    images = tmp_path / "images"
    images.mkdir()
    write_noise_photos(images, 2, 24, seed=0)
    run = tmp_path / "run"
    cfg = apply_overrides(Config(), [
        "model.block_out_channels=[8, 8]", "model.norm_num_groups=4", "model.mid_block_attention=false",
        f"data.path={images}", "data.resolution=16", "train.steps=1", "train.batch_size=2", "train.log_every=1",
        "train.sample_every=0", "train.checkpoint_every=1", f"out_dir={run}",
    ])
    assert cli_main(["train", str(save_config(cfg, tmp_path / "cfg.yaml")), "--no-progress"]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    new = tmp_path / "new"
    assert cli_main(["train", str(run), "--set", f"out_dir={new}", "--no-progress"]) == 0
    assert (new / "model.safetensors").is_file()
    assert load_config(new / "config.yaml").out_dir == str(new)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_run_folder_under_home_is_found(tmp_path, monkeypatch, captured):
    """``hetvae train '~/run'`` (quoted, so no shell expands it) is the run folder, as ``base: ~/x.yaml`` is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    run = _run_folder(tmp_path)
    assert cli_main(["train", "~/run", "--no-progress"]) == 0
    assert captured == [run]
