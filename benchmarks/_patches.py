"""Candidate speed-ups of hetvae's AutoencoderKL, applied to one model instance only.

Nothing in the library changes: each function patches the ``forward`` of the blocks of one model
(``types.MethodType``) so the benchmarks can time it against the stock model in the same process.
Each docstring says what the change to ``hetvae/layers.py`` would be.
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


def _attn_contiguous(self, x):
    b, c, height, width = x.shape
    h = self.norm(x)

    def tokens(t):  # (B, C, H, W) -> (B, 1, H*W, C), with unit stride in C
        return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1).contiguous()

    out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
    out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
    return x + self.proj_out(out)


def contiguous_attention(model: nn.Module) -> nn.Module:
    """``AttnBlock``: make q, k, v contiguous ``(B, 1, HW, C)`` before SDPA.

    The stock ``tokens()`` returns a transposed view (stride ``HW`` along ``C``). On the CPU,
    ``scaled_dot_product_attention`` then falls back from its flash kernel to the math kernel, which
    materialises the ``HW x HW`` attention matrix: 1 GiB per copy for a 128x128 latent (1024 px),
    16 GiB for 2048 px. Change in ``layers.py``: append ``.contiguous()`` in ``tokens()``.
    """
    return _patch(model, AttnBlock, _attn_contiguous)


def _resnet_silu_inplace(self, x):
    h = self.conv1(F.silu(self.norm1(x), inplace=True))
    h = self.conv2(F.silu(self.norm2(h), inplace=True))
    if self.nin_shortcut is not None:
        x = self.nin_shortcut(x)
    return x + h


def silu_inplace(model: nn.Module) -> nn.Module:
    """``ResnetBlock``: ``F.silu(norm(x), inplace=True)``; GroupNorm's output is a fresh tensor, so
    SiLU can overwrite it (one allocation and one write fewer; autograd saves SiLU's output instead)."""
    return _patch(model, ResnetBlock, _resnet_silu_inplace)


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


def channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` (inputs converted too by the benchmark)."""
    return model.to(memory_format=torch.channels_last)


def channels_last_activations(model: nn.Module) -> nn.Module:
    """Encoder and Decoder: run the activations in ``channels_last``, weights and outputs untouched.

    A convolution whose input is channels_last computes and returns channels_last (oneDNN's
    preferred layout on the CPU) even with contiguous weights, so converting the input of
    ``Encoder.forward`` / ``Decoder.forward`` carries the layout through the whole network; the
    outputs are made contiguous again (3 or 8 channels: cheap), so callers see what they saw.
    Change in ``autoencoder.py``: ``h = self.conv_in(x.contiguous(memory_format=torch.channels_last))``
    in both, ``.contiguous()`` on the encoder's moments and the decoder's mean and log-scale.
    Unlike ``model.to(memory_format=...)`` this keeps the weights contiguous, so saving is unchanged.
    """
    for part in (model.encoder, model.decoder):
        plain = type(part).forward

        def forward(self, x, plain=plain):
            out = plain(self, x.contiguous(memory_format=torch.channels_last))
            if isinstance(out, tuple):
                return tuple(None if t is None else t.contiguous() for t in out)
            return out.contiguous()

        part.forward = MethodType(forward, part)
    return model


def proposed(model: nn.Module) -> nn.Module:
    """The changes recommended for hetvae: channels_last activations, contiguous attention, in-place SiLU."""
    return channels_last_activations(silu_inplace(contiguous_attention(model)))


def combined(model: nn.Module) -> nn.Module:
    """channels_last + contiguous attention + in-place SiLU."""
    return channels_last(silu_inplace(contiguous_attention(model)))


VARIANTS = {
    "contiguous_attention": contiguous_attention,
    "silu_inplace": silu_inplace,
    "channels_last": channels_last,
    "combined": combined,
    "channels_last_activations": channels_last_activations,
    "proposed": proposed,
    "compiled_norm_silu": compiled_norm_silu,
    "compiled": compiled,
}
