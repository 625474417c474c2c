"""hetvae: heteroscedastic (spatially varying) reconstruction likelihoods for image autoencoders.

The public names below are imported on first use (PEP 562), so ``import hetvae`` and
``hetvae --help`` stay fast and import no torch; ``hetvae.AutoencoderKL`` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "resolve_model": "hub",
    "bits_per_dim": "functional",
    "coupled_discretized_nll": "functional",
    "coupled_mean": "functional",
    "coupled_nll": "functional",
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
    "PipelineAutoencoderKL": "pipeline",
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

