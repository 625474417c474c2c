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


def test_map_ceiling_fits_a_known_affine_scale(bench):
    """The ceilings' affine correction recovers the scale that drew Laplace errors: |e| drawn with
    log-scale 0.7 m - 2 from a map m gives a = 0.7, c = -2."""
    import torch

    ceiling = bench("map_ceiling")
    torch.manual_seed(0)  # Laplace.sample draws from the global generator
    maps = [torch.randn(1, 3, 64, 64, dtype=torch.float64) for _ in range(4)]
    errors = [torch.distributions.Laplace(0.0, torch.exp(0.7 * m - 2)).sample().abs() for m in maps]
    a, c = ceiling.fit_affine(maps, errors)
    assert a == pytest.approx(0.7, abs=0.03) and c == pytest.approx(-2.0, abs=0.03)
    # blur keeps a constant image constant and averages a spike over its neighbourhood
    flat = torch.full((1, 3, 20, 20), 0.3, dtype=torch.float64)
    torch.testing.assert_close(ceiling.blur(flat, 2.0), flat)
    spike = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    spike[..., 10, 10] = 1
    assert ceiling.blur(spike, 2.0).sum().item() == pytest.approx(1.0, abs=1e-9)
