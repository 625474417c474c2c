"""Variants of hetvae's AutoencoderKL (one instance patched) for docs/performance.md#the-autoencoder-against-diffusers.

Variants of hetvae's AutoencoderKL for the benchmarks, applied to one model instance only.

The shipped model runs its CPU activations channels_last, gives attention contiguous tokens and
uses in-place SiLU at inference (docs/performance.md). Each ``no_*`` variant switches one
of those off, so a benchmark measures that change's effect against diffusers in the same process;
``previous`` switches off the first two. The others are options that were tried and not shipped. Patches replace the ``forward`` of one instance's blocks
(``types.MethodType``); nothing in the library changes.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from hetvae.layers import AttnBlock, ResnetBlock


def _patch(model: nn.Module, cls: type, forward) -> nn.Module:
    for module in model.modules():
        if isinstance(module, cls):
            module.forward = MethodType(forward, module)
    return model


def no_channels_last(model: nn.Module) -> nn.Module:
    """Activations in the caller's layout (NCHW), as diffusers runs them."""
    model.encoder.channels_last_on_cpu = False
    model.decoder.channels_last_on_cpu = False
    return model


def _attn_strided(self, x):
    b, c, height, width = x.shape
    h = self.norm(x)

    def tokens(t):  # a transposed view: stride HW along C for an NCHW t
        return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

    out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
    out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
    return x + self.proj_out(out)


def no_contiguous_attention(model: nn.Module) -> nn.Module:
    """``AttnBlock`` passes q, k, v to SDPA as transposed views (the earlier code). With NCHW
    activations CPU SDPA then leaves its flash kernel for the math kernel, which materialises the
    ``HW x HW`` scores; with channels_last activations the views are contiguous anyway."""
    return _patch(model, AttnBlock, _attn_strided)


def _resnet_silu_copy(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    if self.nin_shortcut is not None:
        x = self.nin_shortcut(x)
    return x + h


def no_silu_inplace(model: nn.Module) -> nn.Module:
    """``ResnetBlock``: SiLU writes a new tensor at inference too."""
    return _patch(model, ResnetBlock, _resnet_silu_copy)


def previous(model: nn.Module) -> nn.Module:
    """NCHW activations and strided attention tokens: hetvae before those two changes."""
    return no_contiguous_attention(no_channels_last(model))


def channels_last(model: nn.Module) -> nn.Module:
    """Weights channels_last too (``model.to(memory_format=...)``; the benchmark converts inputs)."""
    return model.to(memory_format=torch.channels_last)


@torch.compile(dynamic=False)
def _norm_silu(x, weight, bias, groups: int, eps: float):
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def _resnet_compiled_norm_silu(self, x):
    n1, n2 = self.norm1, self.norm2
    h = self.conv1(_norm_silu(x, n1.weight, n1.bias, n1.num_groups, n1.eps))
    h = self.conv2(_norm_silu(h, n2.weight, n2.bias, n2.num_groups, n2.eps))
    if self.nin_shortcut is not None:
        x = self.nin_shortcut(x)
    return x + h


def compiled_norm_silu(model: nn.Module) -> nn.Module:
    """``ResnetBlock``: GroupNorm+SiLU as one ``torch.compile``-d function (compiled per shape)."""
    return _patch(model, ResnetBlock, _resnet_compiled_norm_silu)


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` of the encoder and the decoder (for reference: minutes of compilation)."""
    model.encoder = torch.compile(model.encoder)
    model.decoder = torch.compile(model.decoder)
    return model


VARIANTS = {
    "no_channels_last": no_channels_last,
    "no_contiguous_attention": no_contiguous_attention,
    "no_silu_inplace": no_silu_inplace,
    "previous": previous,
    "channels_last": channels_last,
    "compiled_norm_silu": compiled_norm_silu,
    "compiled": compiled,
}
