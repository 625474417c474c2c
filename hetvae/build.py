"""Building what a config describes: the autoencoder (:func:`build_model`), its reconstruction
likelihood (:func:`build_nll`), the whole training objective (:func:`build_objective`), and the
likelihood a model read from a file is scored with (:func:`model_nll`).

The one way to build from a config: ``cfg = load_config(path)`` then these.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.config import Config, ConfigError, ModelConfig, require_crop_sides
from hetvae.convert import expected_head_file, inspect_checkpoint, load_autoencoder
from hetvae.discriminator import NLayerDiscriminator
from hetvae.hub import resolve_model
from hetvae.likelihood import grafted_record, head_config_fields, nll_from_config, nll_from_likelihood
from hetvae.loss import HeteroscedasticNLL
from hetvae.objective import AutoencoderObjective
from hetvae.perceptual import LPIPS

__all__ = ["build_model", "build_nll", "build_objective", "model_architecture_kwargs", "model_nll"]


def model_architecture_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The architecture fields of ``model`` (everything but ``init_from``) as a plain dict, for a model
    built from scratch: an unset (``None``) ``scaling_factor`` / ``shift_factor`` is the
    ``AutoencoderConfig`` default (0.18215 / 0.0)."""
    kwargs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "init_from"}
    unset = [name for name in _LATENT_FACTORS if kwargs[name] is None]
    if unset:
        defaults = {f.name: f.default for f in dataclasses.fields(AutoencoderConfig)}
        kwargs.update({name: defaults[name] for name in unset})
    return kwargs


_LATENT_FACTORS = ("scaling_factor", "shift_factor")


def build_model(cfg: Config) -> AutoencoderKL:
    """The autoencoder of ``cfg``, in float32 on the CPU, train mode.

    ``model.init_from == "scratch"``: a new ``AutoencoderKL`` from the architecture fields, with
    a per-pixel log-scale head when ``log_scale.granularity == "pixel"`` (``shared`` -> one map,
    bias ``init``, ``detach_features``, ``head_*``), its ResNet blocks starting as the identity with
    ``train.zero_init_residual``, its posterior's log-variance near ``train.init_logvar`` and its
    encoder reading chroma amplified by ``train.init_chroma_gain``.
    Parameters come from torch's global RNG: seed it first.

    Otherwise ``init_from`` is a checkpoint path or a Hugging Face Hub id (``org/name``,
    ``org/name/vae``, ``org/name/file.safetensors``, ``@revision``; :func:`hetvae.hub.resolve_model`)
    for ``hetvae.convert.load_autoencoder``; its
    architecture is the checkpoint's, and ``model.scaling_factor`` / ``shift_factor``, when set
    (not ``None``), replace the checkpoint's stored or inferred values. For
    ``"pixel"`` a head stored with the checkpoint is kept (``detach_features`` still applies) and
    a fresh one (zero weights, bias ``init``) is grafted when there is none, so step 0 reproduces
    the pretrained output exactly. A stored head is given the colour-coupling maps
    ``log_scale.channel_coupling`` asks for: ``"pixel"`` on a head without them widens it
    (:meth:`AutoencoderKL.add_coupling_maps`: zero rows, so step 0 is the uncoupled model's mean,
    log-scales and loss), ``"none"`` / ``"global"`` on a head with them drops them with a warning
    (its log-scales were trained as conditional scales). A loss's own learned values recorded with
    the model (a global / channel scale, ``"global"`` coupling coefficients) are not carried over:
    they start from the config (``log_scale.init``, zero). For ``"global"`` / ``"channel"`` a stored
    head is dropped: it would receive no gradient. A post-hoc calibration stored with the checkpoint is dropped (with
    a warning): it describes the scale before training.

    Raises:
        FileNotFoundError: ``init_from`` does not exist (nor, for a Hub id, on the Hub or in its cache).
        ConfigError: ``data.resolution`` is not a multiple of a loaded model's down-sampling factor;
            ``channel_coupling: pixel`` on a stored shared (one-map) head.
    """
    pixel = cfg.log_scale.granularity == "pixel"
    if cfg.model.init_from == "scratch":
        config = AutoencoderConfig(
            **model_architecture_kwargs(cfg.model),
            log_scale="pixel" if pixel else None,
            **(head_config_fields(cfg.log_scale) if pixel else {}),
        )
        model = AutoencoderKL(config)
        if cfg.train.zero_init_residual:
            model.zero_init_residual()
        if cfg.train.init_logvar is not None:
            model.init_posterior_logvar(cfg.train.init_logvar)
        if cfg.train.init_chroma_gain is not None:
            model.amplify_input_chroma(cfg.train.init_chroma_gain)
        return model.train()

    try:  # a local path, or a Hugging Face Hub id (org/name, org/name/vae, ...@revision)
        path = resolve_model(cfg.model.init_from)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.init_from: {e}") from None
    info = inspect_checkpoint(path)
    # explicit values win over the checkpoint's (an SDXL VAE is inferred as SD 1.x's 0.18215)
    factors = {name: getattr(cfg.model, name) for name in _LATENT_FACTORS if getattr(cfg.model, name) is not None}
    if pixel and info.has_log_scale_head:
        # its trained head is kept: only the detach switch and the coupling maps can change
        model = load_autoencoder(path, log_scale_detach=cfg.log_scale.detach_features, **factors)
        _match_coupling(model, cfg.log_scale.channel_coupling, path)
    elif pixel:
        model = load_autoencoder(path, log_scale="pixel", **head_config_fields(cfg.log_scale), **factors)
    else:
        model = load_autoencoder(path, **factors)
        if model.has_log_scale_head:
            model.remove_log_scale_head()
    lik = model.config.likelihood
    if lik is not None and lik.calibration is not None:
        # training changes the scale a calibration was fitted to, and the loss needs the raw head
        # output (a calibrated model's decode returns the corrected map): drop it; recalibrate after
        warnings.warn(
            f"{path} carries a post-hoc calibration of its scale; fine-tuning drops it "
            "(run `hetvae calibrate` on the new model)", stacklevel=2,
        )
        model.config = dataclasses.replace(model.config, likelihood=dataclasses.replace(lik, calibration=None))
    factor = model.config.downsample_factor
    require_crop_sides(cfg, factor, f"the down-sampling factor {factor} of {path}")
    return model.train()


