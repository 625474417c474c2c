"""The benchmark scripts still run against the current code: ``--help`` for each, and tiny runs of
the two whose patches and baselines depend on the model's internals. Nothing is timed here; the
tiny runs check what the scripts check before timing (hetvae and diffusers agree)."""

from __future__ import annotations

import importlib
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
    """The ceilings' correction is hetvae's affine calibration fitted on images of different sizes
    pooled: errors drawn with log-scale 0.5 m - 3 from maps m give slope 0.5 and offset -3."""
    import torch

    ceiling = bench("map_ceiling")
    torch.manual_seed(0)  # Laplace.sample draws from the global generator
    maps = [torch.randn(1, 3, h, w, dtype=torch.float64) for h, w in ((64, 96), (80, 48), (48, 48))]
    means = [torch.zeros_like(m) for m in maps]
    targets = [torch.distributions.Laplace(0.0, torch.exp(0.5 * m - 3)).sample().clamp(-1, 1) for m in maps]
    assert ceiling.pooled(maps).shape == (1, 3, 64 * 96 + 80 * 48 + 48 * 48, 1)
    cal = ceiling.fit_affine(targets, means, maps)
    torch.testing.assert_close(cal.slope, torch.full((3,), 0.5, dtype=cal.slope.dtype), rtol=0, atol=0.04)
    torch.testing.assert_close(cal.offset, torch.full((3,), -3.0, dtype=cal.offset.dtype), rtol=0, atol=0.04)
    # blur keeps a constant image constant and averages a spike over its neighbourhood
    flat = torch.full((1, 3, 20, 20), 0.3, dtype=torch.float64)
    torch.testing.assert_close(ceiling.blur(flat, 2.0), flat)
    spike = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    spike[..., 10, 10] = 1
    assert ceiling.blur(spike, 2.0).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_smooth_regions_against_closed_forms(bench):
    """A region whose colour is shifted by a constant: signed error the shift, all of it low-pass,
    inside the 90% interval exactly when the shift is at most ln(10) b; a +-d checkerboard: no
    signed error and almost nothing low-pass."""
    import math

    import torch

    regions = bench("smooth_regions")
    ceiling = bench("map_ceiling")
    shift = torch.tensor([4.0, -2.0, 1.0]).view(3, 1, 1) / regions.LEVELS
    signed = shift.expand(3, 64, 64).clone()
    checker = (torch.arange(64).view(-1, 1) + torch.arange(64)) % 2 * 2.0 - 1.0
    signed[:, :, 32:] = checker[:, 32:] * 3.0 / regions.LEVELS
    low = ceiling.blur(signed[None], 8.0)[0]
    scale = torch.full_like(signed, 2.0 / regions.LEVELS)  # b = 2 levels: |shift| <= 4.6 levels is inside
    inside = signed.abs() <= math.log(10) * scale
    left = torch.zeros(64, 64, dtype=torch.bool)
    left[:, :4] = True  # 28 px from the checkerboard: beyond the 8 px blur's 24 px reach

    def region(mask, scale=scale, inside=inside):
        return regions.region_stats(*(t[:, mask] for t in (signed, low, scale, inside)))

    stats = region(left)
    assert stats["pixels"] == 256
    assert stats["signed_levels"] == pytest.approx([4.0, -2.0, 1.0], abs=1e-4)
    assert stats["abs_levels"] == pytest.approx(7.0 / 3.0, abs=1e-4)
    assert stats["scale_levels"] == pytest.approx(2.0, abs=1e-5)
    assert stats["cov90"] == 1.0
    assert stats["low_pass"] == pytest.approx(1.0, abs=0.1)
    right = ~torch.zeros(64, 64, dtype=torch.bool)
    right[:, :32] = False
    stats = region(right)
    assert stats["signed_levels"] == pytest.approx([0.0, 0.0, 0.0], abs=0.01)
    assert stats["abs_levels"] == pytest.approx(3.0, abs=1e-4) and stats["cov90"] == 1.0
    assert stats["low_pass"] < 0.3
    scale = torch.full_like(signed, 1.0 / regions.LEVELS)  # b = 1 level: only |error| <= 2.3 levels
    stats = region(left, scale, signed.abs() <= math.log(10) * scale)
    assert stats["cov90"] == pytest.approx(2 / 3)  # 4, -2, 1 levels against ln(10) = 2.3: one outside
    assert region(torch.zeros(64, 64, dtype=torch.bool)) is None


def test_tiny_step_candidates_parse_and_refuse(bench):
    """tiny_step's --candidate splits a name from ';'-separated overrides (commas stay inside list
    values) and refuses a value without both, naming it."""
    tiny_step = bench("tiny_step")
    assert tiny_step.parse_candidate("old: layout:model.block_out_channels=[32,64,64];train.steps=900") == (
        "old: layout", ["model.block_out_channels=[32,64,64]", "train.steps=900"])
    for bad in ("bad", ":train.steps=1", "name:"):
        with pytest.raises(SystemExit, match=f"--candidate '{bad}'"):
            tiny_step.parse_candidate(bad)


def test_tiny_step_reads_the_config_and_refuses_without_candidates(bench, capsys):
    """--config times another shipped config at its own batch shape; without a --candidate (the
    defaults are tiny.yaml's) or with a file that is not there it stops, naming the file."""
    from hetvae.config import load_config

    tiny_step = bench("tiny_step")
    pixel = load_config(tiny_step.CONFIGS / "pixel.yaml")
    assert tiny_step.step_shape(pixel, final=False) == (pixel.train.batch_size, pixel.data.resolution) == (16, 32)
    # the final phase keeps the pixels per step: 16 crops of 32 px -> one of 128 px
    assert tiny_step.step_shape(pixel, final=True) == (1, 128)
    with pytest.raises(SystemExit) as exit_:
        tiny_step.main(["--config", "pixel.yaml"])
    assert exit_.value.code == 2 and "--config pixel.yaml: give at least one --candidate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        tiny_step.main(["--config", "nope.yaml", "--candidate", "a:train.steps=1"])
    assert exit_.value.code == 2 and "--config nope.yaml: no such file" in capsys.readouterr().err


def test_photos_scores_a_calibrated_model_raw_and_calibrated(bench, tmp_path, capsys):
    """benchmarks/photos.py: one pooled row per set (and per --apart folder), a calibrated model's
    raw and calibrated figures both, equal to hetvae.evaluate's."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from hetvae import AutoencoderConfig, AutoencoderKL
    from hetvae.calibration import Calibration
    from hetvae.evaluate import evaluate
    from hetvae.images import load_images
    from hetvae.predictor import load_predictor, store_calibration

    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / folder / f"{k}.png")
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                                            latent_channels=4, log_scale="pixel"))
    model.save_pretrained(tmp_path / "m")
    predictor = load_predictor(tmp_path / "m")
    cal = Calibration("affine", predictor.family, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.5, 0.5]))
    store_calibration(predictor, cal, tmp_path / "m")
    out = tmp_path / "photos.json"
    assert bench("photos").main([str(tmp_path / "m"), "--photos", str(tmp_path / "a"), "--apart", str(tmp_path / "b"),
                                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["images"] for r in results] == ["a, 2 images", "b, 2 images"]
    want = evaluate(load_predictor(tmp_path / "m"), load_images(tmp_path / "a"))
    assert results[0]["nll_bpd"] == want["nll_bpd"] and results[0]["uncalibrated"] == want["uncalibrated"]
    table = capsys.readouterr().out
    assert table.count("| a, 2 images |") == 2 and f"{want['uncalibrated']['nll_bpd']:.3f}" in table
