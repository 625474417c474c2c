"""Run configuration: the sections of a run's YAML file, reading and writing it.

A config is a :class:`Config` with five sections (``model``, ``log_scale``, ``objective``,
``data``, ``train``) and ``out_dir``. The rules:

- A YAML file may set any subset of keys, at any depth; every key it leaves out keeps its
  default. A fine-tuning config is therefore a few lines on top of the defaults.
- Every value is checked and coerced by :mod:`hetvae.schema` (a :class:`ConfigError` naming the
  full dotted key, what was expected and what was found). Range checks (``lr > 0``, ``beta`` in [0, 1], ...) name the key the same way.
- An unknown key is an error that names it, suggests the closest valid key and lists them all.
- ``--set section.key=value`` overrides (:func:`apply_overrides`) parse ``value`` as YAML and go
  through the same checks.
- Files are read with ``yaml.safe_load`` only: tags such as ``!!python/object`` are refused.
- :func:`save_config` writes the resolved config (every key) so a run folder is self-describing.

Paths (``data.path``, ``model.init_from``) are not checked for existence here: a config may be
written on one machine and run on another; the builders check them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from fractions import Fraction
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from hetvae.files import atomic_write_text
from hetvae.heads import DEFAULT_MARGIN, LOG_SCALE_LIMIT
from hetvae.hub import is_hub_id
from hetvae.schema import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    deep_merge,
    from_dict,
    join_key,
    require,
    require_finite,
    require_path,
    section_null_detail,
    show_value,
)

__all__ = [
    "BASE_KEY",
    "RESOLVED_HEADER",
    "MAX_BASE_DEPTH",
    "Config",
    "ConfigError",
    "DataConfig",
    "LogScaleConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "final_batch_size",
    "load_config",
    "require_crop_sides",
    "config_text",
    "save_config",
    "with_absolute_paths",
]


Granularity = Literal["global", "channel", "pixel"]
Family = Literal["laplace", "gaussian"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True)
class ModelConfig:
    """The autoencoder: where it starts from and, for a fresh one, its architecture.

    Attributes:
        init_from: ``"scratch"``: a new model built from the fields below. Otherwise a path that
            ``load_autoencoder`` accepts (diffusers folder, SD/ldm single file, hetvae folder) or a
            Hugging Face Hub id (``org/name``, ``org/name/vae``, ``org/name/file.safetensors``,
            ``@revision``), which stays as written in the run's config; the architecture is then
            the checkpoint's, and the fields below are not used.
        in_channels, out_channels: image channels.
        block_out_channels: channels per resolution level; the image is down-sampled by
            ``2 ** (len(block_out_channels) - 1)`` (SD: ``(128, 256, 512, 512)``, 8x).
        layers_per_block: ResNet blocks per level (the decoder has one more, as in SD).
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        latent_channels: channels of the latent ``z``.
        use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (SD: both).
        mid_block_attention: self-attention in the middle blocks.
        scaling_factor, shift_factor: ``z_diffusion = (z - shift) * scale``; metadata for
            diffusion models, unused by the autoencoder itself. ``None`` (the default): the
            checkpoint's own value for a loaded model (stored in it, else inferred from its family:
            an SDXL VAE looks like SD 1.x, so set 0.13025 for it), and 0.18215 / 0.0 from scratch.
            A value set here always wins, for a loaded model too.
    """

    init_from: str = "scratch"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        require(bool(self.init_from.strip()), "init_from", "must be 'scratch' or a checkpoint path, got ''")
        require_path(self.init_from, "init_from")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(len(self.block_out_channels) >= 1, "block_out_channels", "must list at least one level")
        for i, c in enumerate(self.block_out_channels):
            require(
                c >= 1 and c % self.norm_num_groups == 0,
                f"block_out_channels[{i}]",
                f"must be a positive multiple of norm_num_groups={self.norm_num_groups}, got {c}",
            )
        require(
            self.scaling_factor is None or self.scaling_factor > 0,
            "scaling_factor",
            f"must be > 0 or null, got {self.scaling_factor}",
        )

    @property
    def downsample_factor(self) -> int:
        """Side of the image divided by the side of the latent."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(kw_only=True)
