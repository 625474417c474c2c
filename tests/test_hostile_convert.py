"""Issue 13 ("Nothing lost, nothing silently wrong"), the checkpoint half: convert / info / exports.

Each test names the issue item it pins down. Tiny models only (32/64 channels, 32 px images).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hetvae.convert as convert
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.cli import main
from hetvae.config import load_config
from hetvae.convert import (
    config_from_diffusers,
    config_to_diffusers,
    inspect_checkpoint,
    load_autoencoder,
    save_autoencoder,
)
from hetvae.files import CheckpointError
from hetvae.evaluate import evaluate
from hetvae.predictor import load_predictor
from hetvae.loss import HeteroscedasticNLL

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)


def tiny_model(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def with_head(seed: int = 0) -> AutoencoderKL:
    model = tiny_model(seed)
    model.add_log_scale_head(init=-1.0)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.05)
    return model


def images(n: int = 2, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(n)]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- item 7: convert into an existing model folder --------------------------------------------


def test_item7_convert_refuses_an_existing_model_folder_and_keeps_its_head(tmp_path, capsys):
    src = tmp_path / "plain"
    tiny_model(seed=1).save_pretrained(src)
    dst = tmp_path / "export"
    with_head().save_pretrained(dst, format="diffusers")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert "log_scale_head.safetensors" in before

    assert main(["convert", str(src), "--to", "diffusers", "--out", str(dst)]) == 1
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err and "log_scale_head.safetensors" in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # nothing written, nothing deleted

    # asked explicitly: the model is replaced, its stale head with it
    assert main(["convert", str(src), "--to", "diffusers", "--overwrite", "--out", str(dst)]) == 0
    assert not (dst / "log_scale_head.safetensors").exists()
    assert tensors_equal(load_autoencoder(dst).state_dict(), load_autoencoder(src).state_dict())


def test_item7_an_export_that_another_model_in_the_folder_would_shadow_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_model().save_pretrained(run)  # run/model.safetensors: what load_autoencoder(run) reads first
    for flags in ([], ["--overwrite"]):
        assert main(["convert", str(run), "--to", "ldm", "--out", str(run), *flags]) == 1
        err = capsys.readouterr().err
        assert "model.safetensors" in err and "instead" in err
    assert not (run / "vae.safetensors").exists()


def test_item7_save_pretrained_writes_atomically_and_leaves_no_temporary_files(tmp_path):
    model = with_head()
    for fmt in ("hetvae", "diffusers", "ldm"):
        save_autoencoder(model, tmp_path / fmt, format=fmt)
        save_autoencoder(model, tmp_path / fmt, format=fmt)  # the API default replaces
        assert not [p.name for p in (tmp_path / fmt).iterdir() if p.name.startswith(".")]
    with pytest.raises(FileExistsError, match=r"already holds.*overwrite=True"):
        save_autoencoder(model, tmp_path / "ldm", format="ldm", overwrite=False)


# --- item 11: the likelihood travels with every export -----------------------------------------


TRAIN = [
    "model.block_out_channels=[16, 32]", "model.latent_channels=4", "model.norm_num_groups=8",
    "data.resolution=32", "data.samples_per_epoch=8", "train.steps=2", "train.final_steps=0", "train.batch_size=2",
    "train.warmup_steps=0", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
    "train.log_scale_lr=0.5", "train.head_steps=0",
]


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    """A 2-step run with a Gaussian likelihood, per-channel learned scales and non-default bounds."""
    from hetvae.train import train

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        TRAIN + ["log_scale.granularity=channel", "log_scale.family=gaussian", "log_scale.bounds=[-6.0, 2.5]",
                 f"out_dir={root / 'run'}"],
    )
    train(cfg, progress=False)
    return root / "run"


@pytest.mark.parametrize("fmt", ["hetvae", "diffusers", "ldm"])
def test_item11_eval_of_an_export_equals_eval_of_the_run(gaussian_run, tmp_path, fmt):
    want = evaluate(load_predictor(gaussian_run), images())
    learned = load_file(gaussian_run / "loss.safetensors")["head.free"]
    assert learned.abs().min() > 0  # the scales moved: a default-built likelihood would differ
    assert main(["convert", str(gaussian_run), "--to", fmt, "--out", str(tmp_path / fmt)]) == 0
    predictor = load_predictor(tmp_path / fmt)
    assert (predictor.family, predictor.granularity) == ("gaussian", "channel")
    assert predictor.nll.head.bounds == (-6.0, 2.5) and predictor.nll.head.fit == "learned"
    assert torch.equal(predictor.nll.head.free.detach(), learned)
    assert evaluate(predictor, images()) == want


@pytest.mark.parametrize("granularity", ["global", "channel", "pixel"])
@pytest.mark.parametrize("fmt", ["hetvae", "diffusers", "ldm"])
def test_item11_every_granularity_round_trips_through_every_format(tmp_path, granularity, fmt):
    model = with_head() if granularity == "pixel" else tiny_model()
    nll = HeteroscedasticNLL(granularity, family="gaussian", init=-0.5, bounds=(-5.0, 2.0))
    if granularity != "pixel":
        with torch.no_grad():
            nll.head.free.copy_(torch.linspace(-0.3, 0.2, nll.head.free.numel()).view_as(nll.head.free))
    save_autoencoder(model, tmp_path / "m", format=fmt, likelihood=nll)
    predictor = load_predictor(tmp_path / "m")
    assert (predictor.family, predictor.granularity) == ("gaussian", granularity)
    x = images(1)[0][None]
    with torch.no_grad():
        rec, _ = model(x)
        want = nll.log_scale(x, rec.mean, rec.log_scale)
    assert torch.allclose(predictor.predict(x).log_scale, torch.broadcast_to(want, x.shape), atol=1e-6)


def test_item11_a_per_pixel_likelihood_without_its_head_file_is_a_clear_error(tmp_path):
    nll = HeteroscedasticNLL("pixel", family="gaussian", init=-1.0)
    written = save_autoencoder(with_head(), tmp_path / "out", format="ldm", likelihood=nll)
    (tmp_path / "out" / "vae.log_scale_head.safetensors").unlink()
    assert load_autoencoder(written).config.likelihood.granularity == "pixel"  # the VAE alone still loads
    with pytest.raises(ValueError, match=r"per-pixel.*no log-scale head.*vae\.log_scale_head\.safetensors"):
        load_predictor(written)


def test_item11_the_likelihood_is_shown_by_info(tmp_path, capsys):
    nll = HeteroscedasticNLL("global", family="gaussian", init=-2.0)
    save_autoencoder(tiny_model(), tmp_path / "m", likelihood=nll)
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "likelihood:  gaussian, global" in out


def test_item11_a_truncated_loss_file_is_a_clear_error(gaussian_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gaussian_run, run)
    data = (run / "loss.safetensors").read_bytes()
    (run / "loss.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"loss\.safetensors.*truncated or corrupt"):
        load_predictor(run)


# --- item 12: the diffusers config round trip --------------------------------------------------


def test_item12_diffusers_config_round_trip_keeps_what_was_read(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import importlib.metadata

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
        sample_size=256, force_upcast=False, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 1.5],
    )
    ref.save_pretrained(tmp_path / "src")
    load_autoencoder(tmp_path / "src").save_pretrained(tmp_path / "dst", format="diffusers")
    src = json.loads((tmp_path / "src" / "config.json").read_text())
    dst = json.loads((tmp_path / "dst" / "config.json").read_text())
    for key in ("sample_size", "force_upcast", "latents_mean", "latents_std", "scaling_factor", "shift_factor"):
        assert dst[key] == src[key], key
    assert dst["_diffusers_version"] == importlib.metadata.version("diffusers")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "dst")
    assert again.config.latents_mean == [0.1, -0.2, 0.3, 0.0] and again.config.force_upcast is False


_CHANNELS = st.sampled_from([(32,), (32, 64), (64, 64, 128)])
_FLOATS = st.floats(-4, 4, allow_nan=False, width=32)


@given(
    channels=_CHANNELS,
    latent=st.sampled_from([4, 16]),
    quant=st.booleans(),
    sample_size=st.sampled_from([32, 256, 512, 1024]),
    upcast=st.booleans(),
    stats=st.booleans(),
    scaling=st.floats(0.01, 4, allow_nan=False),
    shift=_FLOATS,
)
def test_item12_property_config_to_diffusers_and_back_is_the_identity(
    channels, latent, quant, sample_size, upcast, stats, scaling, shift
):
    from hetvae.likelihood import Likelihood

    config = AutoencoderConfig(
        block_out_channels=channels, latent_channels=latent, use_quant_conv=quant, use_post_quant_conv=quant,
        sample_size=sample_size, force_upcast=upcast, scaling_factor=scaling, shift_factor=shift,
        latents_mean=tuple(0.1 * i for i in range(latent)) if stats else None,
        latents_std=tuple(1.0 + i for i in range(latent)) if stats else None,
        likelihood=Likelihood(granularity="channel", family="gaussian", free=(0.5, -0.25, 0.125)),
    )
    text = json.dumps(config_to_diffusers(config))
    assert config_from_diffusers(json.loads(text), Path("config.json")) == config


# --- item 13: an ldm export reads back ---------------------------------------------------------


def test_item13_an_ldm_export_folder_reads_back_everywhere(tmp_path, capsys):
    src = tmp_path / "m"
    with_head().save_pretrained(src)
    assert main(["convert", str(src), "--to", "ldm", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "out")]) == 0
    assert "format:      ldm" in capsys.readouterr().out
    info = inspect_checkpoint(tmp_path / "out")
    assert info.weights_file.name == "vae.safetensors" and info.has_log_scale_head
    assert load_predictor(tmp_path / "out").granularity == "pixel"
    assert tensors_equal(load_autoencoder(tmp_path / "out").state_dict(), load_autoencoder(src).state_dict())


# --- item 18: declared shapes are checked before anything is allocated -------------------------


def test_item18_a_huge_declared_architecture_is_refused_before_allocating(tmp_path, monkeypatch):
    model = tiny_model()
    declared = dict(model.config.to_dict(), block_out_channels=[1024, 2048])  # same keys as (32, 64)
    file = tmp_path / "lying.safetensors"
    save_file(model.state_dict(), file, metadata={"hetvae_config": json.dumps(declared), "hetvae_format": "hetvae"})

    real = convert.AutoencoderKL

    def guarded(config):
        on_meta = torch.empty(0).device.type == "meta"
        assert on_meta or config.block_out_channels[0] < 1024, "allocated the declared architecture"
        return real(config)

    monkeypatch.setattr(convert, "AutoencoderKL", guarded)
    with pytest.raises(CheckpointError, match=r"lying\.safetensors: shape mismatch \(config file metadata\).*!= model \(1024, 3, 3, 3\)"):
        load_autoencoder(file)


# --- item 10 (this half): where the latent scaling came from ------------------------------------


def test_item10_info_says_where_scaling_and_shift_came_from(tmp_path, capsys):
    model = tiny_model()
    save_file(model.state_dict(), tmp_path / "sd.safetensors")
    assert main(["info", str(tmp_path / "sd.safetensors")]) == 0
    assert "latent scaling: inferred from the family 'sd'" in capsys.readouterr().out

    model.save_pretrained(tmp_path / "d", format="diffusers")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    del cfg["scaling_factor"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(tmp_path / "d"), "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["scaling_source"]
    assert sources == {"scaling_factor": "default (absent from config.json)", "shift_factor": "config.json"}

    model.save_pretrained(tmp_path / "h")
    assert main(["info", str(tmp_path / "h")]) == 0
    assert "latent scaling: file metadata" in capsys.readouterr().out


# --- clear errors instead of tracebacks --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("block_out_channels", "abc", "a list of positive integers"),
        ("latent_channels", "4", "a positive integer"),
        ("use_quant_conv", "yes", "true or false"),
        ("scaling_factor", "big", "a number"),
        ("latents_mean", [0.0], "4 numbers"),
    ],
)
def test_bad_types_in_a_diffusers_config_are_named(tmp_path, key, value, expected):
    tiny_model().save_pretrained(tmp_path, format="diffusers")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{key}.*{expected}.*\[detected format: diffusers\]"):
        load_autoencoder(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("norm_num_groups", 0, r"norm_num_groups must be a positive integer, got 0"),
        ("norm_num_groups", 7, r"norm_num_groups=7 must divide every entry of block_out_channels \(32, 64\)"),
        ("latent_channels", "4", r"latent_channels must be a positive integer, got '4'"),
        ("block_out_channels", "64", r"block_out_channels must be a list of positive integers, got '64'"),
    ],
)
def test_bad_values_in_hetvae_metadata_are_named(tmp_path, field, value, message):
    model = tiny_model()
    declared = dict(model.config.to_dict(), **{field: value})
    file = tmp_path / "m.safetensors"
    save_file(model.state_dict(), file, metadata={"hetvae_config": json.dumps(declared), "hetvae_format": "hetvae"})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: the embedded hetvae_config metadata is not a valid config.*" + message):
        load_autoencoder(file)


def _corrupt_zip_pickle(file: Path) -> None:
    """Flip bytes inside the pickle of a torch zip checkpoint, as a bad disk or download would."""
    data = bytearray(file.read_bytes())
    with zipfile.ZipFile(file) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for offset in range(40, info.compress_size, 17):
        data[start + offset] ^= 0x5A
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "flipped"])
def test_a_corrupt_ckpt_is_reported_as_corrupt_not_as_code(tmp_path, damage):
    file = tmp_path / "vae.ckpt"
    if damage == "garbage":
        file.write_bytes(b"garbage" * 100)
    else:
        torch.save(tiny_model().state_dict(), file)
        _corrupt_zip_pickle(file)
    with pytest.raises(CheckpointError) as caught:
        load_autoencoder(file)
    message = str(caught.value)
    assert "vae.ckpt" in message and "corrupt" in message and "could run code" not in message


def test_a_pickle_with_code_is_still_refused_as_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "cb": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to unpickle.*'builtins\.print'.*could run code"):
        load_autoencoder(tmp_path / "evil.ckpt")


def test_head_keys_without_a_pixel_granularity_name_the_keys(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "m")
    out = str(tmp_path / "out")
    assert main(["convert", str(tmp_path / "m"), "--to", "hetvae", "--set", "log_scale.init=-1", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "log_scale.init" in err and "--set log_scale.granularity=pixel" in err and "log_scale_init" not in err
    assert not (tmp_path / "out").exists()


def test_the_exported_metadata_is_readable_by_stock_safetensors(tmp_path):
    nll = HeteroscedasticNLL("global", family="gaussian", init=-1.0)
    written = save_autoencoder(tiny_model(), tmp_path / "vae.safetensors", format="ldm", likelihood=nll)
    with safe_open(str(written), framework="pt") as f:
        config = json.loads(f.metadata()["hetvae_config"])
    assert config["likelihood"]["family"] == "gaussian" and config["likelihood"]["granularity"] == "global"
