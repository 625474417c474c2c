"""hetvae: heteroscedastic (spatially varying) reconstruction likelihoods for image autoencoders.

The public names below are imported on first use (PEP 562), so ``import hetvae`` and
``hetvae --help`` stay fast and import no torch; ``hetvae.AutoencoderKL`` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "attach_log_scale_head": "attach",
    "AutoencoderConfig": "autoencoder",
    "AutoencoderKL": "autoencoder",
    "Reconstruction": "autoencoder",
    "build_model": "build",
    "build_nll": "build",
    "build_objective": "build",
    "Calibration": "calibration",
    "CalibrationError": "calibration",
    "fit_calibration": "calibration",
    "Config": "config",
    "load_config": "config",
    "CheckpointInfo": "convert",
    "inspect_checkpoint": "convert",
    "load_autoencoder": "convert",
    "save_autoencoder": "convert",
    "NLayerDiscriminator": "discriminator",
    "hinge_d_loss": "discriminator",
    "vanilla_d_loss": "discriminator",
    "DiagonalGaussian": "distributions",
    "CheckpointError": "files",
    "bits_per_dim": "functional",
    "discretized_log_likelihood": "functional",
    "discretized_nll": "functional",
    "gaussian_nll": "functional",
    "laplace_nll": "functional",
    "optimal_log_scale": "functional",
    "ChannelLogScale": "heads",
    "GlobalLogScale": "heads",
    "PixelLogScale": "heads",
    "create_head": "heads",
    "Likelihood": "likelihood",
    "HeteroscedasticNLL": "loss",
    "NLLOutput": "loss",
    "AutoencoderObjective": "objective",
    "LPIPS": "perceptual",
    "calibrate": "predictor",
    "NonFiniteLossError": "train",
    "Trainer": "train",
    "TrainResult": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hetvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hetvae.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from hetvae.attach import attach_log_scale_head
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL, Reconstruction
    from hetvae.build import build_model, build_nll, build_objective
    from hetvae.calibration import Calibration, CalibrationError, fit_calibration
    from hetvae.config import Config, load_config
    from hetvae.convert import CheckpointInfo, inspect_checkpoint, load_autoencoder, save_autoencoder
    from hetvae.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
    from hetvae.distributions import DiagonalGaussian
    from hetvae.files import CheckpointError
    from hetvae.functional import (
        bits_per_dim,
        discretized_log_likelihood,
        discretized_nll,
        gaussian_nll,
        laplace_nll,
        optimal_log_scale,
    )
    from hetvae.heads import ChannelLogScale, GlobalLogScale, PixelLogScale, create_head
    from hetvae.likelihood import Likelihood
    from hetvae.loss import HeteroscedasticNLL, NLLOutput
    from hetvae.objective import AutoencoderObjective
    from hetvae.perceptual import LPIPS
    from hetvae.predictor import calibrate
    from hetvae.train import NonFiniteLossError, Trainer, TrainResult