class LogScaleConfig:
    """The reconstruction likelihood's log-scale (``log b`` for Laplace, ``log sigma`` for Gaussian).

    Attributes:
        granularity: ``"global"`` one scalar (SD's ``logvar``), ``"channel"`` one per channel,
            ``"pixel"`` a map predicted by the decoder's log-scale head.
        family: ``"laplace"`` (L1, SD's choice) or ``"gaussian"`` (L2).
        init: initial log-scale; must lie strictly inside ``bounds``.
        bounds: ``(lo, hi)`` of the soft clamp on the log-scale.
        beta: beta-NLL exponent (Seitzer et al. 2022); 0 = plain NLL, 1 = the mean gets the
            plain L1/L2 gradient.
        fit: ``"learned"`` by gradient descent, or ``"optimal"``: the closed-form maximum-likelihood
            scale of the current batch (global / channel only; per pixel it would be the error
            itself).
        shared: pixel only: one map for all channels instead of one per channel.
        detach_features: pixel only: the head sees detached decoder features, so the NLL cannot
            shape the decoder through it.
        head_layers: pixel only: hidden 3x3 conv + SiLU layers before the head's output conv
            (0: the single conv on the decoder's last features).
        head_channels: pixel only: their width (null: the decoder's full-resolution width).
        head_sees_mean: pixel only: the head also reads the (detached) mean output.
        head_sees_latent: pixel only: the head also reads the decoder's input latent, up-sampled
            to full resolution (detached with ``detach_features``): detail the code holds that
            the decoder cannot draw.
        head_sees_edges: pixel only: the head also reads the log of the mean's local gradient
            magnitude (``hetvae.autoencoder.log_edge_magnitude``, computed on the detached mean):
            the level of detail drawn around each pixel, on a scale that carries over to images
            with more detail than the training crops.
        faithful: pixel and channel: the mean gets the gradient of the NLL with one scale, the
            average of the map (of the channel scales), exactly what a global scale would give
            it, and the head (the channel scales) gets the NLL around the stopped mean (Stirn et
            al. 2023). The loss value is the per-pixel (per-channel) NLL. Ignored for ``global``
            (one scale gives the mean that gradient anyway), so one config serves every
            granularity.
        mean_scale: with ``faithful``, the scale the mean's gradient sees: ``"map"`` the map's
            (the channel scales') stopped level, ``log mean exp(s)``; ``"global"`` a learned global
            log-scale of its own (initialised at ``init``), trained exactly as granularity
            ``global`` trains its scale. With ``train.head_grad_clip`` set the autoencoder then
            takes the very steps of its global twin (``--set log_scale.granularity=global``), so
            both reconstruct alike and only the map differs. Ignored for ``global``.
        include_constant: add the density's constant (``log 2`` / ``0.5 log 2 pi``) so the loss is
            a true NLL (needed for bits/dim; irrelevant to the gradients).
        trainable: global / channel: ``false`` freezes the learned log-scale at ``init`` (not in the
            optimiser, no gradient), as SD, whose optimiser never held its ``logvar``
            (configs/sd-reference.yaml). Pixel granularity refuses it (the head is the model's).
        channel_coupling: ``"none"`` the colour channels are independent given the mean;
            ``"global"`` channel ``k`` is centred at ``mu_k + sum_{j before k} a_kj (x_j - mu_j)``
            with ``C (C - 1) / 2`` learned coefficients of the loss (any granularity);
            ``"pixel"`` the per-pixel head predicts the coefficients too (granularity ``pixel``
            only), bounded to ``(-COUPLING_LIMIT, COUPLING_LIMIT)``. The log-scale is then each
            channel's scale given the earlier ones (docs/math.md, "Coupled colour channels").
        coupling_order: with coupling, the channel order, earliest first (null: the measured
            default, ``DEFAULT_COUPLING_ORDER``: R -> B -> G for ``global`` coupling of 3 channels,
            ``0, 1, ..., C-1`` otherwise; the resolved config names it).
    """

    granularity: Granularity = "global"
    family: Family = "laplace"
    init: float = 0.0
    bounds: tuple[float, float] = (-7.0, 3.0)
    beta: float = 0.0
    fit: Literal["learned", "optimal"] = "learned"
    shared: bool = False
    detach_features: bool = False
    head_layers: int = 0
    head_channels: int | None = None
    head_sees_mean: bool = False
    head_sees_latent: bool = False
    head_sees_edges: bool = False
    faithful: bool = False
    mean_scale: Literal["map", "global"] = "map"
    include_constant: bool = False
    trainable: bool = True
    channel_coupling: Literal["none", "global", "pixel"] = "none"
    coupling_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        lo, hi = self.bounds
        require(
            math.isfinite(lo) and math.isfinite(hi) and lo < hi, "bounds", f"needs finite lo < hi, got {self.bounds}"
        )
        require(
            -LOG_SCALE_LIMIT <= lo and hi <= LOG_SCALE_LIMIT, "bounds",
            f"must lie inside [{-LOG_SCALE_LIMIT}, {LOG_SCALE_LIMIT}] (exp(-s) must not overflow), got {self.bounds}",
        )
        require(
            hi - lo > 2 * DEFAULT_MARGIN, "bounds",
            f"need hi - lo > {2 * DEFAULT_MARGIN} (the soft clamp's margin on each side), got {self.bounds}",
        )
        require(
            self.fit == "optimal" or lo + DEFAULT_MARGIN <= self.init <= hi - DEFAULT_MARGIN, "init",
            f"must lie in [{lo + DEFAULT_MARGIN}, {hi - DEFAULT_MARGIN}], at least the soft clamp's margin "
            f"{DEFAULT_MARGIN} inside bounds {self.bounds}, where the bounded log-scale starts exactly at init; "
            f"got {self.init} (widen log_scale.bounds to use it)",
        )
        require(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        require(self.head_layers >= 0, "head_layers", f"must be >= 0, got {self.head_layers}")
        require(
            self.head_channels is None or self.head_channels >= 1,
            "head_channels",
            f"must be >= 1 or null, got {self.head_channels}",
        )
        require(
            not (self.faithful and self.beta > 0 and self.granularity != "global"),
            "faithful",
            "and beta > 0 both reweight the mean's gradient; use one of them",
        )
        require(
            self.mean_scale == "map" or self.faithful or self.granularity == "global",
            "mean_scale",
            "'global' names the scale the mean's gradient sees under log_scale.faithful; set faithful: true",
        )
        require(
            not (self.fit == "optimal" and self.granularity == "pixel"),
            "fit",
            "'optimal' is for granularity 'global' or 'channel' (per pixel it is the error itself)",
        )
        require(
            self.trainable or self.granularity != "pixel",
            "trainable",
            "false freezes a global or channel log-scale; the per-pixel map comes from the decoder's head, "
            "which is trained with the model (set log_scale.trainable=true for granularity 'pixel')",
        )
        require(
            self.channel_coupling != "pixel" or self.granularity == "pixel",
            "channel_coupling",
            f"'pixel' has the decoder's per-pixel head predict the coefficients, which needs granularity 'pixel'; "
            f"got granularity {self.granularity!r} (use channel_coupling: global for one set of coefficients)",
        )
        require(
            self.channel_coupling != "pixel" or not self.shared,
            "channel_coupling",
            "'pixel' needs one log-scale map per channel (the conditional scale of each); set log_scale.shared=false",
        )
        if self.coupling_order is not None:
            order = tuple(self.coupling_order)
            require(
                self.channel_coupling != "none", "coupling_order",
                f"orders the coupled channels; got {list(order)} with channel_coupling 'none' (set channel_coupling)",
            )
            require(
                sorted(order) == list(range(len(order))) and len(order) >= 2, "coupling_order",
                f"must name each channel once, earliest first, e.g. [0, 1, 2] (R -> G -> B) or [1, 0, 2]; "
                f"got {list(order)}",
            )


DEFAULT_COUPLING_ORDER: dict[tuple[str, int], tuple[int, ...]] = {("global", 3): (0, 2, 1)}
"""``log_scale.coupling_order`` when the config leaves it null, by ``(channel_coupling, channels)``;
otherwise ``0, 1, ..., C-1``. Measured (docs/results.md#channel-order, ``benchmarks/coupling_order.py``):
global coefficients fitted to trained uncoupled models on unseen photographs do best with G last
(R -> B -> G beat R -> G -> B on 6 of 6 models, by 0.006-0.033 bits/dim, and so did a model trained
so); a per-pixel head trained in R -> B -> G scored 0.014-0.048 bits/dim worse than in R -> G -> B
on 3 of 3 seeds, so ``pixel`` keeps R -> G -> B."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Weights of the terms besides the NLL: KL, LPIPS and the PatchGAN.

    Attributes:
        kl_weight: weight of the posterior KL (SD: 1e-6).
        perceptual_weight: weight of LPIPS (SD: 1.0); 0 skips it (the CPU demo default).
        perceptual_mode: ``"sd"`` LPIPS added to the L1 inside the NLL (SD's recipe),
            ``"spatial"`` the per-pixel LPIPS map added there, ``"separate"`` LPIPS as its own term.
        perceptual_weights: ``"auto"`` (released LPIPS weights, downloaded once), ``"random"``
            (for tests) or a local path.
        disc_start: step at which the discriminator starts; ``None``: no discriminator.
        disc_weight: the adaptive GAN weight's multiplier (SD: 0.5).
        disc_factor: GAN term factor once started (SD: 1.0).
        disc_loss: ``"hinge"`` or ``"vanilla"`` (softplus).
        disc_layers: PatchGAN depth (SD: 3).
        disc_norm: ``"batch"`` (SD's default) or ``"actnorm"``.
    """

    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_mode: Literal["sd", "spatial", "separate"] = "sd"
    perceptual_weights: str = "auto"
    disc_start: int | None = None
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: int = 3
    disc_norm: Literal["batch", "actnorm"] = "batch"

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, f"must be finite and >= 0, got {value}")
        require(
            bool(self.perceptual_weights.strip()), "perceptual_weights", "must be 'auto', 'random' or a path"
        )
        require_path(self.perceptual_weights, "perceptual_weights")
        require(
            self.disc_start is None or self.disc_start >= 0,
            "disc_start",
            f"must be >= 0 or null, got {self.disc_start}",
        )
        require(self.disc_layers >= 1, "disc_layers", f"must be >= 1, got {self.disc_layers}")


