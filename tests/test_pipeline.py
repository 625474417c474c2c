"""hetvae's VAE inside diffusers pipelines, nothing dropped (hetvae.pipeline): passed to
``DiffusionPipeline.from_pretrained``, saved by ``pipe.save_pretrained`` and loaded back with the
same weights, head and calibration. Every check runs diffusers' own pipeline code on a tiny
pipeline built offline (random weights, 32 px, 2 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.convert import load_autoencoder
from hetvae.likelihood import Likelihood

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' pipelines import it
pipeline = pytest.importorskip("hetvae.pipeline")
PipelineAutoencoderKL = pipeline.PipelineAutoencoderKL

SIZE = 32
CALIBRATION = {"method": "affine", "family": "laplace", "slope": [0.8, 1.1, 1.3], "offset": [0.2, -0.1, 0.05]}
# what a pipeline saved without a text encoder, tokenizer and safety checker needs to load again
NO_TEXT = {"text_encoder": None, "tokenizer": None, "safety_checker": None, "feature_extractor": None,
           "requires_safety_checker": False}


def hetvae_model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    likelihood = Likelihood(granularity="pixel", bounds=(-5.0, 1.5), margin=0.5, calibration=CALIBRATION)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                            sample_size=SIZE, log_scale="pixel", likelihood=likelihood))
    with torch.no_grad():  # non-trivial weights everywhere, the head's zero output conv included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_model(got: AutoencoderKL, want: AutoencoderKL) -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    assert [k for k, v in want_sd.items() if not torch.equal(got_sd[k], v)] == []
    assert got.config == want.config  # the likelihood and its calibration included


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved stock pipeline (its VAE diffusers' own, loaded from the hetvae model's export) and
    the hetvae model."""
    ours = hetvae_model()
    root = tmp_path_factory.mktemp("pipe")
    ours.save_pretrained(root / "stock-vae", format="diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(root / "stock-vae"), unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False), **NO_TEXT,
    )
    pipe.save_pretrained(root / "base")
    return root / "base", ours


def run(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt_embeds=torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(2)), height=SIZE,
                    width=SIZE, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def test_from_pretrained_takes_the_hetvae_vae_and_gives_the_stock_image(base):
    folder, ours = base
    vae = PipelineAutoencoderKL.from_model(ours)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=vae, **NO_TEXT)
    assert pipe.vae is vae and pipe.config.vae == ("hetvae.pipeline", "PipelineAutoencoderKL")
    stock = diffusers.StableDiffusionPipeline.from_pretrained(folder, **NO_TEXT)
    assert type(stock.vae) is diffusers.AutoencoderKL
    torch.testing.assert_close(run(pipe), run(stock), rtol=0, atol=1e-5)


def test_a_plain_hetvae_vae_is_what_diffusers_refuses(base):
    folder, ours = base
    with pytest.raises(ValueError, match="should be <class 'diffusers.models.modeling_utils.ModelMixin'>"):
        diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=ours, **NO_TEXT)


def test_from_model_copies_everything_and_leaves_the_model(base):
    _, ours = base
    ours.use_calibration = False
    ours.enable_tiling(tile_sample_size=64)
    try:
        vae = PipelineAutoencoderKL.from_model(ours)
    finally:
        ours.use_calibration = True
        ours.enable_tiling(use_tiling=False)
    assert isinstance(vae, AutoencoderKL) and isinstance(vae, diffusers.ModelMixin)
    assert type(ours) is AutoencoderKL and not ours.use_tiling
    assert vae.use_calibration is False and vae.use_tiling and vae.tile_sample_size == 64
    assert_same_model(vae, ours)
    assert vae.decoder.conv_out.weight.data_ptr() != ours.decoder.conv_out.weight.data_ptr()  # a copy
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vae.use_calibration = True
        got, want = vae.decode(z), ours.decode(z)
    torch.testing.assert_close(got.log_scale, want.log_scale, rtol=0, atol=0)
    with pytest.raises(TypeError, match="model must be a hetvae AutoencoderKL, got Conv2d"):
        PipelineAutoencoderKL.from_model(torch.nn.Conv2d(1, 1, 1))


