"""AutoencoderKL: config, posterior, head grafting, tiling, slicing, checkpointing, input sizes.

Parity with diffusers lives in tests/test_convert.py (it goes through the diffusers folder format).
"""

from __future__ import annotations

import json

import math

import pytest
import torch

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, Reconstruction, _tile_starts
from hetvae.distributions import DiagonalGaussian

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def tiny_model(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(**{**TINY, **kw})).eval()


def images(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# --- config ----------------------------------------------------------------------------------


def test_config_json_round_trip_keeps_tuples():
    cfg = AutoencoderConfig(**TINY, log_scale="pixel", log_scale_channels=1, log_scale_init=-2.0)
    back = AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.block_out_channels, tuple)


def test_config_defaults_are_sd_vae():
    cfg = AutoencoderConfig()
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.latent_channels == 4
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8


def test_config_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown AutoencoderConfig key\(s\) \['latent_dim'\]"):
        AutoencoderConfig.from_dict({"latent_dim": 4})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(log_scale="channel"), r"log_scale must be one of"),
        (dict(log_scale="pixel", log_scale_channels=2), r"log_scale_channels must be None, 1 or out_channels=3"),
        (dict(block_out_channels=()), r"at least one level"),
    ],
)
def test_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**kw)


# --- posterior -------------------------------------------------------------------------------


def test_diagonal_gaussian_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), kl, rtol=1e-5, atol=1e-5)
    z = post.sample(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(post.nll(z), -q.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    assert torch.equal(post.mode(), mean)
    assert torch.equal(DiagonalGaussian(mean, logvar).parameters, post.parameters)


def test_diagonal_gaussian_clamps_logvar_and_samples_reproducibly():
    post = DiagonalGaussian(torch.zeros(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    assert post.logvar.min().item() == -30.0 and post.logvar.max().item() == 20.0
    assert torch.isfinite(post.kl()).all()
    a = post.sample(generator=torch.Generator().manual_seed(3))
    b = post.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --- the log-scale head ------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [None, 1])
def test_grafted_head_keeps_mean_bit_identical_and_predicts_init(channels):
    model = tiny_model()
    x = images()
    with torch.no_grad():
        before, post = model(x)
        model.add_log_scale_head(channels=channels, init=-1.5)
        after, _ = model(x)
    assert before.log_scale is None
    assert torch.equal(after.mean, before.mean)
    assert after.log_scale.shape == (2, channels or 3, 32, 32)
    assert torch.all(after.log_scale == -1.5)
    assert model.config.log_scale == "pixel" and model.config.log_scale_init == -1.5
    assert model.last_layer is model.decoder.conv_out.weight
    with pytest.raises(ValueError, match="already has a log_scale_head"):
        model.add_log_scale_head()


@pytest.mark.parametrize("detach", [False, True])
def test_detached_head_cannot_move_the_mean_branch(detach):
    model = tiny_model(log_scale="pixel", log_scale_detach=detach)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.1)
    rec, _ = model(images(b=1))
    rec.log_scale.sum().backward()
    trunk_grad = model.decoder.norm_out.weight.grad
    assert model.decoder.log_scale_head.weight.grad.abs().sum() > 0
    if detach:
        assert trunk_grad is None
    else:
        assert trunk_grad.abs().sum() > 0


@pytest.mark.parametrize("sees_mean", [False, True])
def test_deep_head_starts_at_init_and_reads_the_mean_without_shaping_it(sees_mean):
    model = tiny_model(log_scale="pixel", log_scale_init=-2.0, log_scale_head_layers=2, log_scale_head_channels=8,
                       log_scale_head_sees_mean=sees_mean)
    x = images(b=1)
    rec, _ = model(x)
    assert torch.all(rec.log_scale == -2.0)  # zero output conv: the trunk cannot show at step 0
    assert model.decoder.log_scale_trunk[0].in_channels == 32 + (3 if sees_mean else 0)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.1)
        model.decoder.conv_out.weight.mul_(0)  # the mean no longer depends on the features...
    model.zero_grad()
    rec, _ = model(x)
    rec.log_scale.sum().backward()
    # ...so the only way the map could reach conv_out's weight is through the mean it reads: stopped
    assert model.decoder.conv_out.weight.grad is None or torch.all(model.decoder.conv_out.weight.grad == 0)
    assert model.decoder.log_scale_trunk[0].weight.grad.abs().sum() > 0
    if sees_mean:  # the map does depend on the mean's values
        changed = tiny_model(log_scale="pixel", log_scale_head_layers=2, log_scale_head_channels=8, log_scale_head_sees_mean=True)
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            changed.decoder.conv_out.bias.add_(0.5)
            assert not torch.equal(changed(x)[0].log_scale, model(x)[0].log_scale)


def head_input_then_backward(model, x):
    """What the head's first trunk layer reads for ``x`` (the map still at its init), the
    reconstruction and posterior of that pass; then, with a random output conv, the map's sum
    back-propagated (the gradients are left on the model)."""
    seen = []
    handle = model.decoder.log_scale_trunk[0].register_forward_hook(
        lambda m, inputs, out: seen.append(inputs[0].detach()))
    rec, posterior = model(x, sample_posterior=False)
    handle.remove()
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.1)
    model.zero_grad()
    model(x)[0].log_scale.sum().backward()
    return seen[-1], rec, posterior