@dataclass(kw_only=True)
class DataConfig:
    """Training images (see ``hetvae.data.build_dataset``).

    Attributes:
        path: where the training images are; ``None``: scikit-image's bundled sample
            photographs (``hetvae.images.sample_images``). One of, or a list of: a folder (searched
            recursively), an image file, a text file listing image paths one a line (``.txt``),
            webdataset tar shards (``"shards/train-{000000..000099}.tar"``, streamed), or a
            Hugging Face dataset (a ``save_to_disk`` folder, or ``.parquet`` files) whose
            ``image_column`` holds the images.
        resolution: square crop side in pixels; a multiple of 8 and of the model's
            down-sampling factor.
        random_crop, random_flip: training augmentation (evaluation always centre-crops).
        num_workers: ``DataLoader`` worker processes; ``"auto"``: 0 for images held in memory
            (the bundled photographs), otherwise ``min(4, cores this process may use)``.
        split: which sample photographs train the model when ``path`` is ``None``
            (``"train"`` keeps the ``"test"`` ones held out).
        samples_per_epoch: crops per epoch (cycling through the images); ``None``: one per image.
        eval_crop: evaluation crops: ``"center"`` one per image, ``"tiles"`` every
            non-overlapping tile (many more pixels, steadier metrics).
        rescale: ``[lo, hi]`` with ``0 < lo <= hi <= 1``: training crops see a window ``1/scale``
            times larger shrunk to ``resolution`` (antialiased), ``scale ~ U(lo, hi)``; ``None``: off.
        color_jitter: strength of the mild colour jitter of training crops (brightness, contrast,
            saturation, hue; 0 = off, 0.1 mild). See ``hetvae.data.jitter_colors``.
        tint_gray: probability that a grey training crop (every crop of a grayscale photograph)
            gets a random colour tint first (``hetvae.data.tint_gray``); 0 = grey stays grey.
        procedural: fraction of training crops taken from procedural colour dead-leaves images
            (``hetvae.procedural``) instead of the photographs; 0 = photographs only.
        cache_mb: decoded image files of ``path`` kept in memory, in megabytes per process (each
            ``num_workers`` worker holds its own cache); 0 decodes a file for every crop.
        image_column: the column of a Hugging Face dataset that holds the images.
        shuffle_shards: tar shards are streamed in a random order each epoch, and the samples of
            each group of this many consecutive shards are shuffled together (the shuffle buffer).
        val_path: held-out images scored whole every ``train.val_every`` steps, and the source of
            the sample panels: a folder (recursive), an image file, a ``.txt`` list file, or a list
            of these (``hetvae.images.load_images``); ``None``: with ``path`` unset the bundled
            photographs' held-out split, else no validation.
    """

    path: str | list[str] | None = None
    resolution: int = 64
    random_crop: bool = True
    random_flip: bool = True
    num_workers: int | Literal["auto"] = "auto"
    split: Literal["all", "train", "test"] = "train"
    samples_per_epoch: int | None = None
    eval_crop: Literal["center", "tiles"] = "center"
    rescale: tuple[float, float] | None = None
    color_jitter: float = 0.0
    tint_gray: float = 0.0
    procedural: float = 0.0
    cache_mb: float = 1024.0
    image_column: str = "image"
    shuffle_shards: int = 4
    val_path: str | list[str] | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        paths = self.path if isinstance(self.path, list) else [self.path] if self.path is not None else []
        require(self.path != [], "path", "an empty list; use null for the bundled sample photographs")
        require(all(p.strip() for p in paths), "path", "contains an empty path")
        for p in paths:
            require_path(p, "path")
        val = self.val_path if isinstance(self.val_path, list) else [self.val_path] if self.val_path is not None else []
        require(self.val_path != [], "val_path", "an empty list; use null for no validation images")
        for p in val:
            require(bool(p.strip()), "val_path", "contains an empty path")
            require_path(p, "val_path")
        require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "resolution",
            f"must be a positive multiple of 8, got {self.resolution}",
        )
        require(
            self.num_workers == "auto" or self.num_workers >= 0,
            "num_workers",
            f"must be >= 0 or 'auto', got {self.num_workers}",
        )
        require(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            "samples_per_epoch",
            f"must be >= 1 or null, got {self.samples_per_epoch}",
        )
        if self.rescale is not None:
            lo, hi = self.rescale
            require(0 < lo <= hi <= 1, "rescale", f"needs 0 < lo <= hi <= 1, got {list(self.rescale)}")
        require(0 <= self.color_jitter <= 1, "color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        require(0 <= self.tint_gray <= 1, "tint_gray", f"must be a probability in [0, 1], got {self.tint_gray}")
        require(0 <= self.procedural <= 1, "procedural", f"must be a fraction in [0, 1], got {self.procedural}")
        require(self.cache_mb >= 0, "cache_mb", f"must be >= 0 (megabytes; 0 turns the cache off), got {self.cache_mb}")
        require(self.image_column.strip() != "", "image_column", "must name a column, got an empty string")
        require(self.shuffle_shards >= 1, "shuffle_shards", f"must be >= 1 (shards), got {self.shuffle_shards}")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop.

    Attributes:
        steps: optimizer steps.
        batch_size: images per micro-batch; the effective batch is ``batch_size * grad_accum``.
        lr, betas, weight_decay: AdamW (SD used betas ``(0.5, 0.9)`` with its GAN).
        warmup_steps: linear learning-rate warm-up from 0.
        lr_schedule: after the warm-up, ``"constant"`` keeps ``lr``; ``"cosine"`` decays it to 0
            at ``steps`` along a half cosine (short runs end better converged).
        grad_accum: micro-batches per optimizer step.
        ema_decay: decay of an exponential moving average of the weights; ``None``: no EMA.
        precision: ``"fp32"``, or autocast to ``"bf16"`` / ``"fp16"`` (fp16 with a grad scaler).
        grad_clip: max global gradient norm; ``None``: no clipping.
        head_grad_clip: with a value, the log-scale's parameters (the per-pixel head's layers and
            bias, the global / per-channel scale) are clipped to this norm on their own and
            ``grad_clip`` covers the autoencoder alone; ``None``: one norm over all of them. Clipping
            is active on nearly every step of a from-scratch run (norms of ~1e4 against 1), so in
            one norm the map's gradient rescales the mean's step by step: a change to the head's
            training then re-draws the mean. Apart, with ``log_scale.faithful`` and
            ``detach_features``, the mean's update no longer depends on the head at all.
        decoder_only: train only the decoder (and log-scale), keeping the latent space fixed.
        head_only: train only the per-pixel log-scale head, on a loaded VAE (``model.init_from``) that
            stays frozen whole: encoder, decoder and quant convs get no gradient and no optimiser
            state, so the model's decode stays the loaded one bit for bit. The head reads the frozen
            decoder's features (and whatever ``log_scale.head_sees_*`` adds). Needs granularity
            ``pixel``, no EMA, no LPIPS and no discriminator (they only move the mean). The run
            also writes the head alone, with a record of the base model
            (``log_scale_head.safetensors``, :func:`hetvae.attach.save_log_scale_head`).
        zero_init_residual: a model built from scratch starts with the last convolution of every
            ResNet block at zero, so each block is the identity at step 0 (as in ADM / guided
            diffusion's ``zero_module``): a deep GroupNorm network trains markedly faster in a short
            run. Loaded models are not touched.
        init_logvar: a model built from scratch starts with its posterior's log-variance near
            this value (:meth:`AutoencoderKL.init_posterior_logvar`); ``None``: PyTorch's init,
            log-variance ~0, i.e. latent noise of std ~1, which the reconstruction loss shrinks only
            slowly (the KL at SD's weight 1e-6 barely pushes back). SD's trained VAEs end with a
            small posterior variance. In a 900-step CPU run it helped two seeds of three and made
            the third fail on whole images (CHANGELOG.md), so no shipped config uses it.
            Loaded models are not touched.
        init_chroma_gain: a model built from scratch starts with its encoder's first convolution
            reading the input's chroma (RGB minus its grey component) this many times amplified
            (:meth:`AutoencoderKL.amplify_input_chroma`); ``None``: PyTorch's init. Chroma is a
            small share of a photograph's variance, so a plain init learns colour last and
            reconstructs saturated colours washed out. Loaded models are not touched.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        seed: seeds the model init and the data crops.
        checkpoint_every, sample_every, log_every: intervals in steps; 0 disables. A
            ``metrics.jsonl`` record holds the losses averaged over the interval, and the
            likelihood diagnostics (``bpd``, ``nll_per_dim``, ``log_scale_*``) of its last step,
            the only step that computes them.
        keep_checkpoints: how many recent checkpoints to keep; 0 keeps all.
        max_nonfinite: consecutive non-finite steps skipped before training stops with an error.
        resume: ``"auto"`` continues from the latest checkpoint in ``out_dir`` if there is one;
            ``"never"`` always starts fresh.
        disc_lr: discriminator learning rate; ``None``: ``lr``.
        log_scale_lr: learning rate of the log-scale *offsets* (the global / per-channel log-scale
            parameters, and the per-pixel head's bias); ``None``: ``lr``. Adam moves a scalar by
            about its learning rate per step, so at a typical autoencoder lr (1e-4) a log-scale
            starting at 0 needs tens of thousands of steps to reach ``log|error| ~ -3``; this lets it
            get there in hundreds without touching the network's lr.
        head_lr: learning rate of the per-pixel head's layers (its hidden convs and the output
            conv's weight; the bias is an offset and takes ``log_scale_lr``); ``None``: ``lr``. With
            ``log_scale.faithful`` and ``detach_features`` the head's loss never reaches the mean;
            with ``head_grad_clip`` too, a larger value only lets the map keep up with the mean it
            judges (under one clipping norm it also re-draws the mean).
        head_steps: after ``steps``, this many more steps train only the log-scale (the per-pixel
            head's layers, or the global / per-channel scale) on the frozen autoencoder: the EMA
            weights when there is an EMA, so the map learns the errors of the very mean that is
            exported. The learning rate restarts at each group's value and follows ``lr_schedule``
            over these steps (no warm-up); the discriminator does not train. With
            ``log_scale.faithful`` and ``detach_features`` the head never shaped the mean, so this
            only lets it finish judging the converged one (the situation of a head grafted onto a
            pretrained VAE). 0: no such phase (as in the shipped configs; CHANGELOG.md says why).
            Needs a log-scale with parameters: ``log_scale.fit: learned`` and ``trainable: true``
            (checked by :class:`Config`).
        final_steps, final_resolution: the last ``final_steps`` of the ``steps`` (and the
            ``head_steps`` after them) train on crops of ``final_resolution`` px instead of
            ``data.resolution``, in batches of ``batch_size * (data.resolution / final_resolution) ** 2``
            images, which must be a whole number (checked by :class:`Config`): the same pixels per step. GroupNorm normalises over the whole image, so a model
            trained only on small crops meets other statistics on a whole photograph; a short
            phase on large crops adapts it (CHANGELOG.md: +0.4 to +0.6 dB on whole unseen
            photographs for 32 px training crops). With ``objective`` reductions that sum over pixels
            (SD's) the loss per image grows with the crop; ``grad_clip`` keeps the step size. 0 /
            ``None``: off.
        device: where training runs: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. Under torchrun, ``"auto"``/``"cuda"`` put each process on
            the GPU of its ``LOCAL_RANK``; ``"cpu"`` trains with gloo.
        val_every: steps between validations on ``data.val_path`` (whole images, the metrics of
            ``hetvae eval``) written to ``metrics.jsonl`` (``val_*``) and the loggers; 0 disables.
        keep_best: with validation, ``best/`` in the run folder holds the export (a run folder of
            its own) of the step with the lowest validation bits/dim.
        logger: where scalars go besides ``metrics.jsonl``: ``"tensorboard"`` (``tensorboard/``,
            when the package is installed), ``"wandb"`` (Weights & Biases; ``WANDB_MODE=offline``
            works offline), ``"none"``, or a list of them (diffusers' ``--report_to``).
    """

    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = 1
    ema_decay: float | None = None
    precision: Precision = "fp32"
    grad_clip: float | None = 1.0
    head_grad_clip: float | None = None
    decoder_only: bool = False
    head_only: bool = False
    zero_init_residual: bool = False
    init_logvar: float | None = None
    init_chroma_gain: float | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 200
    sample_every: int = 200
    log_every: int = 20
    keep_checkpoints: int = 2
    max_nonfinite: int = 10
    resume: Literal["never", "auto"] = "auto"
    disc_lr: float | None = None
    log_scale_lr: float | None = None
    head_lr: float | None = None
    head_steps: int = 0
    final_steps: int = 0
    final_resolution: int | None = None
    device: str = "auto"
    val_every: int = 0
    keep_best: bool = False
    logger: Literal["tensorboard", "wandb", "none"] | list[Literal["tensorboard", "wandb"]] = "tensorboard"

    def __post_init__(self) -> None:
        require_finite(self)
        require(self.logger != [], "logger", "an empty list; use 'none' for metrics.jsonl alone")
        require(
            not isinstance(self.logger, list) or len(set(self.logger)) == len(self.logger),
            "logger", f"names a logger twice: {self.logger}",
        )
        require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
            "device",
            f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        for name in ("steps", "batch_size", "grad_accum"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "head_steps", "final_steps", "seed", "checkpoint_every", "sample_every", "log_every",
                     "keep_checkpoints", "max_nonfinite", "val_every"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        # torch seeds are 64-bit, and the posterior noise is seeded with seed + 1
        require(self.seed < 2**64 - 1, "seed", f"must be < 2**64 - 1, got {self.seed}")
        for name in ("lr", "disc_lr", "log_scale_lr", "head_lr"):
            value = getattr(self, name)
            ok = value is None or (math.isfinite(value) and value > 0)
            require(ok, name, f"must be finite and > 0, got {value}")
        for i, b in enumerate(self.betas):
            require(0.0 <= b < 1.0, f"betas[{i}]", f"must be in [0, 1), got {b}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(
            self.init_chroma_gain is None or (math.isfinite(self.init_chroma_gain) and self.init_chroma_gain > 0),
            "init_chroma_gain",
            f"must be finite and > 0 (1 changes nothing) or null, got {self.init_chroma_gain}",
        )
        require(
            self.init_logvar is None or -30.0 <= self.init_logvar <= 20.0,
            "init_logvar",
            f"must be in [-30, 20] (the posterior's log-variance clamp) or null, got {self.init_logvar}",
        )
        require(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "ema_decay",
            f"must be in (0, 1) or null, got {self.ema_decay}",
        )
        for name in ("grad_clip", "head_grad_clip"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        require(
            self.final_steps <= self.steps,
            "final_steps",
            f"counts the last of train.steps={self.steps} and must not exceed them, got {self.final_steps} "
            "(lower it with the steps, or set 0 to train on data.resolution crops throughout)",
        )
        require(
            self.final_resolution is None or (self.final_resolution >= 8 and self.final_resolution % 8 == 0),
            "final_resolution",
            f"must be a positive multiple of 8 or null, got {self.final_resolution}",
        )
        require(
            self.final_steps == 0 or self.final_resolution is not None,
            "final_resolution",
            f"must be set when train.final_steps={self.final_steps} > 0 (the crop side of those steps)",
        )


@dataclass(kw_only=True)
class Config:
    """A whole run: the five sections plus ``out_dir``, the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    log_scale: LogScaleConfig = field(default_factory=LogScaleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"

    def __post_init__(self) -> None:
        require_path(self.out_dir, "out_dir")
        # the head-only phase needs a log-scale with parameters to train
        require(
            self.train.head_steps == 0 or self.log_scale.fit == "learned",
            "train.head_steps",
            f"trains only the log-scale, which log_scale.fit=optimal computes in closed form from each batch "
            f"(there is nothing to train); got {self.train.head_steps} (set log_scale.fit=learned, or "
            "train.head_steps=0)",
        )
        require(
            self.train.head_steps == 0 or self.log_scale.trainable,
            "train.head_steps",
            f"trains only the log-scale, which log_scale.trainable=false freezes; got {self.train.head_steps} "
            "(set log_scale.trainable=true, or train.head_steps=0)",
        )
        ls, channels = self.log_scale, self.model.out_channels
        require(
            ls.channel_coupling == "none" or channels >= 2, "log_scale.channel_coupling",
            f"couples colour channels; model.out_channels={channels} has none to couple (set channel_coupling: none)",
        )
        require(
            ls.coupling_order is None or len(ls.coupling_order) == channels, "log_scale.coupling_order",
            f"must name each of the model.out_channels={channels} channels once; got {list(ls.coupling_order or ())}",
        )
        if ls.channel_coupling != "none" and ls.coupling_order is None:
            ls.coupling_order = DEFAULT_COUPLING_ORDER.get((ls.channel_coupling, channels), tuple(range(channels)))
        self._require_whole_final_batch()
        if self.train.head_only:
            self._require_head_only()
        if self.model.init_from == "scratch":
            factor = self.model.downsample_factor
            require_crop_sides(self, factor, f"the model's down-sampling factor {factor} "
                                              "(2 ** (len(model.block_out_channels) - 1))")

    def _require_head_only(self) -> None:
        """``train.head_only`` trains the per-pixel head of a loaded, frozen VAE: nothing else may train."""
        ls, obj, t = self.log_scale, self.objective, self.train
        why = "train.head_only=true trains only the per-pixel log-scale head of a frozen VAE"
        require(self.model.init_from != "scratch", "model.init_from",
                f"must name the VAE to train a head for (a diffusers folder, SD file or hetvae run): {why}, "
                "and a model built from scratch would stay random")
        require(ls.granularity == "pixel", "log_scale.granularity",
                f"must be 'pixel' with train.head_only=true ({why}); got {ls.granularity!r}")
        require(obj.perceptual_weight == 0, "objective.perceptual_weight",
                f"must be 0 with train.head_only=true: LPIPS only moves the mean, which is frozen; got "
                f"{obj.perceptual_weight}")
        require(obj.disc_start is None, "objective.disc_start",
                f"must be null with train.head_only=true: the discriminator only moves the mean, which is frozen; "
                f"got {obj.disc_start}")
        require(t.ema_decay is None, "train.ema_decay",
                f"must be null with train.head_only=true: the frozen weights need no average, and the run "
                f"exports the head as trained; got {t.ema_decay}")
        require(ls.mean_scale == "map", "log_scale.mean_scale",
                "'global' trains a scale for the mean's gradient, which train.head_only=true freezes; set 'map'")

    def _require_whole_final_batch(self) -> None:
        """The last ``train.final_steps`` train on batches of ``batch_size * (resolution /
        final_resolution) ** 2`` crops (the same pixels per step): that must be a whole number."""
        t = self.train
        if not t.final_steps or t.final_resolution is None:
            return
        crops = _final_crops(self)
        if crops.denominator == 1:
            return
        # the batch sizes that give whole batches are the multiples of this one
        step = t.final_resolution**2 // math.gcd(t.final_resolution**2, self.data.resolution**2)
        raise ConfigError(
            "train.final_resolution",
            f"gives the last train.final_steps={t.final_steps} steps batches of train.batch_size * "
            f"(data.resolution / train.final_resolution)^2 = {t.batch_size} * ({self.data.resolution} / "
            f"{t.final_resolution})^2 = {crops.numerator}/{crops.denominator} = {float(crops):.4g} crops, which must "
            f"be a whole number (the same pixels per step); set train.batch_size to a multiple of {step}, or a "
            "train.final_resolution that makes it whole",
        )


def _final_crops(cfg: Config) -> Fraction:
    """``batch_size * (data.resolution / final_resolution) ** 2``: the crops of a final-phase step."""
    t = cfg.train
    return Fraction(t.batch_size * cfg.data.resolution**2, t.final_resolution**2)


def final_batch_size(cfg: Config) -> int:
    """The global batch of the last ``train.final_steps``: the pixels of a normal step at
    ``train.final_resolution`` (16 crops of 32 px -> one of 128 px; :class:`Config` refuses a
    batch that is not whole)."""
    return int(_final_crops(cfg))


def require_crop_sides(cfg: Config, factor: int, what: str) -> None:
    """The training crops (``data.resolution``, ``train.final_resolution``) must down-sample
    ``factor`` times to whole latents; ``what`` names the factor in the error."""
    for key, value in (("data.resolution", cfg.data.resolution), ("train.final_resolution", cfg.train.final_resolution)):
        require(value is None or value % factor == 0, key, f"must be a multiple of {what}, got {value}")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


BASE_KEY = "base"
"""Top-level YAML key naming a parent config file (see :func:`load_config`)."""


MAX_BASE_DEPTH = 32
"""Most files a ``base:`` chain may hold (the file given included): a deeper chain is a
:class:`ConfigError` naming its depth and the file where it stopped (a generated chain gone wrong)."""


def _read_yaml_tree(path: Path) -> dict[str, Any]:
    """The mapping in ``path`` merged over its ``base:`` chain (parents first).

    The chain is followed in a loop, not by recursion, so its depth is checked here
    (:data:`MAX_BASE_DEPTH`) and never surfaces as a RecursionError of the YAML reader.
    """
    chain: list[tuple[Path, dict[str, Any]]] = []  # (file, its own keys), the given file first
    seen: list[Path] = []
    while True:
        resolved = path.resolve()
        if resolved in seen:
            cycle = " -> ".join(str(p) for p in (*seen, resolved))
            raise ConfigError(BASE_KEY, f"circular base chain: {cycle}")
        if len(seen) == MAX_BASE_DEPTH:
            raise ConfigError(
                BASE_KEY,
                f"expected a chain of at most {MAX_BASE_DEPTH} files, got a deeper one: {chain[-1][0]} (file "
                f"{MAX_BASE_DEPTH} of the chain from {chain[0][0]}) names yet another base, {path}",
            )
        seen.append(resolved)
        data = _read_one_file(path)
        base = data.pop(BASE_KEY, None)
        chain.append((path, data))
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(BASE_KEY, f"expected a file path, got {show_value(base)} (in {path})")
        _refuse_null_sections(data, path)
        base_path = Path(base).expanduser()  # `base: ~/configs/x.yaml`
        if not base_path.is_absolute():
            base_path = path.parent / base_path  # relative to the file that names it, not the cwd
        if not base_path.exists():
            raise ConfigError(BASE_KEY, f"base config {base_path} does not exist (named in {path})")
        path = base_path
    merged: dict[str, Any] = {}
    for _, data in reversed(chain):
        merged = deep_merge(merged, data)
    return merged


def _read_one_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of YAML file ``path`` (``base:`` still in it)."""
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
        empty = _empty_path_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not a plain YAML file (tags are not accepted): {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer past Python's parsing limit, nesting too deep
        raise ConfigError("", f"{path}: cannot be read as YAML: {type(exc).__name__}: {exc}") from None
    if empty:
        raise ConfigError(
            empty[0],
            f"empty value (in {path}); write null explicitly where null is meant"
            + (" (the bundled sample photographs)" if empty[0] == "data.path" else ""),
        )
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: expected a mapping of keys at the top level, got {show_value(data)}")
    return dict(data)


def _refuse_null_sections(data: Mapping[str, Any], path: Path) -> None:
    """A section left empty (``train:`` with nothing under it) or null in a file with a ``base:``
    would replace the base's section with the defaults: refused, naming the section."""
    for f in fields(Config):
        if is_dataclass(f.default_factory) and f.name in data and data[f.name] is None:
            raise ConfigError(f.name, section_null_detail(
                f.name, f"an empty section in {path}, which has a base",
                f"leave {f.name} out to keep the base's, or list under it only the keys to change",
            ))


# keys whose empty YAML value (`path:` with nothing after it, e.g. a template filled from an unset
# variable) is refused rather than read as null
_PATH_KEYS = (BASE_KEY, "out_dir", "data.path", "data.val_path", "model.init_from", "objective.perceptual_weights")


def _empty_path_keys(node: yaml.Node | None, prefix: str = "") -> list[str]:
    """The dotted :data:`_PATH_KEYS` whose value in the composed YAML ``node`` is an empty plain scalar."""
    found: list[str] = []
    if not isinstance(node, yaml.MappingNode):
        return found
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = join_key(prefix, key_node.value)
        if isinstance(value_node, yaml.MappingNode) and not prefix:
            found += _empty_path_keys(value_node, key)
        elif (
            key in _PATH_KEYS
            and isinstance(value_node, yaml.ScalarNode)
            and value_node.tag == "tag:yaml.org,2002:null"
            and value_node.value == ""
        ):
            found.append(key)
    return found


def _read_text(path: Path) -> str:
    """The text of config file ``path``: a regular UTF-8 file (a folder or a FIFO is an error, not a hang)."""
    if path.is_dir():
        raise ConfigError("", f"{path}: is a folder, not a config file (expected a YAML file)")
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError("", f"{path}: not a regular file (a FIFO, device or socket?); expected a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot be read: {exc}") from None


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its data and weight paths (``data.path``, ``data.val_path``, ``model.init_from``,
    ``objective.perceptual_weights``) made absolute (``~`` expanded, relative to the working folder;
    an ``init_from`` that is a Hub id and no local path stays as it is),
    so that a run's stored config means the same files wherever it is resumed from. The words
    ``scratch``, ``auto`` and ``random`` and an unset ``data.path`` stay as they are."""
    def absolute_paths(paths: str | list[str] | None) -> str | list[str] | None:
        if isinstance(paths, str):
            return _absolute(paths)
        return [_absolute(p) for p in paths] if isinstance(paths, list) else paths

    data_path = absolute_paths(cfg.data.path)
    init_from = cfg.model.init_from
    if init_from != "scratch" and not is_hub_id(init_from):  # a Hub id (org/name) is no local path
        init_from = _absolute(init_from)
    weights = cfg.objective.perceptual_weights
    weights = weights if weights in ("auto", "random") else _absolute(weights)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=data_path, val_path=absolute_paths(cfg.data.val_path)),
        model=dataclasses.replace(cfg.model, init_from=init_from),
        objective=dataclasses.replace(cfg.objective, perceptual_weights=weights),
    )


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file into a :class:`Config`, then apply ``overrides`` (see :func:`apply_overrides`).

    The file may set any subset of keys; the rest keep their defaults (an empty file is the
    default config). It is parsed with ``yaml.safe_load``: tags such as ``!!python/object`` are
    refused. Errors are :class:`ConfigError` naming the dotted key and the file.

    Inheritance: a top-level ``base: other.yaml`` (a path relative to this file; ``~`` is the
    home folder) loads that file first and lays this one over it, section by section: a key set
    here replaces the base's, a list replaces the whole list, keys left out keep the base's value
    (or the default). A section left empty or null in a file with a ``base:`` is an error (it
    would reset the base's section to the defaults). Bases may chain, up to
    :data:`MAX_BASE_DEPTH` files; a cycle is an error. This is how a fine-tuning config stays a
    short override of a training config. The resolved config that :func:`save_config` writes has
    no ``base`` key.
    """
    path = Path(path).expanduser()
    data = _read_yaml_tree(path)
    try:
        cfg = from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.detail} (in {path})") from None
    return apply_overrides(cfg, overrides)


RESOLVED_HEADER = "# hetvae resolved config: every key, defaults included"
"""The first line of every file :func:`save_config` writes (how a run tells its own config.yaml
from a hand-written one)."""


class _Dumper(yaml.SafeDumper):
    """Sections as indented blocks, lists on one line: ``block_out_channels: [32, 64, 128]``."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` (every key, defaults included) to ``path`` as YAML.

    ``load_config(path) == cfg``. Parent folders are created; the file is written atomically
    (:func:`hetvae.files.atomic_write_text`), so a crash never leaves half a config in a run folder.
    """
    return atomic_write_text(path, RESOLVED_HEADER + "\n" + config_text(cfg))


def config_text(cfg: Config) -> str:
    """The resolved ``cfg`` as YAML, every key (what :func:`save_config` writes below its header)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

