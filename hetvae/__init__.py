"""hetvae: heteroscedastic (spatially varying) reconstruction likelihoods for image autoencoders."""

from hetvae.functional import (
    bits_per_dim,
    discretized_log_likelihood,
    discretized_nll,
    gaussian_nll,
    laplace_nll,
    optimal_log_scale,
)
from hetvae.heads import ChannelLogScale, GlobalLogScale, PixelLogScale, create_head
from hetvae.loss import HeteroscedasticNLL, NLLOutput

__version__ = "0.1.0"

__all__ = [
    "ChannelLogScale",
    "GlobalLogScale",
    "HeteroscedasticNLL",
    "NLLOutput",
    "PixelLogScale",
    "bits_per_dim",
    "create_head",
    "discretized_log_likelihood",
    "discretized_nll",
    "gaussian_nll",
    "laplace_nll",
    "optimal_log_scale",
]