@pytest.mark.parametrize("detach", [False, True])
def test_head_reads_the_latent_each_pixel_of_it_over_its_block(detach):
    """log_scale_head_sees_latent: the trunk's first conv reads the features, the mean, then the
    decoder's input latent (after post_quant_conv) repeated over each latent pixel's f x f block;
    with log_scale_detach the map cannot reach the encoder through it."""
    model = tiny_model(log_scale="pixel", log_scale_init=-2.0, log_scale_head_layers=1, log_scale_head_channels=8,
                       log_scale_head_sees_mean=True, log_scale_head_sees_latent=True, log_scale_detach=detach)
    first = model.decoder.log_scale_trunk[0]
    latent, f = model.config.latent_channels, model.config.downsample_factor
    assert first.in_channels == 32 + 3 + latent
    seen, rec, posterior = head_input_then_backward(model, images(b=1, size=64))
    assert torch.all(rec.log_scale == -2.0)  # zero output conv, as every head
    z = model.post_quant_conv(posterior.mode()).detach()
    want = z.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    torch.testing.assert_close(seen[:, -latent:], want, rtol=0, atol=0)
    torch.testing.assert_close(seen[:, 32:35], rec.mean.detach(), rtol=0, atol=0)
    grad = model.encoder.conv_in.weight.grad
    assert first.weight.grad[:, -latent:].abs().sum() > 0
    if detach:
        assert grad is None or torch.all(grad == 0)
    else:
        assert grad.abs().sum() > 0


def test_log_edge_magnitude_matches_a_pixel_by_pixel_reference():
    """log(EDGE_FLOOR + the 5x5 mean, cut at the border, of |right - here| + |below - here|), with
    0 past the last column and row: computed here one pixel at a time in float64."""
    from hetvae.autoencoder import EDGE_FLOOR, log_edge_magnitude

    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    b, c, h, w = x.shape
    grad = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                grad[..., i, j] += (x[..., i, j + 1] - x[..., i, j]).abs()
            if i + 1 < h:
                grad[..., i, j] += (x[..., i + 1, j] - x[..., i, j]).abs()
    want = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = grad[..., max(i - 2, 0):i + 3, max(j - 2, 0):j + 3]
            want[..., i, j] = torch.log(window.mean(dim=(-2, -1)) + EDGE_FLOOR)
    torch.testing.assert_close(log_edge_magnitude(x), want, rtol=0, atol=1e-12)
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(log_edge_magnitude(flat), torch.full_like(flat, math.log(EDGE_FLOOR)))


