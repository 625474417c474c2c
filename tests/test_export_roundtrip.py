"""Saving over an earlier export: the weights read back are always the ones last written, whatever
the format, variant and serialisation of each save."""

from __future__ import annotations

import pathlib
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.convert import DIFFUSERS_WEIGHTS, load_autoencoder, save_autoencoder

CONFIG = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, mid_block_attention=False)


def model(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(CONFIG).eval()


def same_weights(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.mark.parametrize("first, second", [
    (dict(), dict(variant="fp16")),
    (dict(), dict(safe_serialization=False)),
    (dict(variant="fp16"), dict()),
    (dict(safe_serialization=False), dict(variant="fp16", safe_serialization=False)),
])
def test_a_diffusers_export_over_another_variant_leaves_only_the_new_weights(tmp_path, first, second):
    save_autoencoder(model(0), tmp_path, format="diffusers", **first)
    new = model(1)
    save_autoencoder(new, tmp_path, format="diffusers", **second)
    weights = [p.name for p in tmp_path.iterdir() if p.name in DIFFUSERS_WEIGHTS]
    assert len(weights) == 1, weights  # the old variant would be read first, under the new config
    assert same_weights(new, load_autoencoder(tmp_path))


def test_without_overwrite_an_export_over_another_variant_is_refused_and_nothing_changes(tmp_path):
    save_autoencoder(model(0), tmp_path, format="diffusers")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="diffusion_pytorch_model.safetensors"):
        save_autoencoder(model(1), tmp_path, format="diffusers", variant="fp16", overwrite=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


SAVES = st.lists(
    st.tuples(st.sampled_from([None, "fp16"]), st.booleans(), st.integers(0, 3)), min_size=1, max_size=4,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(saves=SAVES)
def test_the_weights_read_back_are_the_ones_last_written(saves):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder)
        for variant, safe, seed in saves:
            last = model(seed)
            save_autoencoder(last, path, format="diffusers", variant=variant, safe_serialization=safe)
        assert same_weights(last, load_autoencoder(path))
        diffusers = pytest.importorskip("diffusers")
        variant = saves[-1][0]
        stock = diffusers.AutoencoderKL.from_pretrained(folder, variant=variant, use_safetensors=saves[-1][1])
        ours = load_autoencoder(path)
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            assert torch.allclose(stock(x).sample, ours(x, sample_posterior=False)[0].mean, atol=1e-4)
