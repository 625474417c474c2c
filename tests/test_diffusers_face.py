"""hetvae's AutoencoderKL as a drop-in for diffusers.AutoencoderKL (issue 14, item 1).

Every check runs diffusers' own code: its pipelines (built offline, random weights, tiny sizes,
2 steps), ``retrieve_latents``, ``DiagonalGaussianDistribution`` and ``AutoencoderKL`` loading a
hetvae export. The hetvae model carries a trained-looking per-pixel head, so the checks also show
that the head changes nothing diffusers sees.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, Reconstruction
from hetvae.likelihood import Likelihood
from hetvae.distributions import DiagonalGaussian
from hetvae.functional import soft_clamp

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' pipelines import it

from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents  # noqa: E402

SIZE = 32  # pixels; latents are 16 x 16 (two levels: downsample factor 2)


def _hetvae_model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=SIZE, log_scale="pixel"
    )
    model = AutoencoderKL(cfg).eval()
    with torch.no_grad():  # non-trivial weights everywhere, the head's zero output conv included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """(hetvae model, the stock diffusers model loaded from its diffusers export)."""
    ours = _hetvae_model()
    folder = tmp_path_factory.mktemp("export")
    ours.save_pretrained(folder, format="diffusers")
    stock = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    return ours, stock


def _images(b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _unet() -> "diffusers.UNet2DConditionModel":
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    ).eval()


def _scheduler() -> "diffusers.DDIMScheduler":
    return diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


def _pipeline(cls, vae, unet):
    return cls(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _prompt_embeds(b: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, 32, generator=torch.Generator().manual_seed(2))


def _assert_same_image(run, ours_vae, stock_vae, *, float32: bool = True) -> None:
    """``run(vae, dtype)`` gives the same image with either VAE: equal to rounding in float64, and in
    float32 as close to the float64 image as diffusers' own float32 run (the conftest criterion)."""
    with torch.no_grad():
        got64, want64 = run(ours_vae, torch.float64), run(stock_vae, torch.float64)
        ours_vae.float(), stock_vae.float()  # the pipeline moved the shared models to float64: back, exactly
        assert got64.shape == want64.shape and got64.dtype == torch.float64
        torch.testing.assert_close(got64, want64, rtol=0, atol=1e-10)
        if not float32:
            return
        got32, want32 = run(ours_vae, torch.float32), run(stock_vae, torch.float32)
    assert got32.shape == want32.shape and got32.dtype == want32.dtype == torch.float32
    ours_err = (got32.double() - want64).abs().max().item()
    ref_err = (want32.double() - want64).abs().max().item()
    assert ours_err <= max(2 * ref_err, 1e-6), f"float32 error {ours_err:.3g} vs diffusers' own {ref_err:.3g}"


