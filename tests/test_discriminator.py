"""PatchGAN discriminator: shapes, SD's init, ActNorm data-dependent init, loss closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetvae.discriminator import (
    _D_LOSSES,
    ActNorm,
    NLayerDiscriminator,
    create_d_loss,
    hinge_d_loss,
    vanilla_d_loss,
)


@pytest.mark.parametrize(
    "size, n_layers, expected",
    [(64, 3, 6), (64, 2, 14), (32, 1, 14), (48, 3, 4)],  # H / 2**n_layers - 2
)
@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_output_shape(size, n_layers, expected, norm):
    torch.manual_seed(0)
    d = NLayerDiscriminator(channels=8, n_layers=n_layers, norm=norm)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, expected, expected)


def test_layer_widths_and_sd_key_names():
    d = NLayerDiscriminator(in_channels=3, channels=64, n_layers=3)
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 64), (64, 128), (128, 256), (256, 512), (512, 1)
    ]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    keys = set(d.state_dict())
    # SD checkpoints: loss.discriminator.main.{0,2,3,5,6,8,9,11}.*; no bias before BatchNorm
    assert {"main.0.bias", "main.2.weight", "main.3.running_var", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys
    assert "main.2.bias" in NLayerDiscriminator(norm="actnorm").state_dict()


def test_sd_weight_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(channels=64, n_layers=3, norm="batch")
    for m in d.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 100_000:
            w = m.weight.detach()
            assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
        if isinstance(m, nn.BatchNorm2d) and m.num_features >= 256:
            w = m.weight.detach()
            assert abs(w.mean().item() - 1.0) < 5e-3 and abs(w.std().item() - 0.02) < 5e-3
            assert torch.all(m.bias == 0)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    norm = ActNorm(5).train()
    x = 3.0 + 2.5 * torch.randn(2, 5, 8, 8) * torch.arange(1, 6).view(1, 5, 1, 1)
    y = norm(x)
    per_channel = y.transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(5), atol=1e-4, rtol=0)
    assert norm.initialized.item() == 1
    # afterwards a fixed affine map: a second batch does not re-initialise
    loc, scale = norm.loc.detach().clone(), norm.scale.detach().clone()
    norm(torch.randn(2, 5, 8, 8))
    assert torch.equal(norm.loc, loc) and torch.equal(norm.scale, scale)


def test_actnorm_no_init_in_eval_or_after_loading():
    norm = ActNorm(3).eval()
    x = torch.randn(2, 3, 4, 4) + 7.0
    torch.testing.assert_close(norm(x), x)  # identity, untouched
    trained = ActNorm(3).train()
    trained(x)
    fresh = ActNorm(3).train()
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh(x + 1.0), trained(x + 1.0))


def test_actnorm_discriminator_initialises_every_norm():
    torch.manual_seed(0)
    d = NLayerDiscriminator(channels=8, n_layers=2, norm="actnorm").train()
    d(torch.randn(2, 3, 32, 32))
    assert all(m.initialized.item() == 1 for m in d.modules() if isinstance(m, ActNorm))


REAL = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
FAKE = torch.tensor([-2.0, 0.3, 1.5])


def test_hinge_closed_form():
    real = (0.0 + 0.5 + 2.0 + 1.0) / 4  # relu(1 - l)
    fake = (0.0 + 1.3 + 2.5) / 3  # relu(1 + l)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (real + fake), abs=1e-6)


def test_vanilla_closed_form():
    def softplus(v):
        return math.log1p(math.exp(v))

    real = sum(softplus(-v) for v in REAL.flatten().tolist()) / 4
    fake = sum(softplus(v) for v in FAKE.tolist()) / 3
    loss = vanilla_d_loss(REAL, FAKE)
    assert loss.item() == pytest.approx(0.5 * (real + fake), abs=1e-6)
    bce = 0.5 * (
        F.binary_cross_entropy_with_logits(REAL, torch.ones_like(REAL))
        + F.binary_cross_entropy_with_logits(FAKE, torch.zeros_like(FAKE))
    )
    torch.testing.assert_close(loss, bce)


@pytest.mark.parametrize("name", list(_D_LOSSES))
def test_create_d_loss(name):
    assert create_d_loss(name) is _D_LOSSES[name]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['hinge', 'vanilla'\]"):
        create_d_loss("wgan")
    with pytest.raises(ValueError, match=r"\['batch', 'actnorm'\]"):
        NLayerDiscriminator(norm="group")
