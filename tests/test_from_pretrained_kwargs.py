"""``AutoencoderKL.from_pretrained`` takes the arguments diffusers users pass to
``diffusers.AutoencoderKL.from_pretrained``: ``variant`` (reads ``diffusion_pytorch_model.<variant>
.safetensors`` or ``.bin``, as diffusers does), ``use_safetensors``, ``subfolder``, ``torch_dtype``
(and diffusers' newer ``dtype``); ``hetvae.load_autoencoder`` takes ``variant`` and
``use_safetensors`` too (Hub ids: tests/test_hub.py). What hetvae cannot do (device maps, lazy loading) is
refused with a ``ValueError`` naming the argument and what to do instead, not read as an unknown
``AutoencoderConfig`` override. Where diffusers is installed, both read the same file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import hetvae
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.convert import inspect_checkpoint, ldm_to_diffusers, load_autoencoder
from hetvae.files import CheckpointError

TINY = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, mid_block_attention=False)
SAFE, FP16, BIN, FP16_BIN = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
)


def _model(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(TINY).eval()


def _same(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def _folder(tmp_path: Path, files: dict[str, int], name: str = "vae") -> Path:
    """A diffusers folder holding each weights file of ``files`` from the model of that seed
    (fp16 files in float16), all under one config.json."""
    folder = tmp_path / name
    for i, (file, seed) in enumerate(files.items()):
        model = _model(seed)
        variant = "fp16" if ".fp16." in file else None
        if variant:
            model = model.half()
        scratch = tmp_path / f"scratch{i}-{name}"
        model.save_pretrained(scratch, format="diffusers", variant=variant, safe_serialization=file.endswith(".safetensors"))
        folder.mkdir(exist_ok=True)
        shutil.copy(scratch / "config.json", folder / "config.json")
        written = next(p for p in scratch.iterdir() if p.name.startswith("diffusion_pytorch_model"))
        shutil.copy(written, folder / file)
    return folder


def _as_fp16(seed: int) -> AutoencoderKL:
    return _model(seed).half().float()


# --- variant ----------------------------------------------------------------------------------


def test_the_variant_file_is_read_when_asked_for_and_the_plain_one_otherwise(tmp_path):
    folder = _folder(tmp_path, {SAFE: 0, FP16: 1})
    assert _same(AutoencoderKL.from_pretrained(folder), _model(0))
    back = AutoencoderKL.from_pretrained(folder, variant="fp16")
    assert _same(back, _as_fp16(1)) and back.dtype == torch.float32
    assert _same(load_autoencoder(folder, variant="fp16"), _as_fp16(1))
    assert _same(hetvae.load_autoencoder(folder), _model(0))
    assert inspect_checkpoint(folder, variant="fp16").weights_file == folder / FP16
    half = AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and _same(half, _as_fp16(1))


def test_a_variant_only_folder_loads_with_and_without_the_variant(tmp_path):
    folder = _folder(tmp_path, {FP16: 2})
    for kwargs in ({}, {"variant": "fp16"}):
        assert _same(AutoencoderKL.from_pretrained(folder, **kwargs), _as_fp16(2))
    assert main(["info", str(folder)]) == 0
    assert main(["convert", str(folder), "--to", "diffusers", "--out", str(tmp_path / "out")]) == 0
    assert _same(load_autoencoder(tmp_path / "out"), _as_fp16(2))


def test_a_variant_in_a_pipeline_folder_and_with_subfolder(tmp_path):
    _folder(tmp_path / "pipe", {SAFE: 0, FP16: 1}, name="vae")
    assert _same(AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae", variant="fp16"), _as_fp16(1))
    assert _same(AutoencoderKL.from_pretrained(tmp_path / "pipe", variant="fp16"), _as_fp16(1))  # vae/ found


def test_variant_bin_files_and_use_safetensors(tmp_path):
    folder = _folder(tmp_path, {SAFE: 0, BIN: 1, FP16_BIN: 2})
    assert _same(AutoencoderKL.from_pretrained(folder, variant="fp16"), _as_fp16(2))  # no fp16 safetensors: .bin
    assert _same(AutoencoderKL.from_pretrained(folder, use_safetensors=False), _model(1))
    assert _same(AutoencoderKL.from_pretrained(folder, use_safetensors=True), _model(0))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
        AutoencoderKL.from_pretrained(folder, variant="fp16", use_safetensors=True)


def test_another_variant_name_is_read_as_diffusers_names_it(tmp_path):
    folder = _folder(tmp_path, {SAFE: 0})
    (folder / SAFE).rename(folder / "diffusion_pytorch_model.ema.safetensors")
    assert _same(AutoencoderKL.from_pretrained(folder, variant="ema"), _model(0))
    with pytest.raises(CheckpointError, match=r"variant='ema'"):  # the message says which variants are there
        AutoencoderKL.from_pretrained(folder)


@pytest.mark.parametrize("files, kwargs, expected", [
    ({SAFE: 0}, {"variant": "fp16"}, r"no diffusion_pytorch_model\.fp16\.safetensors or diffusion_pytorch_model\.fp16\.bin"),
    ({FP16: 0}, {"use_safetensors": False}, r"no diffusion_pytorch_model\.bin or diffusion_pytorch_model\.fp16\.bin"),
    ({BIN: 0}, {"use_safetensors": True}, r"no diffusion_pytorch_model\.safetensors or diffusion_pytorch_model\.fp16\.safetensors"),
])
def test_a_missing_variant_or_serialisation_names_the_file_and_what_is_there(tmp_path, files, kwargs, expected):
    folder = _folder(tmp_path, files)
    with pytest.raises(CheckpointError, match=expected) as error:
        AutoencoderKL.from_pretrained(folder, **kwargs)
    assert str(folder) in str(error.value) and next(iter(files)) in str(error.value)


def test_variant_and_use_safetensors_on_other_formats(tmp_path):
    model = _model(0)
    model.save_pretrained(tmp_path / "h")  # hetvae: model.safetensors
    with pytest.raises(ValueError, match=r"variant applies to a diffusers folder's weights; .* is a hetvae model"):
        AutoencoderKL.from_pretrained(tmp_path / "h", variant="fp16")
    assert _same(AutoencoderKL.from_pretrained(tmp_path / "h", use_safetensors=True), model)
    with pytest.raises(ValueError, match=r"use_safetensors=False asks for pickled \(\.bin\) weights, but .*/h/model\.safetensors is a safetensors file"):
        AutoencoderKL.from_pretrained(tmp_path / "h", use_safetensors=False)
    torch.save(model.state_dict(), tmp_path / "vae.ckpt")
    with pytest.raises(ValueError, match=r"use_safetensors=True asks for safetensors weights, but .*/vae\.ckpt is a pickle file"):
        AutoencoderKL.from_pretrained(tmp_path / "vae.ckpt", use_safetensors=True)


@pytest.mark.parametrize("variant", ["", "../fp16", "fp16.safetensors", 16, "a/b"])
def test_a_variant_that_is_not_a_name_is_refused(tmp_path, variant):
    folder = _folder(tmp_path, {SAFE: 0})
    with pytest.raises(ValueError, match="variant must be"):
        AutoencoderKL.from_pretrained(folder, variant=variant)


@pytest.mark.parametrize("value", ["yes", 1])
def test_use_safetensors_must_be_a_bool(tmp_path, value):
    with pytest.raises(ValueError, match="use_safetensors must be None, True or False"):
        AutoencoderKL.from_pretrained(_folder(tmp_path, {SAFE: 0}), use_safetensors=value)


# --- torch_dtype / dtype ------------------------------------------------------------------------


def test_dtype_is_torch_dtype(tmp_path):
    folder = _folder(tmp_path, {SAFE: 0})
    assert AutoencoderKL.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype and dtype"):
        AutoencoderKL.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="must be a floating-point torch.dtype"):
        AutoencoderKL.from_pretrained(folder, dtype=torch.int8)


# --- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    ({"revision": "main"}, r"revision='main' chooses a revision of a Hub repository, but .* is a local path"),
    ({"proxies": {"https": "http://proxy:8080"}}, r"proxies=.* is not supported: .*HTTPS_PROXY"),
    ({"local_files_only": "yes"}, r"local_files_only must be True or False, got 'yes'"),
    ({"device_map": "auto"}, r"device_map='auto' is not supported: .*on the CPU.*\.to\(device\)"),
    ({"low_cpu_mem_usage": "yes"}, r"low_cpu_mem_usage='yes' is not supported: .*on the CPU"),
    ({"ignore_mismatched_sizes": True}, r"ignore_mismatched_sizes=True is not supported: .*must fit"),
    ({"output_loading_info": True}, r"output_loading_info=True is not supported: .*strict"),
    ({"quantization_config": {"load_in_8bit": True}}, r"quantization_config=.* is not supported: quantised loading"),
])
def test_what_hetvae_cannot_do_is_refused_naming_the_argument(tmp_path, kwargs, expected):
    folder = _folder(tmp_path, {SAFE: 0})
    with pytest.raises(ValueError, match=expected) as error:
        AutoencoderKL.from_pretrained(folder, **kwargs)
    assert "unknown override" not in str(error.value)


@pytest.mark.parametrize("kwargs", [
    {"local_files_only": True}, {"local_files_only": False}, {"low_cpu_mem_usage": True},
    {"low_cpu_mem_usage": False}, {"revision": None, "token": None, "cache_dir": None, "force_download": False},
    {"token": "hf_x", "cache_dir": "/tmp/hub", "force_download": True},  # they concern Hub downloads only
    {"disable_mmap": False, "use_flashpack": False},
    {"device_map": None, "ignore_mismatched_sizes": False, "output_loading_info": False, "quantization_config": None},
])
def test_values_that_ask_for_what_hetvae_does_are_taken(tmp_path, kwargs):
    folder = _folder(tmp_path, {SAFE: 0})
    assert _same(AutoencoderKL.from_pretrained(folder, **kwargs), _model(0))


def test_a_misspelt_argument_still_lists_the_config_fields_and_the_diffusers_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['varient'\]: from_pretrained takes diffusers' subfolder, variant") as error:
        AutoencoderKL.from_pretrained(_folder(tmp_path, {SAFE: 0}), varient="fp16")
    assert "scaling_factor" in str(error.value)


# --- the same file as diffusers ------------------------------------------------------------------


def test_diffusers_reads_the_same_variant(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = _folder(tmp_path, {SAFE: 0, FP16: 1, BIN: 2, FP16_BIN: 3})
    for kwargs in ({}, {"variant": "fp16"}, {"use_safetensors": False}, {"variant": "fp16", "use_safetensors": False}):
        stock = diffusers.AutoencoderKL.from_pretrained(folder, **kwargs).state_dict()
        ours = ldm_to_diffusers(AutoencoderKL.from_pretrained(folder, **kwargs).state_dict())
        assert stock.keys() == ours.keys(), kwargs
        assert all(torch.equal(stock[k].float(), ours[k]) for k in stock), kwargs
