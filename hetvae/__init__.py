"""hetvae: heteroscedastic (spatially varying) reconstruction likelihoods for image autoencoders."""

from hetvae.attach import attach_log_scale_head
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, Likelihood, Reconstruction
from hetvae.calibration import Calibration, CalibrationError, calibrate, fit_calibration
from hetvae.config import Config, build_model, build_nll, build_objective, load_config
from hetvae.convert import CheckpointError, CheckpointInfo, inspect_checkpoint, load_autoencoder, save_autoencoder
from hetvae.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from hetvae.distributions import DiagonalGaussian
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
from hetvae.objective import AutoencoderObjective
from hetvae.perceptual import LPIPS
from hetvae.train import NonFiniteLossError, Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "LPIPS",
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderObjective",
    "Calibration",
    "CalibrationError",
    "ChannelLogScale",
    "CheckpointError",
    "CheckpointInfo",
    "Config",
    "DiagonalGaussian",
    "GlobalLogScale",
    "HeteroscedasticNLL",
    "Likelihood",
    "NLLOutput",
    "NLayerDiscriminator",
    "NonFiniteLossError",
    "PixelLogScale",
    "Reconstruction",
    "TrainResult",
    "Trainer",
    "attach_log_scale_head",
    "bits_per_dim",
    "build_model",
    "build_nll",
    "build_objective",
    "calibrate",
    "create_head",
    "discretized_log_likelihood",
    "discretized_nll",
    "fit_calibration",
    "gaussian_nll",
    "hinge_d_loss",
    "inspect_checkpoint",
    "laplace_nll",
    "load_config",
    "load_autoencoder",
    "optimal_log_scale",
    "save_autoencoder",
    "vanilla_d_loss",
]