def test_a_saved_pipeline_loads_back_with_weights_head_and_calibration(base, tmp_path):
    folder, ours = base
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=PipelineAutoencoderKL.from_model(ours),
                                                             **NO_TEXT)
    image = run(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["vae"] == ["hetvae.pipeline", "PipelineAutoencoderKL"]
    vae_folder = tmp_path / "saved" / "vae"
    assert sorted(p.name for p in vae_folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "log_scale_head.safetensors"]
    assert json.loads((vae_folder / "config.json").read_text())["_hetvae_likelihood"]["calibration"]["slope"] == [0.8, 1.1, 1.3]

    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved", **NO_TEXT)
    assert type(again.vae) is PipelineAutoencoderKL and again.vae.calibration is not None
    assert_same_model(again.vae, ours)
    torch.testing.assert_close(run(again), image, rtol=0, atol=0)
    # the folder is a diffusers VAE too: stock diffusers and hetvae read it, the head and record beside
    assert_same_model(load_autoencoder(tmp_path / "saved"), ours)
    stock = diffusers.AutoencoderKL.from_pretrained(vae_folder)
    torch.testing.assert_close(stock.decoder.conv_out.weight, ours.decoder.conv_out.weight, rtol=0, atol=0)
    # torch_dtype reaches it as it reaches diffusers' models
    wide = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved", torch_dtype=torch.float64, **NO_TEXT)
    assert wide.vae.dtype == wide.unet.dtype == torch.float64


def test_a_variant_saved_with_the_pipeline_loads_with_it(base, tmp_path):
    folder, ours = base
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=PipelineAutoencoderKL.from_model(ours),
                                                             **NO_TEXT)
    pipe.to(torch.float16).save_pretrained(tmp_path / "saved", variant="fp16")
    assert (tmp_path / "saved" / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved", variant="fp16",
                                                              torch_dtype=torch.float16, **NO_TEXT)
    assert type(again.vae) is PipelineAutoencoderKL and again.vae.dtype == torch.float16
    want = {k: v.half() for k, v in ours.state_dict().items()}
    got = again.vae.state_dict()
    assert [k for k, v in want.items() if not torch.equal(got[k], v)] == []


def test_pipeline_vae_from_pretrained_takes_what_the_pipeline_loader_passes(base, tmp_path):
    _, ours = base
    ours.save_pretrained(tmp_path / "vae", format="diffusers")
    vae = PipelineAutoencoderKL.from_pretrained(
        tmp_path / "vae", torch_dtype=None, device_map=None, max_memory=None, offload_folder=None,
        offload_state_dict=None, variant=None, use_safetensors=None, use_flashpack=False, low_cpu_mem_usage=True,
        disable_mmap=False,
    )
    assert type(vae) is PipelineAutoencoderKL
    assert_same_model(vae, ours)


@pytest.mark.slow
def test_a_new_process_loads_the_pipeline_once_hetvae_pipeline_is_imported(base, tmp_path):
    folder, ours = base
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=PipelineAutoencoderKL.from_model(ours),
                                                             **NO_TEXT)
    pipe.save_pretrained(tmp_path / "saved")
    script = textwrap.dedent(f"""
        import sys, diffusers
        none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
        if sys.argv[1] == "import":
            import hetvae.pipeline
        try:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained({str(tmp_path / "saved")!r}, **none)
        except ValueError as e:
            print("refused:", e)
        else:
            print(type(pipe.vae).__name__, pipe.vae.has_log_scale_head, pipe.vae.calibration.method)
    """)
    out = {how: subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=300,
                               check=False)
           for how in ("import", "bare")}  # the outcome is in the output
    assert out["import"].stdout.strip().splitlines()[-1] == "PipelineAutoencoderKL True affine", out["import"].stderr
    assert "import hetvae.pipeline before calling `from_pretrained`" in out["bare"].stdout, out["bare"].stderr