def test_head_reads_the_edges_of_the_detached_mean_last():
    """log_scale_head_sees_edges: the trunk's first conv reads the features, the mean, the latent,
    then log_edge_magnitude of the mean; the map never reaches the mean through it."""
    from hetvae.autoencoder import log_edge_magnitude

    model = tiny_model(log_scale="pixel", log_scale_init=-2.0, log_scale_head_layers=1, log_scale_head_channels=8,
                       log_scale_head_sees_mean=True, log_scale_head_sees_latent=True, log_scale_head_sees_edges=True,
                       log_scale_detach=True)
    first = model.decoder.log_scale_trunk[0]
    latent = model.config.latent_channels
    assert first.in_channels == 32 + 3 + latent + 3
    seen, rec, _ = head_input_then_backward(model, images(b=1, size=64))
    assert torch.all(rec.log_scale == -2.0)
    torch.testing.assert_close(seen[:, -3:], log_edge_magnitude(rec.mean.detach()), rtol=0, atol=0)
    torch.testing.assert_close(seen[:, 32:35], rec.mean.detach(), rtol=0, atol=0)
    assert first.weight.grad[:, -3:].abs().sum() > 0
    for p in (model.decoder.conv_out.weight, model.encoder.conv_in.weight):
        assert p.grad is None or torch.all(p.grad == 0)
    model.remove_log_scale_head()
    assert not model.decoder.log_scale_sees_edges and not model.config.log_scale_head_sees_edges


def test_zero_init_residual_makes_every_block_the_identity():
    from hetvae.layers import ResnetBlock

    model = tiny_model()
    model.zero_init_residual()
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(torch.all(b.conv2.weight == 0) and torch.all(b.conv2.bias == 0) for b in blocks)
    h = torch.randn(1, 32, 8, 8)
    same = [b for b in blocks if b.nin_shortcut is None][0]
    torch.testing.assert_close(same(h), h)
    rec, _ = model(images(b=1))
    rec.mean.sum().backward()
    assert all(b.conv2.weight.grad.abs().sum() > 0 for b in blocks)


@pytest.mark.parametrize("quant_conv", [True, False])
def test_init_posterior_logvar_sets_the_posterior_variance(quant_conv):
    """The log-variance the encoder reports is the bias set plus what the weights add; with those
    weights zeroed it is the value exactly, the mean half is untouched, and it still trains."""
    model = tiny_model(use_quant_conv=quant_conv)
    layer = model.quant_conv if quant_conv else model.encoder.conv_out
    x = images(b=1)
    before = model.encode(x).latent_dist
    model.init_posterior_logvar(-8.0)
    half = layer.out_channels // 2
    with torch.no_grad():
        layer.weight[half:] = 0
    after = model.encode(x).latent_dist
    torch.testing.assert_close(after.logvar, torch.full_like(after.logvar, -8.0))
    torch.testing.assert_close(after.mean, before.mean)
    after.std.sum().backward()
    assert layer.bias.grad[half:].abs().sum() > 0


def test_amplify_input_chroma_reads_chroma_amplified_and_luminance_as_before():
    """The first convolution after amplify_input_chroma(g) on x is the one before on
    grey(x) + g * (x - grey(x)), grey(x) the per-pixel mean of R, G, B (closed form); g = 1 changes
    nothing; a bad gain is a ValueError."""
    import torch.nn.functional as F

    model = tiny_model()
    conv = model.encoder.conv_in
    x = images(b=2)
    grey = x.mean(1, keepdim=True).expand_as(x)
    before_weight = conv.weight.detach().clone()
    model.amplify_input_chroma(1.0)
    torch.testing.assert_close(conv.weight, before_weight)
    model.amplify_input_chroma(4.0)
    expected = F.conv2d(grey + 4.0 * (x - grey), before_weight, conv.bias, padding=conv.padding)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    flat = torch.full_like(x, 0.3)  # no chroma: read exactly as before
    torch.testing.assert_close(conv(flat), F.conv2d(flat, before_weight, conv.bias, padding=conv.padding))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gain"):
            model.amplify_input_chroma(bad)


# --- diffusers-style switches ------------------------------------------------------------------


