"""PatchGAN discriminator and its losses, as in the Stable Diffusion (ldm/taming) VAE objective.

PatchGAN (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks",
pix2pix, https://arxiv.org/abs/1611.07004) classifies overlapping patches: the output is a map of
logits, one per receptive field. The layer stack, weight init and ``ActNorm`` follow SD's VAE
discriminator so that its checkpoints' ``loss.discriminator.main.*`` keys load into ``main.*``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "ActNorm",
    "NLayerDiscriminator",
    "create_d_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
    "weights_init",
]


class ActNorm(nn.Module):
    """Per-channel affine ``y = scale * (x + loc)`` with data-dependent initialisation.

    Input (B, C, H, W). On the first forward in training mode, ``loc = -mean_c`` and
    ``scale = 1 / (std_c + eps)`` over (B, H, W) of that batch (``std`` unbiased), so that batch
    comes out with per-channel mean 0 and std ~1; afterwards both are ordinary parameters.
    ``initialized`` is a buffer so a loaded checkpoint is not re-initialised. Names and shapes
    (``loc``, ``scale``: (1, C, 1, 1)) match SD's ActNorm.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(dim=1).view_as(self.loc))
        self.scale.copy_(1.0 / (flat.std(dim=1).view_as(self.scale) + self.eps))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.initialized.item():
            self.initialize(x)
        return self.scale * (x + self.loc)


_NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm2d, "actnorm": ActNorm}


def weights_init(module: nn.Module) -> None:
    """SD's discriminator init, for ``model.apply(weights_init)``.

    Conv weights ~ N(0, 0.02); batch-norm weights ~ N(1, 0.02) and biases 0. Conv biases keep
    PyTorch's default init, as in SD; ActNorm is initialised from data instead.
    """
    if isinstance(module, _ConvNd):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, _BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; SD's VAE discriminator).

    ``main`` = conv4x4/s2 + LeakyReLU(0.2), then ``n_layers - 1`` blocks of conv4x4/s2 + norm +
    LeakyReLU, one conv4x4/s1 + norm + LeakyReLU, and a conv4x4/s1 to one logit channel; widths
    ``channels * min(2**i, 8)``, padding 1. Convs before a BatchNorm have no bias. For
    (B, in_channels, H, W) with H, W divisible by ``2**n_layers`` the logits are
    (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2), e.g. 256 px, 3 layers: 30 x 30 patches
    (70 x 70 px receptive field each).

    Args:
        in_channels: image channels.
        channels: width of the first layer.
        n_layers: number of stride-2 convs.
        norm: ``"batch"`` (BatchNorm2d) or ``"actnorm"`` (:class:`ActNorm`).
    """

    def __init__(
        self, *, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r}; valid: {list(_NORMS)}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm_layer = _NORMS[norm]
        bias = norm != "batch"

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        width = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias),
                norm_layer(out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits (B, 1, h, w) for images (B, in_channels, H, W)."""
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``0.5 * (mean relu(1 - l_real) + mean relu(1 + l_fake))``.

    Logits of any shape (the two may differ); returns a scalar.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Vanilla GAN discriminator loss ``0.5 * (mean softplus(-l_real) + mean softplus(l_fake))``.

    Equal to the mean of binary cross-entropies with labels 1 (real) and 0 (fake),
    ``softplus(-l) = -log sigmoid(l)``. Logits of any shape; returns a scalar.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def create_d_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The discriminator loss called ``name`` (``"hinge"`` or ``"vanilla"``)."""
    if name not in _D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; valid: {list(_D_LOSSES)}")
    return _D_LOSSES[name]
