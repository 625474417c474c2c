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

    @property
    def latent_dist(self) -> "DiagonalGaussian":
        """This posterior itself: diffusers' ``AutoencoderKLOutput.latent_dist``, so that
        ``vae.encode(x).latent_dist`` (and diffusers' ``retrieve_latents``) work on hetvae's output."""
        return self

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``; ``(B, C, h, w)``.

        Drawn as diffusers' ``randn_tensor`` draws it, so a seeded generator gives diffusers'
        sample: a CPU generator draws on the CPU whatever the mean's device (then moved); a list
        of ``B`` generators draws sample ``i`` from ``generator[i]``.
        """
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if not gens or not all(g is None or isinstance(g, torch.Generator) for g in gens):
            raise ValueError(f"generator must be a torch.Generator, a list of them or None, got {generator!r}")
        if len(gens) not in (1, shape[0]):
            raise ValueError(f"generator: a list of {len(gens)} generators for a batch of {shape[0]} latents")
        where = device if gens[0] is None or gens[0].device.type != "cpu" else torch.device("cpu")
        if len(gens) == 1:
            eps = torch.randn(shape, generator=gens[0], device=where, dtype=dtype)
        else:
            eps = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=where, dtype=dtype) for g in gens])
        return self.mean + self.std * eps.to(device)

    def mode(self) -> Tensor:
        """The mean, ``(B, C, h, w)``."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> Tensor:
        """``KL(q || p)`` summed over all non-batch dims; ``(B,)``. ``other`` None: ``p = N(0, I)``,
        ``0.5 * sum(mean^2 + var - 1 - logvar)``; else ``p = other``,
        ``0.5 * sum((mean - m_p)^2 / var_p + var / var_p - 1 - logvar + logvar_p)``."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"kl: other has shape {tuple(other.mean.shape)}, this posterior {tuple(self.mean.shape)}")
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor, dims: tuple[int, ...] | list[int] | None = None) -> Tensor:
        """``-log q(sample)`` summed over ``dims`` (default: all non-batch dims, ``(B,)``)."""
        dims = tuple(range(1, self.mean.ndim)) if dims is None else tuple(dims)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )
