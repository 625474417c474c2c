"""The uncertainty panel: layout, shared error/scale colour range, file output."""

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.viz import save_uncertainty_panel, uncertainty_panel


def _batch(b=2, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    mean = (x + 0.1 * torch.randn(b, 3, size, size, generator=g)).clamp(-1, 1)
    return x, mean


def test_panel_layout_and_colour_ranges():
    x, mean = _batch()
    log_scale = torch.log((x - mean).abs() + 1e-3)  # a "perfect" per-pixel map
    fig = uncertainty_panel(x, mean, log_scale, title="step 5")
    axes = fig.axes  # the 2 x 4 panels first, then one colorbar per error/scale panel
    assert len(axes) == 2 * 4 + 2 * 2
    assert [ax.get_title() for ax in axes[:4]] == ["input", "reconstruction", "|error|", "predicted scale"]
    assert fig._suptitle.get_text() == "step 5"
    # error and scale of one row share a colour range, so they can be compared by eye
    err_im, scale_im = axes[2].images[0], axes[3].images[0]
    assert err_im.get_clim() == scale_im.get_clim()
    np.testing.assert_allclose(err_im.get_array(), (x - mean).abs().mean(1)[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(), (1, 3, 1, 1), (2, 1, 16, 16)], ids=["global", "channel", "shared-pixel"])
def test_panel_accepts_every_granularity(tmp_path, shape):
    x, mean = _batch()
    log_scale = torch.full(shape, -2.0)
    path = save_uncertainty_panel(tmp_path / "panels" / "p.png", x, mean, log_scale)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height  # 4 columns, 2 rows
    fig = uncertainty_panel(x, mean, log_scale)
    scale = fig.axes[3].images[0].get_array()
    np.testing.assert_allclose(scale, np.exp(-2.0), rtol=1e-6)  # constant for a global scale
    assert not list((tmp_path / "panels").glob(".*"))  # no temporary file left


def test_panel_rejects_mismatched_shapes():
    x, mean = _batch()
    with pytest.raises(ValueError, match="one \\(B, C, H, W\\) shape"):
        uncertainty_panel(x, mean[:1], torch.zeros(()))


def test_scale_structure_stays_visible_beside_heavy_tailed_errors():
    """Typical photo: small scales (1-3 levels) on flat regions, a few huge errors on edges. On a
    linear range set by the errors the scale map would be near-black; the log range keeps the
    flat and textured halves of the scale map far apart in colour."""
    from hetvae.viz import LEVELS_PER_UNIT, shared_log_range

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 32, 32)
    scale = torch.full((1, 1, 32, 32), 1.0 / LEVELS_PER_UNIT)
    scale[..., 16:] = 3.0 / LEVELS_PER_UNIT  # texture: three levels
    mean = x + scale * torch.randn(1, 3, 32, 32, generator=g)
    mean[..., 0, :4] += 1.5  # a few huge errors
    fig = uncertainty_panel(x, mean, scale.log())
    im = fig.axes[3].images[0]
    flat, textured = im.norm(scale[0, 0, 0, 0].item()), im.norm(scale[0, 0, 0, -1].item())
    assert textured - flat > 0.15  # linear 0..p99(error) would separate them by about 0.02
    vmin, vmax = shared_log_range((x - mean).abs().mean(1)[0].numpy(), scale[0, 0].numpy())
    np.testing.assert_allclose(im.get_clim(), (vmin, vmax), rtol=1e-6)  # the panel averages in float64
    assert vmax / vmin <= 1000
    assert "8-bit levels (log)" in fig.axes[-1].get_ylabel()