def _match_coupling(model: AutoencoderKL, coupling: str, path: Path) -> None:
    """Give a loaded per-pixel head the colour-coupling maps ``log_scale.channel_coupling`` asks for:
    widened (zero rows: step 0 is the uncoupled model) for ``"pixel"``, dropped with a warning otherwise."""
    want = coupling == "pixel"
    if want == model.config.log_scale_coupling:
        return
    if want:
        try:
            model.add_coupling_maps()
        except ValueError as e:
            raise ConfigError(
                "log_scale.channel_coupling",
                f"'pixel' widens the per-pixel head of model.init_from={str(path)!r} with coupling maps, but {e}",
            ) from None
        return
    warnings.warn(
        f"{path}: its per-pixel head predicts colour-coupling maps, which log_scale.channel_coupling={coupling!r} "
        "drops; its log-scales were trained as conditional scales (each channel's given the earlier ones), so "
        "fine-tuning starts from scales fitted to the coupled residuals", stacklevel=3,
    )
    model.remove_coupling_maps()  # a calibration goes too, with its own warning


def build_nll(cfg: Config, model: AutoencoderKL) -> HeteroscedasticNLL:
    """The ``HeteroscedasticNLL`` of ``cfg.log_scale`` for ``model``: ``channels`` = the model's output
    channels; for ``"pixel"`` its ``init`` is the model head's bias, which a loaded head may have changed.

    Raises:
        ValueError: ``"pixel"`` granularity but ``model`` has no log-scale head.
    """
    init = None
    if cfg.log_scale.granularity == "pixel":
        if not model.has_log_scale_head:
            raise ValueError(
                "log_scale.granularity is 'pixel' but the model has no log-scale head; build it with build_model(cfg)"
            )
        init = model.config.log_scale_init
    if (cfg.log_scale.channel_coupling == "pixel") != model.config.log_scale_coupling:
        has = "predicts" if model.config.log_scale_coupling else "does not predict"
        raise ValueError(
            f"log_scale.channel_coupling is {cfg.log_scale.channel_coupling!r} but the model's head {has} colour-coupling "
            "maps (AutoencoderConfig.log_scale_coupling); build the model with build_model(cfg) from a config with the "
            "same channel_coupling"
        )
    return nll_from_config(cfg.log_scale, model.config.out_channels, init=init)