def test_slicing_gives_the_same_result():
    model = tiny_model(log_scale="pixel")
    x = images(b=3)
    with torch.no_grad():
        ref, ref_post = model(x)
        model.enable_slicing()
        out, post = model(x)
    torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.log_scale, ref.log_scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(post.logvar, ref_post.logvar, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = images(b=1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        rec, post = model(x.clone().requires_grad_(True))
        (rec.mean.square().mean() + post.kl().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_result():
    model = tiny_model(log_scale="pixel")
    x = images()
    with torch.no_grad():
        ref, _ = model(x)
        model.to(memory_format=torch.channels_last)
        out, _ = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-5)


def test_cpu_activations_run_channels_last_and_outputs_keep_the_usual_layout():
    model = tiny_model(log_scale="pixel").double()
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.05)
    seen = []
    for block in (model.encoder.mid.attn_1, model.decoder.mid.block_2, model.decoder.up[0]):
        block.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    x = images().double()
    with torch.no_grad():
        rec, posterior = model(x)
        assert seen == [True, True, True]
        assert rec.mean.is_contiguous() and rec.log_scale.is_contiguous() and posterior.parameters.is_contiguous()
        for part in (model.encoder, model.decoder):
            part.channels_last_on_cpu = False
        plain, plain_posterior = model(x)
    assert seen[3:] == [False, False, False]
    # Only the kernels' summation order differs: in float64 that is rounding, nothing more.
    for got, want in ((rec.mean, plain.mean), (rec.log_scale, plain.log_scale), (posterior.mean, plain_posterior.mean)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_tokens_are_contiguous_in_either_layout():
    from hetvae.layers import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(channels=32, groups=8).double()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    strides = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        strides.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, **kw)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        nchw = block(x)
        nhwc = block(x.contiguous(memory_format=torch.channels_last))
    assert strides == [True, True]  # a transposed view would send CPU SDPA to its O(HW^2) math kernel
    # the closed form: softmax(q k^T / sqrt(C)) v, residual
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k, block.v))
    attn = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1) @ v
    want = x + block.proj_out(attn.transpose(1, 2).reshape(2, 32, 8, 8))
    torch.testing.assert_close(nchw, want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(nhwc, want.detach(), rtol=0, atol=1e-12)


# --- input sizes -------------------------------------------------------------------------------


def test_encode_rejects_sizes_that_are_not_multiples_and_says_why():
    model = tiny_model(block_out_channels=(32, 32, 64))
    with pytest.raises(ValueError, match=r"multiples of 4, got 30x32: the encoder halves the resolution 2 times"):
        model.encode(torch.zeros(1, 3, 30, 32))


def test_forward_pads_and_crops_back():
    model = tiny_model(block_out_channels=(32, 32, 64), log_scale="pixel")
    x = images(size=32)[:, :, :30, :27]
    with torch.no_grad():
        rec, post = model(x)
        padded = torch.nn.functional.pad(x, (0, 1, 0, 2), mode="replicate")
        ref = model.decode(model.encode(padded).mode())
    assert rec.mean.shape == x.shape and rec.log_scale.shape == x.shape
    assert post.mean.shape == (2, 4, 8, 7)
    assert torch.equal(rec.mean, ref.mean[..., :30, :27])


# --- tiling ------------------------------------------------------------------------------------


def test_tile_starts_cover_the_image_with_full_tiles():
    assert _tile_starts(16, 16, 12) == [0]
    assert _tile_starts(40, 16, 12) == [0, 12, 24]
    assert _tile_starts(30, 16, 12) == [0, 12, 14]


def test_tiling_is_exact_when_the_input_fits_one_tile():
    model = tiny_model(log_scale="pixel")
    x = images()
    with torch.no_grad():
        ref, _ = model(x)
        model.enable_tiling(tile_sample_size=32)
        out, _ = model(x)
    assert torch.equal(out.mean, ref.mean) and torch.equal(out.log_scale, ref.log_scale)


def _smooth_latent(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.avg_pool2d(torch.randn(1, 4, size, size, generator=g), 5, 1, 2) * 3


def test_tiled_decode_is_a_convex_blend_of_the_tiles():
    """The exact part of the tiling bound: outside the overlap bands a pixel equals the decode of
    the one tile covering it; inside a band it lies between the decodes of the tiles covering it."""
    model = tiny_model(log_scale="pixel")
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.02)
    z = _smooth_latent(24)  # latent tiles of 16 start at 0 and 8 along each axis
    with torch.no_grad():
        model.enable_tiling(tile_sample_size=32, overlap=0.25)  # overlap band: 4 latent px = 8 px
        tiled = model.decode(z)
        model.disable_tiling()
        tiles = {(i, j): model.decode(z[..., i : i + 16, j : j + 16]) for i in (0, 8) for j in (0, 8)}
    # (0, 0) alone covers rows/cols [0, 16): the band with tile 8 starts at 16 (=8*2) and is 8 px wide.
    torch.testing.assert_close(tiled.mean[..., :16, :16], tiles[0, 0].mean[..., :16, :16], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled.log_scale[..., 40:, 40:], tiles[8, 8].log_scale[..., 24:, 24:], rtol=0, atol=1e-6)
    # Rows/cols [16, 32) are covered by all four tiles.
    stack = torch.stack([t.mean[..., 16 - 16 * (i > 0) : 32 - 16 * (i > 0), 16 - 16 * (j > 0) : 32 - 16 * (j > 0)]
                         for (i, j), t in tiles.items()])
    band = tiled.mean[..., 16:32, 16:32]
    assert torch.all(band >= stack.min(0).values - 1e-6) and torch.all(band <= stack.max(0).values + 1e-6)


def test_tiled_decode_stays_close_to_untiled_and_closer_with_larger_tiles():
    """The approximate part: tiles normalise with their own GroupNorm statistics and attend only
    within themselves, so tiled != untiled. On this seeded tiny model (output std ~0.28) the mean
    absolute difference is below 0.07 for 48 px tiles of a 96 px image and below 0.04 for 64 px
    tiles (measured 0.056 and 0.030), for the mean and the log-scale map alike."""
    model = tiny_model(log_scale="pixel")
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.02)
    z = _smooth_latent(48)
    errors = []
    with torch.no_grad():
        ref = model.decode(z)
        for tile, bound in ((48, 0.07), (64, 0.04)):
            model.enable_tiling(tile_sample_size=tile, overlap=0.25)
            out = model.decode(z)
            err = (out.mean - ref.mean).abs().mean().item()
            assert err < bound
            assert (out.log_scale - ref.log_scale).abs().mean().item() < bound
            errors.append(err)
    assert errors[1] < errors[0]


