"""train.head_only (configs/sd-head.yaml): a per-pixel head trained on a frozen VAE, its head file with the
base model recorded, and that file joined to its base for scoring and calibration."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import hetvae
from hetvae import AutoencoderConfig, AutoencoderKL
from hetvae.attach import (
    base_fingerprint,
    is_head_file,
    load_with_head,
    read_head_file,
    save_log_scale_head,
)
from hetvae.autoencoder import log_scale_layers
from hetvae.config import ConfigError, load_config
from hetvae.convert import is_head_key
from hetvae.files import CheckpointError
from hetvae.predictor import calibrate, load_predictor, store_calibration
from hetvae.train import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sd-head.yaml"
TINY = {"block_out_channels": (16, 32), "norm_num_groups": 8, "layers_per_block": 1, "latent_channels": 4}


def base_model(tmp_path: Path, name: str = "base", seed: int = 0, **arch) -> Path:
    """A small random VAE exported in diffusers' format: the 'stock' VAE a head is trained for."""
    torch.manual_seed(seed)
    folder = tmp_path / name
    AutoencoderKL(AutoencoderConfig(**{**TINY, **arch})).save_pretrained(folder, format="diffusers")
    return folder


def head_only_config(base: Path, out: Path, *extra: str):
    return load_config(CONFIG, [
        f"model.init_from={base}", "data.path=null", "data.resolution=16", "data.num_workers=0",
        "train.steps=3", "train.batch_size=2", "train.warmup_steps=0", "train.log_every=1",
        "train.sample_every=0", "train.checkpoint_every=0", f"out_dir={out}",
        "log_scale.head_channels=8", *extra,
    ])


def images(n: int = 2, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("head")
    base = base_model(tmp_path)
    trainer = Trainer(head_only_config(base, tmp_path / "run"), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    return tmp_path, base, trainer, before, result


def test_sd_head_config_is_head_only_and_stands_alone():
    cfg = load_config(CONFIG)
    assert cfg.train.head_only and cfg.log_scale.granularity == "pixel"
    assert cfg.model.init_from != "scratch" and cfg.train.ema_decay is None
    assert cfg.objective.perceptual_weight == 0 and cfg.objective.disc_start is None
    d = cfg.data
    assert (d.rescale, d.color_jitter, d.tint_gray, d.procedural, d.num_workers) == (None, 0.0, 0.0, 0.0, "auto")
    assert cfg.train.final_steps == 0


@pytest.mark.parametrize("override, key", [
    ("model.init_from=scratch", "model.init_from"),
    ("log_scale.granularity=global", "log_scale.granularity"),
    ("objective.perceptual_weight=1.0", "objective.perceptual_weight"),
    ("objective.disc_start=0", "objective.disc_start"),
    ("train.ema_decay=0.999", "train.ema_decay"),
])
def test_head_only_refuses_what_would_train_or_average_the_vae(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [override])
    assert info.value.key == key and "head_only" in str(info.value)


def test_only_the_head_trains_and_the_vae_stays_bit_identical(trained):
    _, base, trainer, before, result = trained
    head = {k for k in before if is_head_key(k)}
    assert head and trainer.ema is None and trainer.discriminator is None
    # the optimiser holds the head's parameters and nothing else, and state only for them
    optimised = {id(p) for g in trainer.g_opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {names[i] for i in optimised} == {k for k in head}
    assert set(map(id, trainer.g_opt.state)) <= optimised
    assert not any(p.requires_grad for p in trainer.objective.nll.parameters())
    after = trainer.model.state_dict()
    for k, v in before.items():
        if k in head:
            continue
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], before[k]) for k in head), "the head must have trained"
    # the exported run model and the stock base reconstruct bit for bit alike
    stock = hetvae.load_autoencoder(base).eval()
    exported = hetvae.load_autoencoder(result.model_file).eval()
    x = images()
    with torch.no_grad():
        want = stock(x, sample_posterior=False)[0].mean
        got = exported(x, sample_posterior=False)[0]
    assert torch.equal(got.mean, want)
    assert got.log_scale is not None and got.log_scale.std() > 0
    for k, v in stock.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k


def test_head_file_is_small_records_its_base_and_attaches_to_the_stock_vae(trained):
    diffusers = pytest.importorskip("diffusers")
    tmp_path, base, trainer, _, result = trained
    file = result.run_dir / "log_scale_head.safetensors"
    assert is_head_file(file) and not is_head_file(result.model_file)
    head = read_head_file(file)
    assert set(head.tensors) == {k for k in trainer.model.state_dict() if is_head_key(k)}
    assert head.base["model"] == str(base) and head.base["sha256"] == base_fingerprint(hetvae.load_autoencoder(base))
    assert head.base["architecture"]["block_out_channels"] == [16, 32]
    assert head.likelihood.granularity == "pixel" and head.likelihood.calibration is None
    assert file.stat().st_size < result.model_file.stat().st_size / 5
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(file.read_bytes()[:100])
    assert not is_head_file(damaged)  # its loader names what is wrong with it
    # the stock diffusers VAE with the head: its own image, hetvae's map of the run's model
    vae = diffusers.AutoencoderKL.from_pretrained(base).eval()
    dec = hetvae.attach_log_scale_head(vae, file)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = load_predictor(result.run_dir)
    with torch.no_grad():
        out = dec.decode(z)
        ref = run.model.decode(z)
    assert torch.equal(out.sample, vae.decode(z).sample)
    torch.testing.assert_close(out.log_scale, run.nll.log_scale(ref.mean, ref.mean, ref.log_scale), rtol=0, atol=1e-5)
    # a stock VAE of another architecture: the error names its conv_out and the architecture recorded
    wide = diffusers.AutoencoderKL.from_pretrained(base_model(tmp_path, "wide-stock", block_out_channels=(24, 32)))
    with pytest.raises(CheckpointError) as info:
        hetvae.attach_log_scale_head(wide, file)
    assert "reads 24 features" in str(info.value) and "block_out_channels (16, 32)" in str(info.value)


