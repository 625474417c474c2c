"""``hetvae info`` and ``hetvae convert``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.convert import load_autoencoder

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def sd_file(tmp_path):
    """An original-layout SD VAE file inside a full checkpoint, as SD tools write it."""
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1)).eval()
    sd = {"first_stage_model." + k: v for k, v in model.state_dict().items()}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    file = tmp_path / "sd15.safetensors"
    save_file(sd, file)
    return file, model


def test_info_reports_format_config_parameters_and_head(sd_file, capsys):
    file, model = sd_file
    assert main(["info", str(file)]) == 0
    out = capsys.readouterr().out
    assert "format:      ldm (config inferred from tensor shapes)" in out
    assert "family:      sd (scaling_factor 0.18215, shift_factor 0.0)" in out
    assert f"parameters:  {sum(p.numel() for p in model.parameters()):,}" in out
    assert "log-scale head: no" in out
    assert "model.block_out_channels: [32, 64]" in out and "log_scale_granularity" not in out


def test_convert_grafts_a_head_and_exports_diffusers(sd_file, tmp_path, capsys, assert_matches_reference):
    file, model = sd_file
    dst = tmp_path / "vae-diffusers"
    assert main(["convert", str(file), "--to", "diffusers", "--set", "log_scale.granularity=pixel", "--set", "log_scale.init=-1", "--out", str(dst)]) == 0
    assert "with log-scale head" in capsys.readouterr().out
    stock = diffusers.AutoencoderKL.from_pretrained(dst).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_matches_reference(lambda m, x: m(x)[0].mean, model, lambda r, x: r(x).sample, stock, x)
    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["log_scale_head"] is True
    assert info["head_file"].endswith("log_scale_head.safetensors")
    assert info["config"]["log_scale_init"] == -1.0


def test_convert_round_trip_hetvae_then_ldm_is_identical(sd_file, tmp_path):
    file, model = sd_file
    assert main(["convert", str(file), "--to", "hetvae", "--set", "model.scaling_factor=0.13025", "--out", str(tmp_path / "h")]) == 0
    assert main(["convert", str(tmp_path / "h"), "--to", "ldm", "--out", str(tmp_path / "vae.safetensors")]) == 0
    back = load_autoencoder(tmp_path / "vae.safetensors")
    assert back.config.scaling_factor == 0.13025
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_cli_errors_go_to_stderr_with_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 10)
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "broken.safetensors" in err and "truncated or corrupt" in err
    assert main(["convert", str(bad), "--to", "diffusers", "--out", str(tmp_path / "out")]) == 1
    assert "broken.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
