"""`hetvae uncertainty` on latents: files read, pipeline scaling undone, decoded image with its scale map,
against hetvae's decode, the closed-form soft clamp and a real diffusers pipeline's own decoding."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from hetvae import AutoencoderConfig, AutoencoderKL, Likelihood
from hetvae.cli import main
from hetvae.images import load_latents
from hetvae.outputs import is_hetvae_output
from hetvae.predictor import load_predictor

TINY = dict(block_out_channels=(32, 64), norm_num_groups=16, layers_per_block=1, latent_channels=4)


def soft_clamp_reference(x: torch.Tensor, low: float = -7.0, high: float = 3.0, margin: float = 1.0) -> torch.Tensor:
    """The soft clamp of docs/math.md, written out independently of hetvae.functional."""
    x = x.double()
    below = low + margin * torch.exp(torch.clamp(x - low - margin, max=0) / margin)
    above = high - margin * torch.exp(torch.clamp(high - margin - x, max=0) / margin)
    return torch.where(x < low + margin, below, torch.where(x > high - margin, above, x))


def model_with_head(seed: int = 0, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**{**TINY, **config}))
    model.add_log_scale_head(init=-2.0)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(0, 0.6)
    return model.eval()


def read_maps(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def checkpoint(tmp_path):
    model = model_with_head(scaling_factor=0.5, shift_factor=0.1)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_latent_file_gives_decoded_image_and_bounded_map(checkpoint, tmp_path):
    model, ckpt = checkpoint
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    save_file({"latents": z, "other": torch.zeros(1)}, str(tmp_path / "z.safetensors"))
    out = tmp_path / "out"
    assert main(["uncertainty", str(ckpt), "--images", str(tmp_path / "z.safetensors"), "--out", str(out)]) == 0
    with torch.no_grad():
        rec = model.decode(z)
    assert rec.log_scale.min() < -6 or rec.log_scale.max() > 2, "the test must reach outside the identity band"
    for i in range(2):
        panel, scale, maps = (out / f"z.safetensors_{i}{s}" for s in ("_panel.png", "_scale.png", "_maps.safetensors"))
        assert all(is_hetvae_output(p) for p in (panel, scale, maps))
        got = read_maps(maps)
        torch.testing.assert_close(got["latents"], z[i], rtol=0, atol=0)
        torch.testing.assert_close(got["mean"], rec.mean[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["log_scale"].double(), soft_clamp_reference(rec.log_scale[i]), rtol=0, atol=1e-4)
        with Image.open(scale) as im:
            assert im.size == (16, 16)
        with Image.open(panel) as im:
            assert im.size[0] < 700  # two columns, no error column: there is no target


def test_scaled_latents_are_unscaled_with_the_model_config(checkpoint, tmp_path):
    model, ckpt = checkpoint
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.save((z - 0.1) * 0.5, tmp_path / "scaled.pt")  # what a pipeline with scaling 0.5, shift 0.1 gives
    torch.save({"anything": z}, tmp_path / "plain.pt")
    assert main(["uncertainty", str(ckpt), "--images", str(tmp_path / "scaled.pt"), "--scaled", "--out", str(tmp_path / "a")]) == 0
    assert main(["uncertainty", str(ckpt), "--images", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "b")]) == 0
    a, b = read_maps(tmp_path / "a" / "scaled.pt_maps.safetensors"), read_maps(tmp_path / "b" / "plain.pt_maps.safetensors")
    torch.testing.assert_close(a["latents"], z[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["mean"], b["mean"], rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(b["mean"], model.decode(z).mean[0], rtol=0, atol=1e-4)

    # latents_mean / latents_std in the config: diffusers' SDXL-style unscaling, z * std / sf + mean
    config = AutoencoderConfig(**TINY, scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    save_file({"x": torch.ones(1, 4, 2, 2)}, str(tmp_path / "ones.safetensors"))
    got = load_latents(tmp_path / "ones.safetensors", config, scaled=True)
    want = torch.tensor([1 * 2.0 / 0.5 + 0.1, 1 * 1.0 / 0.5 - 0.2, 1 * 0.5 / 0.5 + 0.3, 1 * 1.5 / 0.5 + 0.0])
    torch.testing.assert_close(got[0, :, 0, 0], want)


def test_calibrated_and_learned_global_scales(tmp_path):
    calibration = {"method": "affine", "family": "laplace", "slope": [0.9, 1.2, 1.0], "offset": [0.3, -0.2, 0.1]}
    model = AutoencoderKL(AutoencoderConfig(**TINY, likelihood=Likelihood(granularity="pixel", calibration=calibration)))
    model.add_log_scale_head(init=-2.0)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(0, 0.6)
    model.eval().save_pretrained(tmp_path / "cal")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    save_file({"latents": z}, str(tmp_path / "z.safetensors"))
    assert main(["uncertainty", str(tmp_path / "cal"), "--images", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "c")]) == 0
    assert main(["uncertainty", str(tmp_path / "cal"), "--images", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "u"), "--uncalibrated"]) == 0
    with torch.no_grad():
        calibrated = model.decode(z).log_scale[0]  # hetvae's decode: bounded, then calibrated
        model.use_calibration = False
        bounded = soft_clamp_reference(model.decode(z).log_scale[0])
    got = read_maps(tmp_path / "c" / "z.safetensors_maps.safetensors")["log_scale"]
    torch.testing.assert_close(got, calibrated, rtol=0, atol=1e-4)
    slope, offset = torch.tensor([0.9, 1.2, 1.0]).view(3, 1, 1), torch.tensor([0.3, -0.2, 0.1]).view(3, 1, 1)
    torch.testing.assert_close(got.double(), slope * bounded + offset, rtol=0, atol=1e-4)
    uncal = read_maps(tmp_path / "u" / "z.safetensors_maps.safetensors")["log_scale"]
    torch.testing.assert_close(uncal.double(), bounded, rtol=0, atol=1e-4)

    # a learned global scale: a constant map at soft_clamp(init + free)
    free = 0.7
    plain = AutoencoderKL(AutoencoderConfig(**TINY, likelihood=Likelihood(granularity="global", init=-1.0, free=(free,))))
    plain.eval().save_pretrained(tmp_path / "global")
    predictor = load_predictor(tmp_path / "global")
    decoded = predictor.decode_latents(z[0])
    assert decoded.log_scale.shape == (1, 3, 16, 16)
    torch.testing.assert_close(decoded.log_scale, torch.full_like(decoded.log_scale, -1.0 + free))


def test_tiled_decoding_of_latents(checkpoint, tmp_path):
    model, ckpt = checkpoint
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    save_file({"latents": z}, str(tmp_path / "big.safetensors"))
    assert main(["uncertainty", str(ckpt), "--images", str(tmp_path / "big.safetensors"), "--out", str(tmp_path / "o"), "--tile", "16"]) == 0
    got = read_maps(tmp_path / "o" / "big.safetensors_maps.safetensors")
    with torch.no_grad():
        model.enable_tiling(tile_sample_size=16)
        rec = model.decode(z)
    torch.testing.assert_close(got["mean"], rec.mean[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["log_scale"].double(), soft_clamp_reference(rec.log_scale[0]), rtol=0, atol=1e-4)


def test_bad_latent_files_name_the_file(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint

    def error(*paths, extra=()):
        code = main(["uncertainty", str(ckpt), "--images", *map(str, paths), "--out", str(tmp_path / "o"), *extra])
        assert code == 1
        return capsys.readouterr().err

    save_file({"a": torch.zeros(1, 4, 2, 2), "b": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "two.safetensors"))
    assert "two.safetensors: expected one tensor or one named 'latents', found 2 ('a', 'b')" in error(tmp_path / "two.safetensors")
    save_file({"z": torch.zeros(1, 16, 2, 2)}, str(tmp_path / "sd3.safetensors"))
    assert "sd3.safetensors: shape (1, 16, 2, 2), expected (B, 4, h, w): the model has latent_channels=4" in error(tmp_path / "sd3.safetensors")
    save_file({"z": torch.zeros(4, 2, 2)}, str(tmp_path / "three.safetensors"))
    assert "three.safetensors: shape (4, 2, 2)" in (msg := error(tmp_path / "three.safetensors")) and "z[None]" in msg
    save_file({"z": torch.zeros(1, 4, 2, 2, dtype=torch.int32)}, str(tmp_path / "int.safetensors"))
    assert "int.safetensors: expected floating-point values, got torch.int32" in error(tmp_path / "int.safetensors")
    save_file({"z": torch.full((1, 4, 2, 2), math.nan)}, str(tmp_path / "nan.safetensors"))
    assert "nan.safetensors: 16 value(s) are NaN or infinite" in error(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "junk.safetensors: cannot read the safetensors file" in error(tmp_path / "junk.safetensors")
    torch.save({"z": torch.nn.Linear(1, 1)}, tmp_path / "module.pt")
    assert "module.pt: cannot load it with torch.load(weights_only=True)" in error(tmp_path / "module.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "list.pt: expected a tensor or a dict of tensors, found a list" in error(tmp_path / "list.pt")
    assert "missing.pt: no such file" in error(tmp_path / "missing.pt")
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert "give images or latent files, not both" in error(tmp_path / "x.png", tmp_path / "nan.safetensors")
    assert "--scaled applies to latent files" in error(tmp_path / "x.png", extra=["--scaled"])
    assert not (tmp_path / "o").exists()

    # no head and no recorded scale: the scale would be fitted to an error there is none of
    AutoencoderKL(AutoencoderConfig(**TINY)).save_pretrained(tmp_path / "nohead")
    save_file({"z": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "ok.safetensors"))
    code = main(["uncertainty", str(tmp_path / "nohead"), "--images", str(tmp_path / "ok.safetensors"), "--out", str(tmp_path / "o")])
    assert code == 1 and "ok.safetensors" in (msg := capsys.readouterr().err) and "no per-pixel log-scale head" in msg


def test_a_diffusers_pipelines_latents(tmp_path):
    """docs/diffusers.md (c): a pipeline's output_type="latent", saved with safetensors, then
    `hetvae uncertainty MODEL --images latents.safetensors --scaled`: the decoded image is the one the pipeline
    itself decodes, and the map is the one attach_log_scale_head gives on the pipeline's VAE."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")  # diffusers' pipelines import it
    import hetvae

    model = model_with_head(seed=5, scaling_factor=0.5)
    model.save_pretrained(tmp_path / "export", format="diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    embeddings = torch.randn(1, 7, 32)

    def run(output_type):
        return pipe(prompt_embeds=embeddings, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    output_type=output_type, generator=torch.Generator().manual_seed(0)).images

    latents = run("latent")
    image = run("pt")  # the pipeline's own decoding, in [0, 1]
    save_file({"latents": latents}, str(tmp_path / "latents.safetensors"))
    assert main(["uncertainty", str(tmp_path / "export"), "--images", str(tmp_path / "latents.safetensors"), "--scaled", "--out", str(tmp_path / "out")]) == 0
    maps = read_maps(tmp_path / "out" / "latents.safetensors_maps.safetensors")
    torch.testing.assert_close((maps["mean"] / 2 + 0.5).clamp(0, 1), image[0], rtol=0, atol=1e-4)
    with torch.no_grad():
        attached = hetvae.attach_log_scale_head(vae, tmp_path / "export").decode(latents / vae.config.scaling_factor)
    torch.testing.assert_close(maps["log_scale"], attached.log_scale[0], rtol=0, atol=1e-4)
