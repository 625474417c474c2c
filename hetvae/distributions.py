"""The VAE posterior: a diagonal Gaussian ``q(z|x) = N(mean, diag(exp(logvar)))``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ldm's bounds on the log-variance: exp(20) ~ 5e8 and exp(-30) ~ 1e-13 keep var, std and the KL
# finite in float32 whatever the encoder emits.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """Diagonal Gaussian over latents of shape ``(B, C, h, w)``.

    Built either from the encoder's moments ``parameters`` of shape ``(B, 2C, h, w)`` (mean first,
    log-variance second, split along dim 1) or from ``mean`` and ``logvar`` of shape
    ``(B, C, h, w)``. ``logvar`` is clamped to ``[-30, 20]``.
    """

    def __init__(self, parameters: Tensor, logvar: Tensor | None = None) -> None:
        if logvar is None:
            if parameters.shape[1] % 2:
                raise ValueError(
                    f"moments need an even channel count (mean and log-variance), got shape {tuple(parameters.shape)}"
                )
            mean, logvar = torch.chunk(parameters, 2, dim=1)
        else:
            mean = parameters
            if mean.shape != logvar.shape:
                raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @property
    def parameters(self) -> Tensor:
        """``(B, 2C, h, w)``: mean and clamped log-variance concatenated along dim 1."""
        return torch.cat([self.mean, self.logvar], dim=1)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``; ``(B, C, h, w)``."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean, ``(B, C, h, w)``."""
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar)`` over all non-batch dims; ``(B,)``."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)

    def nll(self, sample: Tensor) -> Tensor:
        """``-log q(sample)`` summed over all non-batch dims; ``(B,)``."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )
