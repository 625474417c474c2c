"""hetvae.attach_log_scale_head: the uncertainty map from a stock diffusers.AutoencoderKL loaded from a
hetvae export, against hetvae's own decode of the same export and the closed form of the bounds."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hetvae
from hetvae import AutoencoderConfig, AutoencoderKL, Likelihood
from hetvae.attach import LogScaleDecoder
from hetvae.cli import main

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64), norm_num_groups=16, layers_per_block=1, latent_channels=4)


def soft_clamp_reference(x: torch.Tensor, low: float, high: float, margin: float) -> torch.Tensor:
    """docs/math.md's soft clamp written out element by element (the identity on [low+m, high-m],
    exponential approach to the bounds outside), independent of hetvae.functional."""
    def one(v: float) -> float:
        if v < low + margin:
            return low + margin * math.exp((v - low - margin) / margin)
        if v > high - margin:
            return high - margin * math.exp((high - margin - v) / margin)
        return v
    return torch.tensor([one(v) for v in x.double().flatten().tolist()], dtype=torch.float64).view(x.shape)


def trained_looking(*, seed: int = 0, likelihood: Likelihood | None = None, **head) -> AutoencoderKL:
    """A tiny model with random non-zero trunk and head whose raw map crosses both bounds."""
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**TINY, likelihood=likelihood))
    model.add_log_scale_head(init=-2.0, **head)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "log_scale" in name:
                p.copy_(torch.randn_like(p) * (0.6 if name.endswith("head.weight") else 0.3))
        model.decoder.log_scale_head.bias.fill_(-2.0)
    return model.eval()


def export(model: AutoencoderKL, tmp_path, name: str = "export", via_cli: bool = False):
    folder = tmp_path / name
    if via_cli:  # the way a user exports a run: hetvae convert SRC DST --to diffusers
        model.save_pretrained(tmp_path / f"{name}-hetvae")
        assert main(["convert", str(tmp_path / f"{name}-hetvae"), "--to", "diffusers", "--out", str(folder)]) == 0
    else:
        model.save_pretrained(folder, format="diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    return folder, vae


def latents(batch: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed)) * 2


HEADS = {
    "plain": dict(),
    "one-map-trunk-sees-mean": dict(channels=1, layers=1, hidden=16, sees_mean=True),
    "two-layer-trunk": dict(layers=2, hidden=8),
    "trunk-sees-latent": dict(layers=2, hidden=8, sees_latent=True),
    "trunk-sees-mean-and-latent": dict(layers=1, hidden=8, sees_mean=True, sees_latent=True),
    "trunk-sees-mean-latent-and-edges": dict(layers=1, hidden=8, sees_mean=True, sees_latent=True, sees_edges=True),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_attached_map_equals_hetvae_decode_bounded(tmp_path, head):
    model = trained_looking(**HEADS[head])
    folder, vae = export(model, tmp_path, via_cli=head == "plain")
    z = latents()
    with torch.no_grad():
        raw = hetvae.load_autoencoder(folder).eval().decode(z).log_scale
        assert raw.min() < -7 and raw.max() > 3, "the test must exercise both bounds"
        for path in (folder, folder / "log_scale_head.safetensors"):
            dec = hetvae.attach_log_scale_head(vae, path)
            out = dec.decode(z)
            assert isinstance(dec, LogScaleDecoder)
            torch.testing.assert_close(out.sample, vae.decode(z).sample, rtol=0, atol=0)
            torch.testing.assert_close(out.sample, model.decode(z).mean, rtol=0, atol=1e-4)
            assert out.log_scale.shape == raw.shape and out.log_scale.dtype == torch.float32
            want = soft_clamp_reference(raw, -7.0, 3.0, 1.0)
            torch.testing.assert_close(out.log_scale.double(), want, rtol=0, atol=1e-4)
            assert out.log_scale.min() >= -7 and out.log_scale.max() <= 3
        # in float64 the only difference left is rounding: hetvae's decode and the stock one with the head
        model64 = hetvae.load_autoencoder(folder).eval().double()
        dec.vae.double()  # the head follows the vae's dtype
        out64 = dec.decode(z.double())
        assert out64.log_scale.dtype == torch.float64
        ref64 = model64.decode(z.double())
        torch.testing.assert_close(out64.sample, ref64.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(out64.log_scale, soft_clamp_reference(ref64.log_scale, -7.0, 3.0, 1.0), rtol=0, atol=1e-10)


def test_recorded_bounds_and_calibration_shape_the_map(tmp_path):
    calibration = {"method": "affine", "family": "laplace", "slope": [0.8, 1.1, 1.3], "offset": [0.2, -0.1, 0.05]}
    likelihood = Likelihood(granularity="pixel", bounds=(-5.0, 1.5), margin=0.5, calibration=calibration)
    model = trained_looking(seed=3, likelihood=likelihood)
    folder, vae = export(model, tmp_path)
    z = latents(batch=1)
    with torch.no_grad():
        loaded = hetvae.load_autoencoder(folder).eval()
        calibrated = loaded.decode(z).log_scale  # hetvae: bounded, then calibrated
        loaded.use_calibration = False
        raw = loaded.decode(z).log_scale
        bounded = soft_clamp_reference(raw, -5.0, 1.5, 0.5)
        slope, offset = torch.tensor([0.8, 1.1, 1.3]).view(3, 1, 1), torch.tensor([0.2, -0.1, 0.05]).view(3, 1, 1)

        dec = hetvae.attach_log_scale_head(vae, folder)
        assert dec.calibration is not None and dec.likelihood.bounds == (-5.0, 1.5)
        out = dec.decode(z)
        torch.testing.assert_close(out.log_scale, calibrated, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.log_scale.double(), slope * bounded + offset, rtol=0, atol=1e-4)

        plain = hetvae.attach_log_scale_head(vae, folder, calibrated=False).decode(z).log_scale
        torch.testing.assert_close(plain.double(), bounded, rtol=0, atol=1e-4)
        dec.use_calibration = False  # the switch on the object does the same
        torch.testing.assert_close(dec.decode(z).log_scale, plain, rtol=0, atol=0)

        # a head file alone finds the record in the config.json beside it
        alone = hetvae.attach_log_scale_head(vae, folder / "log_scale_head.safetensors").decode(z).log_scale
        torch.testing.assert_close(alone, out.log_scale, rtol=0, atol=0)


def test_head_file_away_from_its_export_uses_the_vae_config_then_defaults(tmp_path):
    likelihood = Likelihood(granularity="pixel", bounds=(-4.0, 2.0), margin=1.0)
    folder, vae = export(trained_looking(seed=4, likelihood=likelihood), tmp_path)
    moved = tmp_path / "elsewhere" / "head.safetensors"
    moved.parent.mkdir()
    moved.write_bytes((folder / "log_scale_head.safetensors").read_bytes())
    z = latents(batch=1)
    with torch.no_grad():
        model = hetvae.load_autoencoder(folder).eval()
        raw = model.decode(z).log_scale
        # diffusers keeps the _hetvae_likelihood key of config.json in vae.config
        out = hetvae.attach_log_scale_head(vae, moved).decode(z).log_scale
        torch.testing.assert_close(out.double(), soft_clamp_reference(raw, -4.0, 2.0, 1.0), rtol=0, atol=1e-4)
        bare = diffusers.AutoencoderKL.from_config({k: v for k, v in vae.config.items() if k != "_hetvae_likelihood"})
        bare.load_state_dict(vae.state_dict())
        out = hetvae.attach_log_scale_head(bare.eval(), moved).decode(z).log_scale
        torch.testing.assert_close(out.double(), soft_clamp_reference(raw, -7.0, 3.0, 1.0), rtol=0, atol=1e-4)


def test_ldm_and_hetvae_exports_carry_their_head_and_likelihood(tmp_path):
    likelihood = Likelihood(granularity="pixel", bounds=(-6.0, 2.5), margin=1.0)
    model = trained_looking(seed=5, likelihood=likelihood, layers=1, hidden=8)
    _, vae = export(model, tmp_path)
    model.save_pretrained(tmp_path / "ldm", format="ldm")
    model.save_pretrained(tmp_path / "het")
    z = latents(batch=1)
    with torch.no_grad():
        want = soft_clamp_reference(model.decode(z).log_scale, -6.0, 2.5, 1.0)
        for path in (tmp_path / "ldm", tmp_path / "ldm" / "vae.log_scale_head.safetensors",
                     tmp_path / "het", tmp_path / "het" / "model.safetensors"):
            out = hetvae.attach_log_scale_head(vae, path).decode(z).log_scale
            torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4, msg=str(path))


def test_stock_vae_is_left_unchanged_and_slicing_tiling_pass_through(tmp_path):
    folder, vae = export(trained_looking(seed=6), tmp_path)
    dec = hetvae.attach_log_scale_head(vae, folder)
    conv_out = vae.decoder.conv_out
    z = latents(batch=3, size=16)
    with torch.no_grad():
        whole = dec.decode(z)
        assert not conv_out._forward_hooks
        assert vae.decode(z).sample.shape[1] == 3
        with pytest.raises(RuntimeError):
            dec.decode(torch.randn(1, 5, 8, 8))  # a wrong latent: the stock error, and the hook is gone
        assert not conv_out._forward_hooks

        sample, log_scale = dec.decode(z, return_dict=False)
        torch.testing.assert_close(sample, whole.sample, rtol=0, atol=0)
        assert whole.mean is whole.sample

        vae.enable_slicing()
        sliced = dec.decode(z)
        torch.testing.assert_close(sliced.sample, vae.decode(z).sample, rtol=0, atol=0)
        torch.testing.assert_close(sliced.log_scale, whole.log_scale, rtol=0, atol=1e-4)  # batch size 1 vs 3: rounding
        vae.disable_slicing()

        # diffusers' own tiling: the image is exactly the stock tiled decode, the map is blended with it
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 8  # this tiny VAE down-samples by 2
        tiled = dec.decode(z)
        torch.testing.assert_close(tiled.sample, vae.decode(z).sample, rtol=0, atol=0)
        assert tiled.log_scale.shape == whole.log_scale.shape and torch.isfinite(tiled.log_scale).all()


def test_missing_head_wrong_shapes_and_other_vae_are_clear(tmp_path):
    no_head = AutoencoderKL(AutoencoderConfig(**TINY))
    no_head.save_pretrained(tmp_path / "plain", format="diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "plain").eval()
    with pytest.raises(ValueError, match=r"plain.*no log-scale head.*log_scale_head\.safetensors"):
        hetvae.attach_log_scale_head(vae, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        hetvae.attach_log_scale_head(vae, tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="diffusers AutoencoderKL.*got Linear"):
        hetvae.attach_log_scale_head(torch.nn.Linear(2, 2), tmp_path / "plain")

    narrow = AutoencoderKL(AutoencoderConfig(block_out_channels=(16, 64), norm_num_groups=16, layers_per_block=1))
    narrow.add_log_scale_head(sees_mean=True)
    narrow.save_pretrained(tmp_path / "narrow", format="diffusers")
    head_file = tmp_path / "narrow" / "log_scale_head.safetensors"
    with pytest.raises(ValueError, match=r"log_scale_head\.safetensors: the head does not fit this VAE: its first layer "
                                         r"reads 19 channels.*conv_out reads 32 features and writes 3"):
        hetvae.attach_log_scale_head(vae, head_file)

    # same shapes, other weights: attached, with a warning that the features differ
    folder, _ = export(trained_looking(seed=7), tmp_path, name="other")
    with pytest.warns(UserWarning, match="conv_out differs"):
        hetvae.attach_log_scale_head(vae, folder)
    own, own_vae = export(trained_looking(seed=8), tmp_path, name="own")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hetvae.attach_log_scale_head(own_vae, own)
