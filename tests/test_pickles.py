"""Pickles that would run code are refused as code, damage is reported as damage, and torch's advice
to retry with ``weights_only=False`` is never relayed (model files and latent files alike)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from hetvae.cli import main
from hetvae.convert import load_autoencoder
from hetvae.files import CheckpointError
from hetvae.pickles import UnsafePickleError, load_weights_only, pickle_globals


class System:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class Open:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _torch_save(path, payload):
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": payload}, path)
    return path


def _plain_pickle(path, payload, protocol):
    with open(path, "wb") as f:
        pickle.dump({"x": payload}, f, protocol=protocol)
    return path


WRITERS = {
    "torch.save": _torch_save,
    "pickle protocol 2": lambda p, x: _plain_pickle(p, x, 2),
    "pickle protocol 4": lambda p, x: _plain_pickle(p, x, 4),
    "pickle protocol 5": lambda p, x: _plain_pickle(p, x, 5),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("payload", ["system", "open"])
def test_code_is_refused_as_code_and_never_runs(tmp_path, writer, payload):
    victim = tmp_path / "pwned"
    obj = System() if payload == "system" else Open(str(victim))
    file = WRITERS[writer](tmp_path / "evil.ckpt", obj)
    expected = "system" if payload == "system" else "open"
    with pytest.raises(UnsafePickleError, match=rf"refused to unpickle.*{expected}.*could run code") as caught:
        load_weights_only(file)
    assert "weights_only=False" not in str(caught.value) and "weights_only` set to `False" not in str(caught.value)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to unpickle.*could run code"):
        load_autoencoder(file)
    assert not victim.exists()


def test_pickle_globals_reads_names_without_running_anything(tmp_path):
    file = _plain_pickle(tmp_path / "a.pkl", System(), 4)
    assert pickle_globals(file)[-1] in ("posix.system", "nt.system")
    assert pickle_globals(_torch_save(tmp_path / "b.pt", 1))[:1] == ["torch._utils._rebuild_tensor_v2"]


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_damage_is_damage_and_names_no_retry(tmp_path, cut):
    file = tmp_path / "vae.ckpt"
    torch.save({"a": torch.zeros(64), "b": torch.ones(8)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="truncated or corrupt") as caught:
        load_weights_only(file)
    assert not isinstance(caught.value, UnsafePickleError)
    assert "weights_only" not in str(caught.value).split("(", 1)[-1]


def test_a_latent_pickle_with_code_is_refused_without_torchs_advice(tmp_path, capsys):
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
    from hetvae.convert import save_autoencoder

    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                            mid_block_attention=False, log_scale="pixel"))
    save_autoencoder(model, tmp_path / "m", format="hetvae")
    torch.save({"latents": torch.zeros(1, 4, 2, 2), "cb": System()}, tmp_path / "evil.pt")
    assert main(["uncertainty", str(tmp_path / "m"), "--images", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "evil.pt" in err and "could run code" in err and "system" in err
    assert "weights_only=False" not in err and "will likely succeed" not in err and "Re-running" not in err
