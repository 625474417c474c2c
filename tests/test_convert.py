"""Checkpoint formats: parity with diffusers, original-layout single files, hetvae files, exports,
head sidecars, config inference, and every error message."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.convert import inspect_checkpoint, load_autoencoder, save_autoencoder
from hetvae.files import CheckpointError

diffusers = pytest.importorskip("diffusers")


def diffusers_vae(*, latent: int = 4, quant: bool = True, attention: bool = True, groups: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=groups,
        latent_channels=latent,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        mid_block_add_attention=attention,
    ).eval()
    # Non-trivial norms and biases, so a swapped or dropped tensor shows in the outputs.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def tiny_model(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    model = AutoencoderKL(AutoencoderConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def reconstruct(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return model(x)[0].mean


def diffusers_reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    return vae(x).sample


def same_outputs(a: AutoencoderKL, b: AutoencoderKL, x: torch.Tensor, exact: bool = True) -> None:
    with torch.no_grad():
        ra, pa = a(x)
        rb, pb = b(x)
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=0, atol=1e-6))
    assert check(pa.mean, pb.mean) and check(pa.logvar, pb.logvar) and check(ra.mean, rb.mean)
    assert (ra.log_scale is None) == (rb.log_scale is None)
    if ra.log_scale is not None:
        assert check(ra.log_scale, rb.log_scale)


# --- diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latent", "quant", "attention"),
    [(4, True, True), (4, True, False), (16, False, True), (16, False, False)],
)
def test_parity_with_diffusers_after_loading_its_folder(tmp_path, latent, quant, attention, assert_matches_reference):
    ref = diffusers_vae(latent=latent, quant=quant, attention=attention)
    ref.save_pretrained(tmp_path)
    model = load_autoencoder(tmp_path)
    assert model.config.latent_channels == latent and model.config.use_quant_conv == quant
    assert model.config.mid_block_attention == attention and model.config.norm_num_groups == 8
    x = images()
    z = torch.randn(2, latent, 16, 16, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(lambda m, x: m.encode(x).mean, model, lambda r, x: r.encode(x).latent_dist.mean, ref, x)
    assert_matches_reference(
        lambda m, x: m.encode(x).logvar, model, lambda r, x: r.encode(x).latent_dist.logvar, ref, x
    )
    assert_matches_reference(lambda m, z: m.decode(z).mean, model, lambda r, z: r.decode(z).sample, ref, z)


def test_diffusers_round_trip_through_hetvae_is_identical(tmp_path):
    ref = diffusers_vae(latent=16, quant=False)
    ref.save_pretrained(tmp_path / "src")
    load_autoencoder(tmp_path / "src").save_pretrained(tmp_path / "dst", format="diffusers")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "dst").eval()
    want, got = ref.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = images()
    with torch.no_grad():
        assert torch.equal(again(x).sample, ref(x).sample)
    assert again.config.scaling_factor == ref.config.scaling_factor


def test_diffusers_bin_fp16_variant_and_pipeline_folder(tmp_path, assert_matches_reference):
    ref = diffusers_vae()
    x = images()
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert inspect_checkpoint(tmp_path / "bin").weights_file.name == "diffusion_pytorch_model.bin"
    assert_matches_reference(reconstruct, load_autoencoder(tmp_path / "bin"), diffusers_reconstruct, ref, x)
    # fp16 weights in a pipeline folder's vae/: loaded into a float32 model.
    ref.half().save_pretrained(tmp_path / "pipe" / "vae", variant="fp16")
    info = inspect_checkpoint(tmp_path / "pipe")
    assert info.weights_file.name == "diffusion_pytorch_model.fp16.safetensors" and info.format == "diffusers"
    from_fp16 = load_autoencoder(tmp_path / "pipe")
    assert from_fp16.decoder.conv_out.weight.dtype == torch.float32
    assert_matches_reference(reconstruct, from_fp16, diffusers_reconstruct, ref.float(), x)


def test_old_diffusers_attention_names_in_a_single_file(tmp_path, assert_matches_reference):
    ref = diffusers_vae(groups=32)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, name in old.items():
            k = k.replace(f".{new}.", f".{name}.")
        sd["vae." + k] = v.contiguous()
    save_file(sd, tmp_path / "old.safetensors")
    model = load_autoencoder(tmp_path / "old.safetensors")
    assert inspect_checkpoint(tmp_path / "old.safetensors").format == "diffusers-file"
    assert_matches_reference(reconstruct, model, diffusers_reconstruct, ref, images())


# --- original SD single files ------------------------------------------------------------------


def full_sd_checkpoint(model: AutoencoderKL, linear_attention: bool = False) -> dict[str, torch.Tensor]:
    sd = {"first_stage_model." + k: v.clone() for k, v in model.state_dict().items()}
    if linear_attention:
        sd = {k: v[:, :, 0, 0] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight", k) else v for k, v in sd.items()}
    # The rest of an SD checkpoint, which the loader must leave alone.
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    return sd


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("linear_attention", [False, True])
def test_original_sd_single_file_loads_strictly(tmp_path, suffix, linear_attention):
    model = tiny_model()
    sd = full_sd_checkpoint(model, linear_attention)
    file = tmp_path / f"sd-v1{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 840000}, file)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, file)
    info = inspect_checkpoint(file)
    assert info.format == "ldm" and info.config_source == "inferred from tensor shapes" and info.family == "sd"
    assert info.config == model.config  # channels, layers, groups=32, quant convs, attention, 0.18215
    loaded = load_autoencoder(file)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    same_outputs(loaded, model, images())


def test_inference_defaults_and_overrides(tmp_path):
    model = tiny_model(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, mid_block_attention=False)
    save_file(model.state_dict(), tmp_path / "sd3.safetensors")
    info = inspect_checkpoint(tmp_path / "sd3.safetensors")
    assert info.family == "sd3" and (info.config.scaling_factor, info.config.shift_factor) == (1.5305, 0.0609)
    assert not info.config.mid_block_attention and not info.config.use_quant_conv
    flux = load_autoencoder(tmp_path / "sd3.safetensors", scaling_factor=0.3611, shift_factor=0.1159)
    assert (flux.config.scaling_factor, flux.config.shift_factor) == (0.3611, 0.1159)
    # GroupNorm's group count is invisible in the weights: 32 assumed, overridable.
    narrow = tiny_model(norm_num_groups=8)
    save_file(narrow.state_dict(), tmp_path / "g8.safetensors")
    assert inspect_checkpoint(tmp_path / "g8.safetensors").config.norm_num_groups == 32
    same_outputs(load_autoencoder(tmp_path / "g8.safetensors", norm_num_groups=8), narrow, images())


# --- hetvae files, exports, the head -----------------------------------------------------------


def with_trained_head(channels: int | None = None) -> AutoencoderKL:
    model = tiny_model()
    model.add_log_scale_head(channels=channels, init=-1.0, detach=True)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.05)
    return model


@pytest.mark.parametrize("channels", [None, 1])
def test_hetvae_checkpoint_round_trip(tmp_path, channels):
    model = with_trained_head(channels)
    written = model.save_pretrained(tmp_path / "ckpt")
    assert written == tmp_path / "ckpt" / "model.safetensors"
    for path in (tmp_path / "ckpt", written):
        loaded = load_autoencoder(path)
        assert loaded.config == model.config
        same_outputs(loaded, model, images())
    info = inspect_checkpoint(tmp_path / "ckpt")
    assert info.format == "hetvae" and info.config_source == "file metadata" and info.has_log_scale_head


def test_diffusers_export_keeps_the_head_beside_and_stock_diffusers_loads_it(tmp_path, assert_matches_reference):
    model = with_trained_head()
    model.save_pretrained(tmp_path / "d", format="diffusers")
    assert (tmp_path / "d" / "log_scale_head.safetensors").is_file()
    stock = diffusers.AutoencoderKL.from_pretrained(tmp_path / "d").eval()
    x = images()
    assert_matches_reference(reconstruct, model, diffusers_reconstruct, stock, x)
    back = load_autoencoder(tmp_path / "d")
    assert inspect_checkpoint(tmp_path / "d").head_file == tmp_path / "d" / "log_scale_head.safetensors"
    assert back.config == model.config
    same_outputs(back, model, x, exact=False)


def test_ldm_export_is_original_layout_plus_head_file(tmp_path):
    model = with_trained_head()
    written = save_autoencoder(model, tmp_path / "out", format="ldm")
    assert written == tmp_path / "out" / "vae.safetensors"
    keys = load_file(written).keys()
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.up.1.upsample.conv.weight" in keys
    assert load_file(written)["encoder.mid.attn_1.q.weight"].ndim == 4
    assert not any("log_scale_head" in k for k in keys)
    assert (tmp_path / "out" / "vae.log_scale_head.safetensors").is_file()
    back = load_autoencoder(written)
    assert inspect_checkpoint(written).format == "ldm" and back.config == model.config
    same_outputs(back, model, images())
    # Exporting again without a head removes the stale head file.
    save_autoencoder(tiny_model(), written, format="ldm")
    assert not (tmp_path / "out" / "vae.log_scale_head.safetensors").exists()


def test_grafting_a_head_onto_a_pretrained_vae_on_disk(tmp_path):
    diffusers_vae().save_pretrained(tmp_path)
    plain = load_autoencoder(tmp_path)
    grafted = load_autoencoder(tmp_path, log_scale="pixel", log_scale_init=-2.0, log_scale_channels=1)
    x = images()
    with torch.no_grad():
        a, b = plain(x)[0], grafted(x)[0]
    assert torch.equal(a.mean, b.mean)
    assert b.log_scale.shape == (2, 1, 32, 32) and torch.all(b.log_scale == -2.0)


def test_head_settings_conflicting_with_a_stored_head_are_refused(tmp_path):
    with_trained_head().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"already has a trained log-scale head \(3 maps\)"):
        load_autoencoder(tmp_path, log_scale_channels=1)
    assert load_autoencoder(tmp_path, log_scale_detach=False).decoder.log_scale_detach is False
    tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"\['log_scale_init'\] given but no head is loaded or grafted"):
        load_autoencoder(tmp_path / "plain", log_scale_init=1.0)


@pytest.mark.parametrize("sees_latent, sees_edges", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("fmt", ["hetvae", "diffusers", "ldm"])
def test_deep_head_that_reads_the_mean_round_trips_through_every_format(tmp_path, fmt, sees_latent, sees_edges):
    model = tiny_model()
    model.add_log_scale_head(init=-2.0, layers=2, hidden=8, sees_mean=True, sees_latent=sees_latent, sees_edges=sees_edges)
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(std=0.05)
    written = save_autoencoder(model, tmp_path / fmt, format=fmt)
    head_keys = {k for k in model.state_dict() if "log_scale" in k}
    assert {"decoder.log_scale_trunk.0.weight", "decoder.log_scale_trunk.2.bias"} <= head_keys
    if fmt != "hetvae":  # the body stays the stock layout, the whole head goes beside it
        sidecar = tmp_path / fmt / ("log_scale_head.safetensors" if fmt == "diffusers" else "vae.log_scale_head.safetensors")
        assert set(load_file(sidecar)) == head_keys
    back = load_autoencoder(written)
    assert back.config == model.config
    assert back.config.log_scale_head_layers == 2 and back.config.log_scale_head_sees_mean
    assert back.config.log_scale_head_sees_latent is sees_latent
    assert back.config.log_scale_head_sees_edges is sees_edges
    same_outputs(back, model, images(), exact=fmt != "diffusers")


def test_head_inputs_read_off_the_shapes_and_the_recorded_settings():
    """head_fields: the first layer's width tells what the head reads (features + mean 3 + latent L);
    where a latent has as many channels as the image the recorded settings decide, and without them
    the older option (the mean) is assumed; a width no combination gives is refused by name."""
    from hetvae.convert import head_fields

    def state(first_in, latent=4):
        return {"decoder.conv_out.weight": torch.zeros(3, 32, 3, 3), "decoder.conv_in.weight": torch.zeros(64, latent, 3, 3),
                "decoder.log_scale_trunk.0.weight": torch.zeros(8, first_in, 3, 3),
                "decoder.log_scale_head.weight": torch.zeros(3, 8, 3, 3)}

    def reads(first_in, latent=4, settings=None):
        f = head_fields(state(first_in, latent), settings)
        return f["log_scale_head_sees_mean"], f["log_scale_head_sees_latent"]

    assert reads(32) == (False, False) and reads(35) == (True, False)
    assert reads(36) == (False, True) and reads(39) == (True, True)
    assert reads(35, latent=3) == (True, False)  # 3 latent channels: mean or latent, the older option
    assert reads(35, latent=3, settings={"sees_mean": False, "sees_latent": True}) == (False, True)
    with pytest.raises(ValueError, match=r"log_scale_trunk\.0\.weight takes 37 input channels; expected 32"):
        reads(37)
    with pytest.raises(ValueError, match="recorded"):
        reads(35, settings={"sees_latent": True})
    # the edges add as many channels as the mean: recorded, or the mean is assumed
    def reads_edges(first_in, settings=None):
        f = head_fields(state(first_in), settings)
        return f["log_scale_head_sees_mean"], f["log_scale_head_sees_latent"], f["log_scale_head_sees_edges"]

    assert reads_edges(35) == (True, False, False)
    assert reads_edges(35, {"sees_mean": False, "sees_edges": True}) == (False, False, True)
    assert reads_edges(38) == (True, False, True) and reads_edges(42) == (True, True, True)
    assert reads_edges(39, {"sees_edges": True}) == (False, True, True)


def test_deep_head_shape_settings_only_shape_a_new_head(tmp_path):
    tiny_model().save_pretrained(tmp_path / "plain")
    grafted = load_autoencoder(tmp_path / "plain", log_scale="pixel", log_scale_head_layers=1, log_scale_head_sees_mean=True)
    assert grafted.config.log_scale_head_layers == 1 and grafted.decoder.log_scale_trunk[0].in_channels == 32 + 3
    grafted.save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match=r"only shape a newly grafted head \(got log_scale_head_layers\)"):
        load_autoencoder(tmp_path / "deep", log_scale_head_layers=3)


# --- errors ------------------------------------------------------------------------------------


def test_pickle_that_would_run_code_is_refused(tmp_path):
    victim = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    file = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "callbacks": Payload()}, file)
    assert not victim.exists()
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to unpickle.*\[detected format: single file \(pickle\)\]"):
        load_autoencoder(file)
    assert not victim.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tmp_path, suffix):
    sd = tiny_model().state_dict()
    file = tmp_path / f"vae{suffix}"
    save_file(sd, file) if suffix == ".safetensors" else torch.save(sd, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"vae\{suffix}: cannot .*truncated or corrupt.*\[detected format: single file"):
        load_autoencoder(file)


def test_unknown_layout_names_the_keys(tmp_path):
    save_file({f"backbone.layer{i}.weight": torch.zeros(2) for i in range(7)}, tmp_path / "x.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"x\.safetensors: unknown key layout.*keys: 'backbone\.layer0\.weight', .*\(7 keys in all\) \[detected format: unknown\]",
    ):
        load_autoencoder(tmp_path / "x.safetensors")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_model().state_dict()
    del sd["decoder.conv_out.bias"]
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"bad\.safetensors: the weights do not fit the architecture \(config inferred from tensor shapes\); "
        r"missing keys: 'decoder\.conv_out\.bias' \(1 key\); unexpected keys: 'encoder\.down\.0\.attn\.0\.q\.weight' "
        r"\(1 key\) \[detected format: ldm\]",
    ):
        load_autoencoder(tmp_path / "bad.safetensors")


def test_shape_mismatch_is_named(tmp_path):
    diffusers_vae().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"diffusion_pytorch_model\.safetensors: shape mismatch \(config config\.json\); keys: "
        r"'encoder\.conv_out\.weight file \(8, 64, 3, 3\) != model \(16, 64, 3, 3\)'.*\(7 keys in all\) "
        r"\[detected format: diffusers\]",
    ):
        load_autoencoder(tmp_path)


def test_missing_inference_tensor_is_named(tmp_path):
    sd = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("decoder.conv_in")}
    save_file(sd, tmp_path / "nodec.safetensors")
    with pytest.raises(CheckpointError, match=r"nodec\.safetensors: cannot infer the architecture: tensor 'decoder\.conv_in\.weight' is missing"):
        load_autoencoder(tmp_path / "nodec.safetensors")


def test_folder_and_file_type_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(CheckpointError, match=r"empty: a directory with neither model\.safetensors .*'notes\.txt' \(1 key\) \[detected format: unknown\]"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"noweights: config\.json but no weights.*\[detected format: diffusers\]"):
        load_autoencoder(tmp_path / "noweights")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "tiny" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"unsupported config: _class_name is 'AutoencoderTiny'"):
        load_autoencoder(tmp_path / "tiny")
    (tmp_path / "vae.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"vae\.onnx: unknown file type '\.onnx'"):
        load_autoencoder(tmp_path / "vae.onnx")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors: no such file"):
        load_autoencoder(tmp_path / "nothing.safetensors")


def test_bad_arguments(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['scale'\]"):
        load_autoencoder(tmp_path, scale=1.0)
    with pytest.raises(ValueError, match=r"log_scale must be None or 'pixel', got 'global'"):
        load_autoencoder(tmp_path, log_scale="global")
    with pytest.raises(ValueError, match=r"format must be one of \('hetvae', 'diffusers', 'ldm'\), got 'onnx'"):
        tiny_model().save_pretrained(tmp_path / "x", format="onnx")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("record, message", [("[true]", r"metadata: expected a JSON object, got '\[true\]'"),
                                             ("{not json", r"metadata \(Expecting property name")])
def test_head_file_with_bad_recorded_settings_is_a_clear_error(tmp_path, record, message):
    """A head file whose recorded settings are not a JSON object is refused naming the file and the
    key, by the loader and by attach_log_scale_head alike (one parser, hetvae.convert.head_settings)."""
    from hetvae.convert import HEAD_KEY

    message = rf"invalid {HEAD_KEY} {message}"
    with_trained_head().save_pretrained(tmp_path / "d", format="diffusers")
    head_file = tmp_path / "d" / "log_scale_head.safetensors"
    save_file(load_file(str(head_file)), str(head_file), metadata={HEAD_KEY: record})
    with pytest.raises(CheckpointError, match=rf"log_scale_head\.safetensors.*{message}"):
        load_autoencoder(tmp_path / "d")
    import hetvae

    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "d").eval()
    with pytest.raises(ValueError, match=rf"log_scale_head\.safetensors.*{message}"):
        hetvae.attach_log_scale_head(vae, head_file)
