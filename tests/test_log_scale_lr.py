"""The log-scale offsets train at their own learning rate (a scalar moves ~lr per Adam step)."""

from pathlib import Path

import pytest

from hetvae.config import load_config
from hetvae.train import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.block_out_channels=[16, 32]", "model.latent_channels=4", "model.norm_num_groups=8",
        "data.resolution=32", "data.samples_per_epoch=8", "train.batch_size=2", "train.final_steps=0", "train.lr=1e-3",
        "train.head_lr=null"]  # tiny.yaml's head_lr adds a third group, tested in test_train.py


@pytest.mark.parametrize("granularity", ["global", "channel", "pixel"])
@pytest.mark.parametrize("log_scale_lr", [None, 0.05])
def test_offsets_get_log_scale_lr(tmp_path, granularity, log_scale_lr):
    cfg = load_config(CONFIGS / "tiny.yaml", TINY + [f"log_scale.granularity={granularity}",
                                                    f"train.log_scale_lr={'null' if log_scale_lr is None else log_scale_lr}"])
    trainer = Trainer(cfg, out_dir=tmp_path, progress=False)
    network, offsets = trainer.g_opt.param_groups
    expected = [trainer.model.decoder.log_scale_head.bias] if granularity == "pixel" else [trainer.objective.nll.head.free]
    assert len(offsets["params"]) == 1 and offsets["params"][0] is expected[0]
    assert offsets["base_lr"] == (log_scale_lr or 1e-3) and offsets["weight_decay"] == 0.0
    assert network["base_lr"] == 1e-3 and not any(p is expected[0] for p in network["params"])
    # every trainable parameter is in exactly one group
    n_train = sum(p.requires_grad for p in trainer.model.parameters()) + len(trainer.objective.trainable_parameters())
    assert len(network["params"]) + len(offsets["params"]) == n_train
