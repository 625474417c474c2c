"""The benchmark scripts still run against the current code: ``--help`` for each, and tiny runs of
the two whose patches and baselines depend on the model's internals. Nothing is timed here; the
tiny runs check what the scripts check before timing (hetvae and diffusers agree)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

pytest.importorskip("diffusers")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(bench, script, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench(script).main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_autoencoder_benchmark_patches_still_apply(bench, capsys):
    # each variant is loaded from diffusers' weights and must agree with diffusers before timing
    bench("autoencoder").main(
        ["--channels", "32", "32", "--layers", "1", "--sizes", "32", "--rounds", "1", "--inner", "1",
         "--tasks", "encode+decode", "--variants", "hetvae", "previous", "no_channels_last",
         "no_contiguous_attention", "no_silu_inplace", "channels_last"]
    )
    out = capsys.readouterr().out
    for variant in ("previous", "no_channels_last", "no_contiguous_attention", "no_silu_inplace", "diffusers channels_last"):
        assert f"| {variant}" in out, variant


def test_step_benchmark_runs_both_sides(bench, capsys):
    pytest.importorskip("lpips")
    bench("step_vs_diffusers").main(
        ["--device", "cpu", "--channels", "32", "32", "--layers", "1", "--resolution", "32", "--batch", "1",
         "--precision", "fp32", "--rounds", "1", "--inner", "1"]
    )
    out = capsys.readouterr().out
    assert "diffusers + SD loss (baseline)" in out and "hetvae, per-pixel head" in out
