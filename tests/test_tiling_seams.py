"""Tiling: blend weights that are a partition of unity, a log-scale map as close to the untiled one as
the mean is, no seam at tile borders, and diffusers' ``enable_tiling`` call forms.

The model-level checks use a tiny seeded model whose log-scale head gets PyTorch's default random init
(instead of its zero init), so the map varies as much as the mean. Tiles normalise with their own
GroupNorm statistics, so tiled != untiled for both outputs; the blend must add nothing on top: the map's
difference, in units of its own spread, stays within a bound tied to the mean's, and the difference to
the untiled output has no step at a tile border larger than its steps elsewhere. A hard cut between
tiles (``overlap=0``) must fail that seam check, so the check can fail.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, _blend_window, _tile_starts, tiled_apply

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def random_head_model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel")).eval()
    model.decoder.log_scale_head.reset_parameters()
    return model


def smooth_latent(size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(1, 4, size, size, generator=g), 5, 1, 2) * 3


# --- the weights ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tile=st.integers(2, 40), size_extra=st.integers(0, 80), frac=st.floats(0.0, 0.49))
def test_blend_windows_are_a_partition_of_unity(tile, size_extra, frac):
    """Where at most two tiles overlap (every case but tiny tiles on a large remainder), the windows
    placed at their starts sum to exactly 1, without the normalisation; every pixel has weight."""
    size = tile + size_extra
    starts = _tile_starts(size, tile, tile - int(tile * frac))
    windows = _blend_window(starts, tile, like=torch.zeros((), dtype=torch.float64))
    total = torch.zeros(size, dtype=torch.float64)
    covered = torch.zeros(size, dtype=torch.long)
    for s, w in zip(starts, windows):
        assert w.shape == (tile,) and torch.all(w > 0) and torch.all(w <= 1)
        total[s : s + tile] += w
        covered[s : s + tile] += 1
    assert covered.min() >= 1
    if covered.max() <= 2:
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_blend_window_is_the_smoothstep_across_the_whole_overlap():
    """Closed form: 40 px, tiles of 16 starting at 0, 12, 24: each overlap [12, 16), [24, 28) is 4 px,
    the second tile rises as p(u) = 3u^2 - 2u^3 at u = (x + 0.5) / 4 and the first falls as 1 - p(u).
    The last tile moved back (30 px: starts 0, 12, 14) blends across its whole 14 px overlap."""
    wins = _blend_window([0, 12, 24], 16, like=torch.zeros((), dtype=torch.float64))
    u = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    p = u * u * (3 - 2 * u)
    torch.testing.assert_close(wins[1][:4], p, rtol=0, atol=1e-15)
    torch.testing.assert_close(wins[0][12:], 1 - p, rtol=0, atol=1e-15)
    assert torch.all(wins[1][4:8] == 1) and torch.all(wins[0][:12] == 1) and torch.all(wins[2][4:] == 1)
    moved = _blend_window([0, 12, 14], 16, like=torch.zeros((), dtype=torch.float64))
    u = (torch.arange(14, dtype=torch.float64) + 0.5) / 14
    torch.testing.assert_close(moved[2][:14], u * u * (3 - 2 * u), rtol=0, atol=1e-15)


def test_tiles_that_agree_reassemble_the_untiled_result_exactly():
    """A tile function that commutes with cropping (here nearest 2x up-sampling, the decoder's
    resampling) gives the untiled result wherever tiles overlap, and None outputs stay None."""
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up, none = tiled_apply(lambda t: (F.interpolate(t, scale_factor=2), None), x, tile=16, overlap=4, scale=(2, 1))
    assert none is None
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=2), rtol=0, atol=1e-12)


# --- against the untiled decode --------------------------------------------------------------------


def seam_index(tiled: torch.Tensor, whole: torch.Tensor, borders: list[int]) -> float:
    """Largest mean |step| of ``tiled - whole`` across a tile border over the median step elsewhere."""
    d = (tiled - whole).double()
    g = torch.cat([(d[..., 1:] - d[..., :-1]).abs().mean((0, 1, 2)), (d[..., 1:, :] - d[..., :-1, :]).abs().mean((0, 1, 3))])
    n = d.shape[-1] - 1
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[torch.tensor(borders + [n + b for b in borders])] = True
    return (g[mask].max() / g[~mask].median()).item()


def tiled_and_whole(seed: int, tile_px: int, latent: int, overlap: float):
    model = random_head_model(seed)
    z = smooth_latent(latent, seed + 1)
    with torch.no_grad():
        whole = model.decode(z)
        model.enable_tiling(tile_sample_size=tile_px, overlap=overlap)
        tiled = model.decode(z)
    f = model.config.downsample_factor
    tile = tile_px // f
    starts = _tile_starts(latent, tile, tile - int(tile * overlap))
    borders = sorted({s * f - 1 for s in starts[1:]} | {(s + tile) * f - 1 for s in starts[:-1]})
    return tiled, whole, borders


# Measured (mean |d| / std, log-scale vs mean): 0.364/0.384, 0.338/0.348, 0.185/0.194, 0.218/0.220;
# max |d| / std: 4.10/4.49, 3.02/3.09, 2.85/2.22, 3.07/3.45. Seam index with overlap 0.25: 1.3-2.0.
CASES = [(0, 32, 48), (1, 32, 48), (0, 48, 48), (1, 48, 48)]


@pytest.mark.parametrize("seed,tile_px,latent", CASES)
def test_log_scale_differs_from_untiled_no_more_than_the_mean(seed, tile_px, latent):
    tiled, whole, _ = tiled_and_whole(seed, tile_px, latent, 0.25)
    rel = {k: (getattr(tiled, k) - getattr(whole, k)).abs() / getattr(whole, k).std() for k in ("mean", "log_scale")}
    assert rel["log_scale"].mean() <= 1.1 * rel["mean"].mean()
    assert rel["log_scale"].max() <= 1.5 * rel["mean"].max()


@pytest.mark.parametrize("seed,tile_px,latent", [(0, 32, 48), (0, 48, 48)])
def test_no_seam_at_tile_borders_and_a_hard_cut_is_caught(seed, tile_px, latent):
    """Blended (overlap 0.25): the difference to the untiled decode steps no more across a border
    than elsewhere (index < 2.5; measured 1.5-1.6). Cut (overlap 0): index 3.1-6.2 > 2.5."""
    tiled, whole, borders = tiled_and_whole(seed, tile_px, latent, 0.25)
    cut, _, cut_borders = tiled_and_whole(seed, tile_px, latent, 0.0)
    for name in ("mean", "log_scale"):
        assert seam_index(getattr(tiled, name), getattr(whole, name), borders) < 2.5, name
        assert seam_index(getattr(cut, name), getattr(whole, name), cut_borders) > 2.5, name


def test_tiled_encode_moments_blend_without_seams():
    model = random_head_model(0)
    x = F.avg_pool2d(torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1, 5, 1, 2)
    with torch.no_grad():
        whole = model.encode(x)
        model.enable_tiling(tile_sample_size=48, overlap=0.25)
        tiled = model.encode(x)
    # pixel tiles of 48 with a 12 px overlap (a multiple of f=2) start at 0, 36, 48: latent 0, 18, 24
    borders = sorted({s - 1 for s in (18, 24)} | {s + 24 - 1 for s in (0, 18)})
    for name in ("mean", "logvar"):
        assert seam_index(getattr(tiled, name), getattr(whole, name), borders) < 2.5, name


# --- diffusers' call forms -------------------------------------------------------------------------


def test_enable_tiling_takes_diffusers_call_forms_and_hetvae_keywords():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    # diffusers 0.42: enable_tiling(self) with no argument, the way its pipelines call it
    assert list(inspect.signature(DiffusersAutoencoderKL.enable_tiling).parameters) == ["self"]
    model = AutoencoderKL(AutoencoderConfig(**TINY))
    model.enable_tiling()
    assert (model.use_tiling, model.tile_sample_size, model.tile_overlap) == (True, 512, 0.25)
    model.enable_tiling(use_tiling=False)  # older diffusers: enable_tiling(use_tiling: bool = True)
    assert not model.use_tiling
    model.enable_tiling(True)
    assert model.use_tiling
    model.enable_tiling(tile_sample_size=64, overlap=0.3)
    model.disable_tiling()
    model.enable_tiling()  # keeps the tile settings, as diffusers keeps tile_sample_min_size
    assert (model.use_tiling, model.tile_sample_size, model.tile_overlap) == (True, 64, 0.3)


def test_enable_tiling_errors_name_the_argument():
    model = AutoencoderKL(AutoencoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"use_tiling must be True or False, got 256.*tile_sample_size=256"):
        model.enable_tiling(256)
    with pytest.raises(ValueError, match="tile_sample_size must be a positive multiple of 2, got 33"):
        model.enable_tiling(tile_sample_size=33)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 0.5\), got 0.5"):
        model.enable_tiling(overlap=0.5)
    assert not model.use_tiling