def test_text_to_image_pipeline_gives_the_stock_vae_image(vaes):
    ours, stock = vaes
    unet = _unet()

    def run(vae, dtype):
        pipe = _pipeline(diffusers.StableDiffusionPipeline, vae, unet).to(dtype=dtype)
        assert pipe.vae is vae and pipe.vae_scale_factor == 2 and pipe.dtype == dtype and pipe.device.type == "cpu"
        return pipe(
            prompt_embeds=_prompt_embeds().to(dtype), height=SIZE, width=SIZE, num_inference_steps=2,
            guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images

    _assert_same_image(run, ours, stock)


def test_img2img_pipeline_encodes_samples_and_decodes_as_the_stock_vae(vaes):
    # retrieve_latents(vae.encode(image), generator) -> latent_dist.sample(generator): a list of
    # generators, one per image, must draw what diffusers' randn_tensor draws.
    ours, stock = vaes
    unet = _unet()
    image = (_images(2) + 1) / 2

    def run(vae, dtype):
        pipe = _pipeline(diffusers.StableDiffusionImg2ImgPipeline, vae, unet).to(dtype=dtype)
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        return pipe(
            image=image.to(dtype), prompt_embeds=_prompt_embeds(2).to(dtype), strength=0.75, num_inference_steps=2,
            guidance_scale=1.0, generator=gens, output_type="pt",
        ).images

    _assert_same_image(run, ours, stock, float32=False)  # float32 is the text-to-image test's


def test_a_pipeline_vae_swapped_for_hetvae_and_the_map_of_its_latents(vaes):
    # A user swaps the VAE of a built pipeline, asks for latents, and decodes them with the map.
    ours, stock = vaes
    pipe = _pipeline(diffusers.StableDiffusionPipeline, stock, _unet())
    pipe.vae = ours
    kwargs = dict(prompt_embeds=_prompt_embeds(), height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.0)
    with torch.no_grad():
        image = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
        rec = ours.decode(latents / ours.config.scaling_factor + ours.config.shift_factor)
    torch.testing.assert_close(image, (rec.sample / 2 + 0.5).clamp(0, 1))
    assert rec.log_scale.shape == (1, 3, SIZE, SIZE) and rec.log_scale.std() > 0


def test_retrieve_latents_and_return_dict_false_match_diffusers(vaes):
    ours, stock = vaes
    x = _images()
    with torch.no_grad():
        for mode in ("sample", "argmax"):
            got = retrieve_latents(ours.encode(x), torch.Generator().manual_seed(5), mode)
            want = retrieve_latents(stock.encode(x), torch.Generator().manual_seed(5), mode)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        (posterior,) = ours.encode(x, return_dict=False)
        (stock_posterior,) = stock.encode(x, return_dict=False)
        assert isinstance(posterior, DiagonalGaussian) and posterior.latent_dist is posterior
        z = stock_posterior.mode()
        out = ours.decode(z, return_dict=False)
        want = stock.decode(z, return_dict=False)
        assert isinstance(out, tuple) and len(out) == len(want) == 1
        torch.testing.assert_close(out[0], want[0], rtol=0, atol=1e-5)
        rec = ours.decode(z, generator=torch.Generator().manual_seed(0))
        assert isinstance(rec, Reconstruction) and rec.sample is rec.mean and rec.log_scale is not None
        torch.testing.assert_close(rec.sample, stock.decode(z).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(rec.sample, out[0], rtol=0, atol=0)
        # hetvae's own usage is unchanged: encode(x) is the posterior, decode(z) the Reconstruction
        assert torch.equal(ours.encode(x).mean, posterior.mean)
        rec_fwd, post_fwd = ours(x)
        assert isinstance(rec_fwd, Reconstruction) and isinstance(post_fwd, DiagonalGaussian)


def test_posterior_matches_diffusers_distribution():
    moments = torch.randn(3, 8, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    moments[:, 4:] *= 12  # log-variances past both clamps
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    other_m = torch.randn(3, 8, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    other, their_other = DiagonalGaussian(other_m), DiagonalGaussianDistribution(other_m)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.kl(other), theirs.kl(their_other), rtol=1e-12, atol=0)
    s = ours.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(s, theirs.sample(torch.Generator().manual_seed(7)), rtol=0, atol=0)
    torch.testing.assert_close(ours.nll(s), theirs.nll(s), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.nll(s, dims=[1, 2]), theirs.nll(s, dims=[1, 2]), rtol=1e-12, atol=0)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (1, 2, 3)]  # noqa: E731
    torch.testing.assert_close(ours.sample(gens()), theirs.sample(gens()), rtol=0, atol=0)
    torch.testing.assert_close(ours.sample(gens()[:1]), theirs.sample(gens()[:1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 3"):
        ours.sample(gens()[:2])
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        ours.sample(7)
    with pytest.raises(ValueError, match=r"kl: other has shape \(1, 4, 4, 5\)"):
        ours.kl(DiagonalGaussian(other_m[:1]))


# What diffusers' pipelines read from vae.config (grep of diffusers/pipelines), plus the keys of
# diffusers' AutoencoderKL config.json.
PIPELINE_FIELDS = (
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size",
    "block_out_channels", "latent_channels",
)
CONFIG_JSON_FIELDS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "layers_per_block", "act_fn",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("key", PIPELINE_FIELDS + CONFIG_JSON_FIELDS)
def test_config_exposes_diffusers_fields_by_attribute_and_key(vaes, key):
    ours, stock = vaes
    want = stock.config[key]
    if key == "shift_factor" and want is None:
        want = 0.0  # diffusers' "no shift"; hetvae stores the number, so `z + shift_factor` needs no check
    assert _plain(getattr(ours.config, key)) == _plain(want)
    assert _plain(ours.config[key]) == _plain(want) and _plain(ours.config.get(key)) == _plain(want)
    assert key in ours.config


def test_config_mapping_access_and_diffusers_from_config(vaes):
    ours, stock = vaes
    with pytest.raises(KeyError, match="'nope' is not an AutoencoderConfig key"):
        ours.config["nope"]
    assert ours.config.get("nope", 3) == 3 and "nope" not in ours.config
    assert ours.config["log_scale"] == "pixel"  # hetvae's own fields too
    # diffusers can build the same architecture from hetvae's config as a dict
    rebuilt = diffusers.AutoencoderKL.from_config(dict(ours.config))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    assert rebuilt.config.scaling_factor == ours.config.scaling_factor


def test_dtype_and_device_follow_the_parameters():
    model = _hetvae_model()
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.to(torch.float16).dtype == torch.float16
    assert model.to(torch.float64).dtype == torch.float64


def test_save_pretrained_fp16_variant_and_bin_as_diffusers_writes_them(vaes, tmp_path):
    ours, stock = vaes
    half = _hetvae_model().half()
    half.save_pretrained(tmp_path / "fp16", format="diffusers", variant="fp16")
    names = sorted(p.name for p in (tmp_path / "fp16").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.fp16.safetensors", "log_scale_head.safetensors"]
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    want = copy.deepcopy(stock).half().state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k]) for k in got)
    back = AutoencoderKL.from_pretrained(tmp_path / "fp16", torch_dtype=torch.float16)
    assert back.dtype == torch.float16 and back.has_log_scale_head
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), half.state_dict().values()))

    ours.save_pretrained(tmp_path / "pipe" / "vae", format="diffusers", safe_serialization=False)
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.bin").is_file()
    from_bin = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae", use_safetensors=False)
    assert all(torch.equal(a, b) for a, b in zip(from_bin.state_dict().values(), stock.state_dict().values()))
    again = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="diffusers", variant="ema"), "variant must be None or 'fp16'"),
        (dict(format="hetvae", variant="fp16"), "the hetvae format is one safetensors file"),
        (dict(format="ldm", safe_serialization=False), "the ldm format is one safetensors file"),
    ],
)
def test_save_pretrained_refuses_what_a_format_cannot_hold(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _hetvae_model().save_pretrained(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_wrong_inputs_name_the_argument_and_shape(vaes, tmp_path):
    ours, _ = vaes
    with pytest.raises(ValueError, match=r"decode: z must have shape \(B, 4, H, W\) \(latent_channels=4\), got \(1, 3, 8, 8\)"):
        ours.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"encode: x must have shape \(B, 3, H, W\) \(in_channels=3\), got \(3, 32, 32\)"):
        ours.encode(torch.zeros(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="encode: x must be a torch.Tensor"):
        ours.encode([0.0])
    with pytest.raises(ValueError, match="torch_dtype must be a floating-point torch.dtype"):
        AutoencoderKL.from_pretrained(tmp_path, torch_dtype="float16")


def test_slicing_and_calibration_keep_working_through_the_face(vaes):
    ours, _ = vaes
    model = AutoencoderKL(ours.config)
    model.load_state_dict(ours.state_dict())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.decode(z)
        model.enable_slicing()
        sliced = model.decode(z)
        (sliced_mean,) = model.decode(z, return_dict=False)
        model.disable_slicing()
    torch.testing.assert_close(sliced.sample, plain.sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced_mean, sliced.mean, rtol=0, atol=0)
    # a calibrated model returns the bounded, corrected map on the diffusers face as well
    calibration = dict(method="affine", family="laplace", slope=[2.0, 1.0, 0.5], offset=[0.5, 0.0, -1.0],
                       knots=None, n_pixels=1, bpd_before=None, bpd_after=None)
    lik = Likelihood(granularity="pixel", fit="learned", free=None, calibration=calibration)
    model.config = dataclasses.replace(model.config, likelihood=lik)
    with torch.no_grad():
        calibrated = model.decode(z)
        model.use_calibration = False
        raw = model.decode(z)
    torch.testing.assert_close(calibrated.sample, raw.sample, rtol=0, atol=0)
    bounded = soft_clamp(raw.log_scale, *lik.bounds, lik.margin)
    want = bounded * torch.tensor([2.0, 1.0, 0.5]).view(3, 1, 1) + torch.tensor([0.5, 0.0, -1.0]).view(3, 1, 1)
    torch.testing.assert_close(calibrated.log_scale, want)
