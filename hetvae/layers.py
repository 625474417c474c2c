"""Building blocks of the SD (ldm / CompVis) VAE.

Parameter names match the original Stable Diffusion checkpoints (``norm1``, ``conv1``,
``nin_shortcut``, ``q``/``k``/``v``/``proj_out`` as 1x1 convolutions), so those weights load with
``strict=True``. Every block keeps the spatial layout ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

# SD's VAE uses eps=1e-6 in every GroupNorm (torch's default is 1e-5).
NORM_EPS = 1e-6


def activation_layout(x: Tensor, channels_last_on_cpu: bool = True) -> Tensor:
    """``x`` in the memory layout the encoder and decoder run their activations in.

    On the CPU that is ``channels_last``: a convolution whose input is channels_last computes and
    returns channels_last (oneDNN's native layout) even with contiguous weights, so converting the
    input once carries the layout through every block (encode+decode measured 0.93x the time of the
    default layout, docs/performance.md), and the attention's tokens are then contiguous views.
    Weights stay as they are, so saving and loading are unaffected. Other devices keep the caller's
    layout (not measured there; ``model.to(memory_format=torch.channels_last)`` still works).
    The encoder's and decoder's ``channels_last_on_cpu = False`` keeps the caller's layout on the
    CPU too. LPIPS's VGG trunk runs the same way.
    """
    if channels_last_on_cpu and x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def group_norm(*, channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, with a 1x1 ``nin_shortcut`` on ``x``
    when the channel count changes. ``(B, in_channels, H, W) -> (B, out_channels, H, W)``."""

    def __init__(self, *, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(channels=in_channels, groups=groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(channels=out_channels, groups=groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        inplace = not torch.is_grad_enabled()  # saves a copy at inference; autograd needs the input
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions, residual.

    ``softmax(q k^T / sqrt(C)) v`` with ``q, k, v`` 1x1 convolutions of ``norm(x)``, computed by
    ``torch.nn.functional.scaled_dot_product_attention``. ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, *, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels=channels, groups=groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C), unit stride along C
            # A channels_last t gives a contiguous view; an NCHW one is copied, because a transposed
            # view sends CPU SDPA from its flash kernel to the math kernel, which materialises the
            # HW x HW scores (~32 GiB for the 256x256 latent of an untiled 2048 px decode).
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom only (the
    asymmetric padding of the original SD VAE). ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution. ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_1 -> attn_1 (optional) -> block_2`` at the lowest resolution, ``(B, C, h, w)``."""

    def __init__(self, *, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, groups=groups)
        self.attn_1 = AttnBlock(channels=channels, groups=groups) if attention else None
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Level(nn.Module):
    """One resolution level: ``block`` (a list of ResnetBlocks) then an optional resampler,
    registered as ``downsample`` or ``upsample`` to match the ldm key names."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        groups: int,
        resample: str | None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels=in_channels if j == 0 else out_channels, out_channels=out_channels, groups=groups)
            for j in range(num_blocks)
        )
        if resample == "down":
            self.downsample = Downsample(channels=out_channels)
        elif resample == "up":
            self.upsample = Upsample(channels=out_channels)
        elif resample is not None:
            raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
        self._resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self._resample == "down":
            x = self.downsample(x)
        elif self._resample == "up":
            x = self.upsample(x)
        return x


def run_maybe_checkpointed(module: nn.Module, x: Tensor, enabled: bool) -> Tensor:
    """``module(x)``, recomputed in the backward pass instead of stored when ``enabled`` and
    gradients are being recorded (gradient checkpointing)."""
    if enabled and torch.is_grad_enabled() and x.requires_grad:
        return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    return module(x)