def test_head_file_with_its_base_predicts_as_the_run_and_calibrates_in_place(trained):
    tmp_path, base, _, _, result = trained
    file = result.run_dir / "log_scale_head.safetensors"
    joined, run = load_predictor(file), load_predictor(result.run_dir)
    x = images(1)[0]
    a, b = joined.predict(x), run.predict(x)
    assert torch.equal(a.mean, b.mean)
    torch.testing.assert_close(a.log_scale, b.log_scale, rtol=0, atol=1e-6)
    base_bytes = {p.name: p.read_bytes() for p in base.iterdir()}
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(file.read_bytes())
    predictor = load_predictor(copy)
    cal = calibrate(predictor, list(images(4, 64)), method="affine")
    store_calibration(predictor, cal, copy)
    assert read_head_file(copy).likelihood.calibration == cal.to_dict()
    again = load_predictor(copy)
    assert again.calibration is not None and torch.equal(again.calibration.slope, cal.slope)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == base_bytes  # the base is never touched
    assert set(read_head_file(copy).tensors) == set(read_head_file(file).tensors)


def test_head_file_base_given_missing_or_other(trained, tmp_path):
    _, base, trainer, _, result = trained
    lone = tmp_path / "lone.safetensors"
    save_log_scale_head(trainer.model, lone)  # no base recorded
    with pytest.raises(ValueError, match="records no base model"):
        load_with_head(lone)
    assert torch.equal(load_with_head(lone, base=base).decoder.log_scale_head.weight,
                       trainer.model.decoder.log_scale_head.weight)
    with pytest.raises(ValueError, match="not a head file"):
        load_predictor(result.run_dir, base=base)
    # same architecture, other weights: it loads, with a warning
    other = base_model(tmp_path, "other", seed=5)
    with pytest.warns(UserWarning, match="not the VAE the head was trained on"):
        load_with_head(result.run_dir / "log_scale_head.safetensors", base=other)
    # another architecture: an error naming both
    wide = base_model(tmp_path, "wide", block_out_channels=(24, 32))
    with pytest.raises(CheckpointError) as info:
        load_with_head(result.run_dir / "log_scale_head.safetensors", base=wide)
    text = str(info.value)
    assert "block_out_channels (16, 32)" in text and "block_out_channels (24, 32)" in text
    assert "(3, 16, 3, 3)" in text and "(3, 24, 3, 3)" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_with_head(result.run_dir / "log_scale_head.safetensors")  # its own base: no warning


def test_sd1_head_size_closed_form():
    # SD 1.x's decoder: 128 features at full resolution, 3 out channels, 4 latent channels; sd-head.yaml's
    # head reads features + mean + latent + edges through 2 hidden 3x3 layers of 32
    cfg = load_config(CONFIG)
    inputs = 128 + 3 + 4 + 3
    trunk, out = log_scale_layers(inputs, 3, cfg.log_scale.head_layers, cfg.log_scale.head_channels)
    n = sum(p.numel() for m in (trunk, out) for p in m.parameters())
    assert n == (inputs * 32 * 9 + 32) + (32 * 32 * 9 + 32) + (32 * 3 * 9 + 3) == 49891


def test_the_commands_take_a_head_file_and_base(trained, tmp_path, capsys):
    """`hetvae eval HEAD_FILE [--base BASE]` scores the head joined to its base; --base on anything but
    a head file is refused naming it."""
    import json

    from PIL import Image

    from hetvae.cli import main

    _, base, _, _, result = trained
    file = result.run_dir / "log_scale_head.safetensors"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, x in enumerate(images(2, 32)):
        Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(photos / f"p{i}.png")
    scores = []
    for extra in ([], ["--base", str(base)]):
        assert main(["eval", str(file), *extra, "--images", str(photos), "--json", "--device", "cpu"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert main(["eval", str(result.run_dir), "--images", str(photos), "--json", "--device", "cpu"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert scores[0]["nll_bpd"] == scores[1]["nll_bpd"] == pytest.approx(run["nll_bpd"], abs=1e-5)
    assert main(["eval", str(result.run_dir), "--base", str(base), "--images", str(photos)]) == 1
    assert "not a head file" in capsys.readouterr().err