def test_tiled_encode_stays_close_to_untiled():
    """Same bound for the moments: 32 px tiles of a 64 px image, mean absolute difference below
    0.06 (measured 0.041, latent std ~0.24)."""
    model = tiny_model()
    x = torch.nn.functional.avg_pool2d(images(b=1, size=64), 5, 1, 2)
    with torch.no_grad():
        ref = model.encode(x)
        model.enable_tiling(tile_sample_size=32, overlap=0.25)
        out = model.encode(x)
    assert out.mean.shape == ref.mean.shape == (1, 4, 32, 32)
    assert (out.mean - ref.mean).abs().mean().item() < 0.06
    assert (out.logvar - ref.logvar).abs().mean().item() < 0.06


def test_tiled_zero_head_still_predicts_init_everywhere():
    model = tiny_model(log_scale="pixel", log_scale_init=-3.0)
    model.enable_tiling(tile_sample_size=32)
    with torch.no_grad():
        rec = model.decode(_smooth_latent(40))
    assert isinstance(rec, Reconstruction) and rec.log_scale.shape == (1, 3, 80, 80)
    torch.testing.assert_close(rec.log_scale, torch.full_like(rec.log_scale, -3.0), rtol=0, atol=1e-6)


def test_enable_tiling_rejects_bad_settings():
    model = tiny_model()
    with pytest.raises(ValueError, match="positive multiple of 2"):
        model.enable_tiling(tile_sample_size=33)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 0.5\)"):
        model.enable_tiling(overlap=0.5)


def test_remove_log_scale_head_drops_head_trunk_and_settings():
    model = tiny_model(log_scale="pixel", log_scale_init=-2.0, log_scale_head_layers=1, log_scale_head_sees_mean=True)
    model.remove_log_scale_head()
    assert not model.has_log_scale_head and model.decoder.log_scale_trunk is None
    assert not any("log_scale" in k for k in model.state_dict())
    assert model.config == AutoencoderConfig(**TINY)
    assert model(images(b=1))[0].log_scale is None