def build_objective(cfg: Config, model: AutoencoderKL) -> AutoencoderObjective:
    """The training objective of ``cfg`` for ``model`` (from :func:`build_model`).

    - ``HeteroscedasticNLL`` from the ``log_scale`` section (``channels`` = the model's output
      channels; for ``"pixel"`` its ``init`` is the model head's bias, which a loaded head may
      have changed).
    - ``LPIPS`` when ``objective.perceptual_weight > 0``: ``perceptual_weights`` ``"auto"`` or
      ``"random"`` as in :class:`hetvae.perceptual.LPIPS`; any other value is a local VGG16
      weights file (the calibration then comes from the ``lpips`` package).
    - ``NLayerDiscriminator`` (``disc_layers``, ``disc_norm``) when ``objective.disc_start`` is set.

    Raises:
        ValueError: ``"pixel"`` granularity but ``model`` has no log-scale head.
    """
    obj = cfg.objective
    nll = build_nll(cfg, model)
    perceptual = None
    if obj.perceptual_weight > 0:
        if obj.perceptual_weights in ("auto", "random"):
            perceptual = LPIPS(weights=obj.perceptual_weights)
        else:
            perceptual = LPIPS(weights="auto", vgg_path=obj.perceptual_weights)
    discriminator = None
    if obj.disc_start is not None:
        discriminator = NLayerDiscriminator(
            in_channels=model.config.out_channels, n_layers=obj.disc_layers, norm=obj.disc_norm
        )
    return AutoencoderObjective(
        nll=nll,
        perceptual=perceptual,
        perceptual_weight=obj.perceptual_weight,
        perceptual_mode=obj.perceptual_mode,
        kl_weight=obj.kl_weight,
        discriminator=discriminator,
        disc_start=obj.disc_start if obj.disc_start is not None else 0,
        disc_factor=obj.disc_factor,
        disc_weight=obj.disc_weight,
        disc_loss=obj.disc_loss,
    )


def model_nll(model: AutoencoderKL, path: str | Path | None = None) -> HeteroscedasticNLL:
    """The likelihood a model is scored with outside its run folder: the one recorded with it
    (``config.likelihood``); else, with a head, its map under the default bounds (Laplace); else the
    closed-form best constant scale of each image. ``path``: where the model was read, for messages."""
    likelihood = model.config.likelihood
    where = f"{path}: " if path is not None else ""
    if likelihood is not None and likelihood.granularity != "pixel" and model.has_log_scale_head:
        # a head grafted by an older convert beside a global/channel record: the head is the scale
        likelihood = grafted_record(likelihood, model.config.log_scale_init)
    if likelihood is not None:  # recorded with the model: score it as it was trained
        if likelihood.granularity == "pixel" and not model.has_log_scale_head:
            missing = f"; an exported head lives beside the weights as {expected_head_file(path)}, which is missing" if path else ""
            raise ValueError(f"{where}the model was trained with a per-pixel likelihood but has no log-scale head{missing}")
        try:
            return nll_from_likelihood(likelihood, model.config.out_channels)
        except ValueError as e:
            raise ValueError(f"{where}the recorded likelihood is not usable ({e})") from e
    if model.has_log_scale_head:
        return HeteroscedasticNLL("pixel", channels=model.config.out_channels, init=model.config.log_scale_init)
    return HeteroscedasticNLL("global", channels=model.config.out_channels, fit="optimal")
