"""Predicting with a trained model and measuring its uncertainty on whole images.

:func:`load_predictor` opens either

* a **run folder** written by ``hetvae train`` (``config.yaml``, ``model.safetensors``,
  ``loss.safetensors``): the model plus its trained likelihood, whatever the granularity;
* one of its **training checkpoints** (``checkpoints/step_XXXXXXXX``): the model and likelihood
  the run would have exported at that step (EMA weights when the run keeps them); or
* any **model** :func:`hetvae.convert.load_autoencoder` reads (diffusers folder, SD single file,
  hetvae checkpoint). With a per-pixel head, its map is the scale (soft-bounded with the default
  bounds); without one, the scale is the closed-form global optimum of each image (sigma-VAE), so
  the metrics then describe the mean with the best possible single scale.

:func:`evaluate` pools every element of every image and returns the metrics of
:mod:`hetvae.metrics` under the keys ``hetvae eval`` writes.

Images are streamed: :func:`load_images` lists them up front and decodes one at a time
(:class:`ImageList`), and the pooled metrics keep only what they need of each prediction (the
additive ones as sums; Spearman and AUSE, which rank every element, its float32 |error| and
log-scale: 8 bytes per pixel and channel). An image larger than :data:`AUTO_TILE_PIXELS` is
reconstructed in tiles of :data:`AUTO_TILE_SIZE` pixels unless the predictor says otherwise
(:attr:`Predictor.tile`), and running out of memory is a ``ValueError`` that says to tile.

Outputs never overwrite a file hetvae did not write: PNGs and safetensors files it writes carry
the marker :data:`hetvae.viz.OUTPUT_MARKER`, its JSON and markdown are recognised by their keys
and table header (:func:`is_hetvae_output`), and :func:`load_images` skips hetvae's own outputs
so a folder can hold its images and their panels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hetvae import metrics as M
from hetvae.autoencoder import AutoencoderKL
from hetvae.calibration import Calibration
from hetvae.checkpoint import atomic_write_text, is_checkpoint, write_atomically
from hetvae.loss import HeteroscedasticNLL

RUN_FILES = ("config.yaml", "model.safetensors")
METRIC_KEYS = (
    "psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause",
    "n_images", "granularity",
)
COLOUR_KEYS = ("chroma_kept", "chroma_kept_min", "chroma_kept_max")
"""Also in every result of :func:`summarize`: the share of the images' chroma their reconstructions
keep (:func:`hetvae.metrics.chroma_kept`), mean / least / most over the RGB images that have colour;
``None`` when there are none. Not part of :data:`METRIC_KEYS`, which recognises older results too."""
AUTO_TILE_PIXELS = 2048 * 2048
"""Images with more pixels than this are reconstructed in tiles when :attr:`Predictor.tile` is
``None`` (automatic): an untiled SD decoder holds several 128-channel float32 activations at full
resolution, 0.5 kB per pixel each (4 MP: a few GB)."""
AUTO_TILE_SIZE = 512
"""Tile size of automatic tiling, in pixels (as ``AutoencoderKL.enable_tiling``'s default)."""


@dataclass
class Prediction:
    """One image's reconstruction and its scale, all ``(1, C, H, W)`` on the [-1, 1] scale."""

    target: Tensor
    mean: Tensor
    log_scale: Tensor
    raw_log_scale: Tensor | None = None
    """The model's uncalibrated log-scale when :attr:`Predictor.calibration` is set (``log_scale``
    is then the calibrated one); ``None`` otherwise."""

    @property
    def error(self) -> Tensor:
        return (self.target - self.mean).abs()

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()


@dataclass
class Decoded:
    """One decoded latent: its image and scale, ``(1, C, H, W)`` on the [-1, 1] scale (no target)."""

    mean: Tensor
    log_scale: Tensor
    raw_log_scale: Tensor | None = None
    """The uncalibrated log-scale when :attr:`Predictor.calibration` is set; ``None`` otherwise."""

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()


@dataclass
class Predictor:
    """An autoencoder and the likelihood whose scale it is judged with."""

    model: AutoencoderKL
    nll: HeteroscedasticNLL
    source: str
    tile: int | None = None
    """Tiling of :meth:`predict`: ``None`` automatic (tiles of :data:`AUTO_TILE_SIZE` above
    :data:`AUTO_TILE_PIXELS`, unless the model's own ``enable_tiling`` is on), ``0`` never, ``N``
    tiles of ``N`` pixels (a multiple of the model's ``downsample_factor``)."""
    calibration: Calibration | None = None
    """A post-hoc correction of the scale (:mod:`hetvae.calibration`): :meth:`predict` returns the
    calibrated log-scale and the metrics use the calibrated distribution. ``None``: uncalibrated."""

    @property
    def granularity(self) -> str:
        return self.nll.granularity

    @property
    def family(self) -> str:
        return self.nll.family

    @torch.no_grad()
    def predict(self, image: Tensor) -> Prediction:
        """Reconstruct one image ``(C, H, W)`` or ``(1, C, H, W)`` in [-1, 1] (any size: the model
        pads to its down-sampling factor and crops back) from the posterior mode."""
        x = image if image.ndim == 4 else image.unsqueeze(0)
        x = x.to(next(self.model.parameters()).device, torch.float32)
        rec, _ = self._run(lambda: self.model(x, sample_posterior=False), *x.shape[-2:], "reconstructing")
        mean, s, uncalibrated = self._scales(x, rec)
        return Prediction(x, mean, s, raw_log_scale=uncalibrated)

    def _scales(self, like: Tensor, rec) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(mean, log-scale, uncalibrated log-scale or None)`` of a reconstruction, the scales
        broadcast to the mean's shape and calibrated when :attr:`calibration` is set. ``like``: the
        target (its values matter only to a closed-form scale; its shape is the mean's)."""
        mean = rec.mean.float()
        raw = rec.log_scale.float() if self.granularity == "pixel" else None
        s = torch.broadcast_to(self.nll.log_scale(like, mean, raw), mean.shape).contiguous()
        if self.calibration is None:
            return mean, s, None
        return mean, torch.broadcast_to(self.calibration.apply(s), mean.shape).contiguous(), s

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Decoded:
        """Decode one unscaled latent ``(C, h, w)`` or ``(1, C, h, w)`` (see :func:`load_latents`)
        into its image and scale, tiled as :meth:`predict` tiles. There is no target, so a model
        whose scale is fitted to each image's error (no head, no learned scale) has no map to give:
        ``ValueError``."""
        z = z if z.ndim == 4 else z.unsqueeze(0)
        channels = self.model.config.latent_channels
        if z.ndim != 4 or z.shape[0] != 1 or z.shape[1] != channels:
            raise ValueError(f"expected one latent (1, {channels}, h, w) for this model (latent_channels={channels}), "
                             f"got shape {tuple(z.shape)}")
        if getattr(self.nll.head, "fit", None) == "optimal":
            raise ValueError(
                f"{self.source} has no per-pixel log-scale head and no learned scale: its scale is fitted to each "
                "image's reconstruction error, and decoded latents have no image to compare with. Use a model "
                "trained with a log-scale (hetvae train, or an export of one)"
            )
        z = z.to(next(self.model.parameters()).device, torch.float32)
        f = self.model.config.downsample_factor
        rec = self._run(lambda: self.model.decode(z), z.shape[-2] * f, z.shape[-1] * f, "decoding")
        mean, s, uncalibrated = self._scales(rec.mean.float(), rec)  # no target: the mean gives the shape
        return Decoded(mean, s, raw_log_scale=uncalibrated)

    def _run(self, call: Callable, height: int, width: int, doing: str):
        """``call()`` with the model tiled for an image of ``height x width`` (:meth:`_tile_for`) and its
        calibration off (the head's raw map); running out of memory is a ``ValueError`` that says to tile."""
        model = self.model
        saved = model.use_tiling, model.tile_sample_size, model.tile_overlap, model.use_calibration
        tile = self._tile_for(height, width)
        model.use_calibration = False  # the raw head output: the likelihood bounds it, then self.calibration
        try:
            if tile:
                model.enable_tiling(tile_sample_size=tile)
            elif tile == 0:
                model.disable_tiling()
            return call()
        except (RuntimeError, MemoryError) as error:
            if not _out_of_memory(error):
                raise
            how = f"in tiles of {model.tile_sample_size} px" if model.use_tiling else "whole (untiled)"
            raise ValueError(
                f"out of memory {doing} a {height}x{width} image ({height * width / 1e6:.1f} MP) {how}: "
                f"reconstruct it in smaller tiles (--tile PX on the command line, Predictor.tile in Python; "
                f"a multiple of {model.config.downsample_factor}, e.g. 256) or free memory ({error})"
            ) from None
        finally:
            model.use_tiling, model.tile_sample_size, model.tile_overlap, model.use_calibration = saved

    def _tile_for(self, height: int, width: int) -> int | None:
        """Tile size for one image: ``None`` leaves the model as it is, ``0`` turns tiling off."""
        if self.tile is not None:
            return self.tile
        if self.model.use_tiling or height * width <= AUTO_TILE_PIXELS:
            return None
        f = self.model.config.downsample_factor
        return max(AUTO_TILE_SIZE // f * f, f)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (torch raises ``RuntimeError`` on the CPU)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return any(m in text for m in ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate"))


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in RUN_FILES)


def _training_checkpoint_parts(path: Path) -> tuple[AutoencoderKL, HeteroscedasticNLL]:
    """The model and likelihood a run would have exported at the step saved in ``path``: the EMA
    weights when the run keeps them (as ``model.safetensors``), else the trained ones, and the
    learned log-scale. Reads ``weights.safetensors`` only (never the training state)."""
    from hetvae.autoencoder import AutoencoderConfig
    from hetvae.checkpoint import WEIGHTS_FILE, read_checkpoint_weights, tensors_under
    from hetvae.config import Config, ConfigError, build_nll, from_dict
    from hetvae.convert import CONFIG_KEY, CheckpointError
    from hetvae.train import TRAIN_CONFIG_KEY

    tensors, metadata = read_checkpoint_weights(path)
    weights = path / WEIGHTS_FILE
    missing = [k for k in (CONFIG_KEY, TRAIN_CONFIG_KEY) if k not in metadata]
    if missing:
        raise CheckpointError(f"{weights}: lacks the {' and '.join(missing)} metadata that `hetvae train` writes")
    try:
        model_config = AutoencoderConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
        cfg = from_dict(Config, json.loads(metadata[TRAIN_CONFIG_KEY]))
    except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights}: its config metadata cannot be read by this version ({exc})") from exc
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "autoencoder."
    model = AutoencoderKL(model_config)
    nll = build_nll(cfg, model)
    for module, name in ((model, prefix), (nll, "loss.")):
        try:
            module.load_state_dict(tensors_under(tensors, name), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{weights}: the {name}* tensors do not fit the config stored with them: {str(exc).splitlines()[-1].strip()}"
            ) from exc
    return model, nll


def load_predictor(path: str | Path, device: str | torch.device = "cpu", calibrated: bool = True) -> Predictor:
    """A :class:`Predictor` from a run folder, one of its training checkpoints
    (``RUN/checkpoints/step_XXXXXXXX``: the model the run would have exported at that step) or any
    model checkpoint (module docstring).

    ``calibrated``: use the post-hoc calibration stored with the model (``hetvae calibrate``), if
    any; False scores the model as trained (``--uncalibrated``)."""
    from hetvae.convert import load_autoencoder

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run folder or a model checkpoint)")
    if is_run_folder(path):
        from hetvae.config import build_nll, load_config

        cfg = load_config(path / "config.yaml")
        model = load_autoencoder(path / "model.safetensors")
        nll = build_nll(cfg, model)
        loss_file = path / "loss.safetensors"
        if loss_file.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(loss_file))
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{loss_file}: cannot read the run's learned log-scale, the file is truncated or corrupt ({e})") from e
            try:
                nll.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(
                    f"{loss_file} does not fit log_scale in {path / 'config.yaml'} "
                    f"({nll.granularity}, {model.config.out_channels} channels): {str(e).splitlines()[-1].strip()}"
                ) from e
        elif list(nll.parameters()):
            raise FileNotFoundError(
                f"{loss_file} is missing: the run's {nll.granularity!r} log-scale was learned and lives there"
            )
    elif is_checkpoint(path):
        model, nll = _training_checkpoint_parts(path)
    else:
        model = load_autoencoder(path)
        nll = model_nll(model, path)
    model.eval().to(device)
    nll.eval().to(device)
    calibration = model.calibration if calibrated else None
    if calibration is not None and calibration.family != nll.family:
        raise ValueError(f"{path}: the stored calibration was fitted for {calibration.family!r}, the model is scored as {nll.family!r}")
    return Predictor(model=model, nll=nll, source=str(path), calibration=calibration)


def model_nll(model: AutoencoderKL, path: str | Path | None = None) -> HeteroscedasticNLL:
    """The likelihood a model is scored with outside its run folder: the one recorded with it
    (``config.likelihood``); else, with a head, its map under the default bounds (Laplace); else the
    closed-form best constant scale of each image. ``path``: where the model was read, for messages."""
    likelihood = model.config.likelihood
    where = f"{path}: " if path is not None else ""
    if likelihood is not None:  # recorded with the model: score it as it was trained
        from hetvae.convert import expected_head_file, nll_from_likelihood

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


class _Pool:
    """What the pooled metrics need, gathered one prediction at a time: per-image PSNR, the summed
    bits and interval hits (additive), and for the rank metrics each element's float32 |error|
    and log-scale. The images and reconstructions themselves are not kept."""

    def __init__(self, family: str, calibration: Calibration | None = None) -> None:
        self.family = family
        self.calibration = calibration
        self.psnr: list[float] = []
        self.chroma_kept: list[float] = []
        self.bits = 0.0
        self.count = 0
        self.hits = [0] * len(M.CALIBRATION_LEVELS)
        self.errors: list[Tensor] = []
        self.log_scales: list[Tensor] = []

    def add(self, p: Prediction) -> None:
        target, mean, log_scale = p.target, p.mean, p.log_scale
        n = target.numel()
        shown, truth = (mean.clamp(-1, 1) + 1) / 2, (target + 1) / 2
        self.psnr.extend(M.psnr(shown, truth).tolist())
        if target.ndim == 4 and target.shape[1] == 3:
            self.chroma_kept.extend(k for k in M.chroma_kept(shown, truth).tolist() if math.isfinite(k))
        cal = self.calibration
        if cal is None:
            self.bits += M.nll_bpd(target, mean, log_scale, self.family) * n
            curve = M.coverage_curve(target, mean, log_scale, self.family)
        else:  # the calibrated distribution, from the uncalibrated scale (isotonic: not one scale)
            if p.raw_log_scale is None:
                raise ValueError("a calibrated pool needs predictions of a calibrated predictor (raw_log_scale)")
            self.bits += cal.bits_per_dim(target, mean, p.raw_log_scale) * n
            curve = cal.coverage_curve(target, mean, p.raw_log_scale, M.CALIBRATION_LEVELS)
        self.hits = [h + round(c * n) for h, c in zip(self.hits, curve)]
        self.count += n
        self.errors.append((target.double() - mean.double()).abs().float().flatten().cpu())
        self.log_scales.append(torch.broadcast_to(log_scale, target.shape).float().flatten().cpu())

    def coverage_curve(self) -> list[float]:
        return [h / self.count for h in self.hits]

    def _rank_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(|error|, 0, log_scale)`` as ``(1, 1, N, 1)``, for the metrics of target, mean, log-scale."""
        error = torch.cat(self.errors).view(1, 1, -1, 1)
        return error, torch.zeros(()).expand_as(error), torch.cat(self.log_scales).view(1, 1, -1, 1)

    def sparsification_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        return M.sparsification_curves(*self._rank_inputs())

    def summary(self, granularity: str) -> dict:
        if not self.count:
            raise ValueError("no images to evaluate")
        ranked = self._rank_inputs()
        rho = M.spearman(*ranked)
        levels = M.CALIBRATION_LEVELS
        observed = self.coverage_curve()
        kept = self.chroma_kept
        return {
            "psnr": sum(self.psnr) / len(self.psnr),
            "nll_bpd": self.bits / self.count,
            "coverage_50": observed[levels.index(0.5)],
            "coverage_90": observed[levels.index(0.9)],
            "calibration_error": sum(abs(o - p) for o, p in zip(observed, levels)) / len(levels),
            "spearman": None if math.isnan(rho) else rho,
            "ause": M.ause(*ranked),
            "n_images": len(self.psnr),
            "granularity": granularity,
            "chroma_kept": sum(kept) / len(kept) if kept else None,
            "chroma_kept_min": min(kept) if kept else None,
            "chroma_kept_max": max(kept) if kept else None,
        }


def summarize(
    predictions: Iterable[Prediction], family: str, granularity: str, calibration: Calibration | None = None
) -> dict:
    """The metrics of ``hetvae eval`` over all elements of all predictions (under ``calibration``
    when given: predictions then carry ``raw_log_scale``)."""
    pool = _Pool(family, calibration)
    for p in predictions:
        pool.add(p)
    return pool.summary(granularity)


def _uncalibrated(p: Prediction) -> Prediction:
    return p if p.raw_log_scale is None else Prediction(p.target, p.mean, p.raw_log_scale)


def _named(images: Iterable) -> Iterator[tuple[str | None, Tensor]]:
    """``(source, image)`` pairs from an :class:`ImageList` (source: the file), ``(name, image)``
    pairs, or bare images (source ``None``)."""
    if isinstance(images, ImageList):
        for i in range(len(images)):
            yield str(images.sources[i]), images.load(i)
        return
    for item in images:
        yield item if isinstance(item, tuple) else (None, item)


def iter_predictions(
    predictor: Predictor, images: Iterable, progress: bool = False, desc: str = "predict"
) -> Iterator[tuple[str | None, Prediction]]:
    """``(source, prediction)`` for each image, one image in memory at a time. ``images``: an
    :class:`ImageList`, ``(name, image)`` pairs or images ``(C, H, W)`` in [-1, 1]. An error
    (out of memory, say) names the image's file."""
    named = _named(images)
    if progress:
        from tqdm.auto import tqdm

        named = tqdm(named, desc=desc, unit="img", total=len(images) if isinstance(images, Sequence) else None)
    for source, image in named:
        try:
            prediction = predictor.predict(image)
        except ValueError as error:
            if source is None:
                raise
            raise ValueError(f"image {source}: {error}") from None
        yield source, prediction


def predict_all(predictor: Predictor, images: Iterable, progress: bool = False) -> list[Prediction]:
    """Every prediction in a list (all in memory: :func:`iter_predictions` streams them)."""
    return [p for _, p in iter_predictions(predictor, images, progress)]


PER_IMAGE_KEYS = (
    "psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause", "chroma_kept",
)
"""The metrics of each image in ``evaluate(..., per_image=True)["images"]`` (with ``"image"``, its
source). The pooled PSNR and ``chroma_kept`` are the means of these, the pooled bits/dim their mean
weighted by the images' element counts; coverage and the rank metrics pool elements instead."""


def evaluate(predictor: Predictor, images: Iterable, progress: bool = False, per_image: bool = False) -> dict:
    """Predict every image (``(C, H, W)`` in [-1, 1], ``(name, image)`` pairs or an
    :class:`ImageList`), one at a time, and :func:`summarize` them.

    With a calibrated predictor the metrics are the calibrated ones, plus ``"calibration"`` (its
    description) and ``"uncalibrated"``: the same metrics without the correction (one pass).
    ``per_image``: also ``"images"``, one dict per image in order: ``"image"`` (its file, or its
    name or ``#k`` for images given in memory) and the :data:`PER_IMAGE_KEYS`, measured as if it
    were the only image (so a reader finds which photograph is washed out or badly covered)."""
    cal = predictor.calibration
    pool = _Pool(predictor.family, cal)
    raw = _Pool(predictor.family) if cal is not None else None
    rows: list[dict] | None = [] if per_image else None
    for source, p in iter_predictions(predictor, images, progress):
        pool.add(p)
        if raw is not None:
            raw.add(_uncalibrated(p))
        if rows is not None:
            alone = _Pool(predictor.family, cal)
            alone.add(p)
            summary = alone.summary(predictor.granularity)
            name = source if source is not None else f"#{len(rows)}"
            rows.append({"image": name, **{k: summary[k] for k in PER_IMAGE_KEYS}})
    result = pool.summary(predictor.granularity)
    if rows is not None:
        result["images"] = rows
    if raw is not None:
        result["calibration"] = cal.describe()
        result["uncalibrated"] = raw.summary(predictor.granularity)
    return result


@dataclass
class Comparison:
    """Metrics and curves of several models on the same images."""

    results: dict[str, dict]
    reliability: dict[str, list[float]]
    sparsification: dict[str, tuple[Tensor, Tensor, Tensor]]

    def markdown(self) -> str:
        """A markdown table, one row per model."""

        def fmt(value, digits):
            return "n/a" if value is None else f"{value:.{digits}f}"

        lines = [
            _TABLE_HEADER,
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in self.results.items():
            lines.append(
                f"| {name} | {r['granularity']} | {fmt(r['psnr'], 2)} | {fmt(r['nll_bpd'], 3)} | "
                f"{fmt(r['coverage_50'], 3)} | {fmt(r['coverage_90'], 3)} | {fmt(r['calibration_error'], 3)} | "
                f"{fmt(r['spearman'], 3)} | {fmt(r['ause'], 3)} |"
            )
        return "\n".join(lines) + "\n"


_TABLE_HEADER = "| run | granularity | PSNR (dB) | bits/dim | coverage 50% | coverage 90% | calib. error | Spearman | AUSE |"


def compare(predictors: dict[str, Predictor], images: Iterable, progress: bool = False) -> Comparison:
    """Evaluate each predictor on the same images; keep the reliability and sparsification curves.
    An :class:`ImageList` is read again for each predictor (one image in memory at a time)."""
    if not isinstance(images, Sequence):
        images = list(images)  # a one-shot iterator would be empty for the second predictor
    results, reliability, sparsification = {}, {}, {}
    for name, predictor in predictors.items():
        pool = _Pool(predictor.family, predictor.calibration)
        for _, p in iter_predictions(predictor, images, progress, desc=str(name)):
            pool.add(p)
        results[name] = pool.summary(predictor.granularity)
        reliability[name] = pool.coverage_curve()
        sparsification[name] = pool.sparsification_curves()
    return Comparison(results, reliability, sparsification)


def to_tensor(image) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # copy: PIL arrays are read-only


class ImageList(Sequence):
    """Images listed up front and decoded one at a time: ``images[i]`` and iteration give
    ``(name, (3, H, W) float32 in [-1, 1])``, read from disk on each access.

    ``names``: each file's path relative to the folder all files share (``a/x.png``, with its
    extension), unique per file; the sample photographs' names for the built-in images.
    ``sources``: the files (or sample names). ``skipped``: files left out because hetvae wrote them.
    """

    def __init__(self, names: list[str], sources: list, read: Callable[[int], Tensor], skipped=()) -> None:
        self.names, self.sources, self._read, self.skipped = list(names), list(sources), read, list(skipped)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.names[index], self.load(index)

    def load(self, index: int) -> Tensor:
        return self._read(index)


def _relative_names(files: list[Path]) -> list[str]:
    """Each file's path relative to the deepest folder holding them all, ``/``-separated."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([str(f.parent) for f in absolute]))
    return [f.relative_to(root).as_posix() for f in absolute]


def load_images(paths: str | Path | list | None = None) -> ImageList:
    """An :class:`ImageList` of files / folders (recursive), or, with ``None``, of scikit-image's
    held-out sample photographs (the ``"test"`` split training never sees).

    Nothing is decoded here. A file reached twice (two arguments, a link) is listed once, and files
    hetvae wrote (panels, scale maps: :func:`is_hetvae_output`) are skipped, so outputs written next
    to the images are never read back as images. An unreadable file raises ``ValueError`` naming it
    when it is read.
    """
    from hetvae import data

    if paths is None:
        samples = data.sample_images("test")
        return ImageList([n for n, _ in samples], [n for n, _ in samples], lambda i: to_tensor(samples[i][1]))
    unique: dict[str, Path] = {}
    for file in data.list_images(paths):
        unique.setdefault(os.path.realpath(file), file)
    files, skipped = [], []
    for file in unique.values():
        (skipped if is_hetvae_output(file) else files).append(file)
    if not files:
        raise ValueError(
            f"no images to read in {paths}: all {len(skipped)} image file(s) there were written by hetvae "
            f"(e.g. {skipped[0]})"
        )

    def read(i: int) -> Tensor:
        try:
            return to_tensor(data.read_image(files[i]))
        except Exception as error:  # name the file: PIL's messages often do not
            raise ValueError(f"cannot read image {files[i]}: {error}") from error

    return ImageList(_relative_names(files), files, read, skipped)


LATENT_SUFFIXES = (".safetensors", ".pt")
"""Files ``hetvae uncertainty`` reads as latents rather than images."""
LATENT_KEY = "latents"


def is_latent_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in LATENT_SUFFIXES


def _read_latent_tensor(file: Path) -> Tensor:
    """The one tensor of ``file`` (or the one named ``latents``); ``ValueError`` naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"latents {file}: no such file" + (" (a folder?)" if file.exists() else ""))
    if file.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                name = LATENT_KEY if LATENT_KEY in keys else keys[0] if len(keys) == 1 else None
                tensors = {name: f.get_tensor(name)} if name is not None else {}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"latents {file}: cannot read the safetensors file, it is truncated or corrupt ({e})") from e
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - weights_only runs no code: anything else is a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"latents {file}: cannot load it with torch.load(weights_only=True), which reads only tensors and "
                f"plain containers, never code ({first})"
            ) from e
        if isinstance(obj, Tensor):
            return obj
        if not isinstance(obj, dict):
            raise ValueError(f"latents {file}: expected a tensor or a dict of tensors, found a {type(obj).__name__}")
        keys = list(obj)
        name = LATENT_KEY if LATENT_KEY in obj else keys[0] if len(keys) == 1 else None
        tensors = {name: obj[name]} if name is not None else {}
    if not tensors:
        raise ValueError(
            f"latents {file}: expected one tensor or one named {LATENT_KEY!r}, found "
            f"{len(keys)} ({', '.join(map(repr, keys[:5]))}{', ...' if len(keys) > 5 else ''})"
        )
    (tensor,) = tensors.values()
    if not isinstance(tensor, Tensor):
        raise ValueError(f"latents {file}: {name!r} is a {type(tensor).__name__}, not a tensor")
    return tensor


def load_latents(path: str | Path, config, scaled: bool = False) -> Tensor:
    """Latents ``(B, C, h, w)`` from a ``.safetensors`` file (its one tensor, or the one named
    ``latents``) or a ``.pt`` file (a tensor, or such a dict; read with
    ``torch.load(weights_only=True)``), as float32, unscaled for ``AutoencoderKL.decode``.

    ``scaled``: the latents are a diffusion pipeline's (``output_type="latent"``) and are unscaled
    as diffusers' pipelines do before decoding: ``z / scaling_factor + shift_factor`` with the
    model's ``config``, or ``z * latents_std / scaling_factor + latents_mean`` when the config has
    ``latents_mean`` and ``latents_std``. ``C`` must be ``config.latent_channels``. Every problem is
    a ``ValueError`` naming the file (``FileNotFoundError`` for a missing one).
    """
    file = Path(path).expanduser()
    z = _read_latent_tensor(file)
    channels = config.latent_channels
    shape = tuple(z.shape)
    if not z.is_floating_point():
        raise ValueError(f"latents {file}: expected floating-point values, got {z.dtype}")
    if z.ndim != 4 or z.shape[1] != channels or z.numel() == 0:
        raise ValueError(
            f"latents {file}: shape {shape}, expected (B, {channels}, h, w): the model has latent_channels={channels}"
            + (" (a single latent needs its batch dimension: z[None])" if z.ndim == 3 and z.shape[0] == channels else "")
        )
    z = z.float()
    if not torch.isfinite(z).all():
        raise ValueError(f"latents {file}: {int((~torch.isfinite(z)).sum())} value(s) are NaN or infinite")
    if scaled:
        if config.latents_mean is not None and config.latents_std is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
            z = z * std / config.scaling_factor + mean
        else:
            z = z / config.scaling_factor + config.shift_factor
    return z


def save_decoded_maps(path: str | Path, latent: Tensor, decoded: Decoded, family: str, granularity: str) -> Path:
    """The raw maps of one decoded latent (``latents`` as decoded, ``mean``, ``log_scale``) as
    safetensors, written atomically, with the family, granularity and :data:`hetvae.viz.OUTPUT_MARKER`."""
    maps = {"latents": latent.reshape(-1, *latent.shape[-2:]), "mean": decoded.mean[0], "log_scale": decoded.log_scale[0]}
    return _save_marked_maps(path, {k: v.float() for k, v in maps.items()}, family, granularity, "decoded latent maps")


def _save_marked_maps(path: str | Path, maps: dict[str, Tensor], family: str, granularity: str, what: str) -> Path:
    """``maps`` as a safetensors file, written atomically, with the family, granularity and
    :data:`hetvae.viz.OUTPUT_MARKER` (``what``) in its metadata."""
    from safetensors.torch import save_file

    from hetvae.viz import OUTPUT_MARKER

    tensors = {k: v.contiguous().cpu() for k, v in maps.items()}
    metadata = {"family": family, "granularity": granularity, OUTPUT_MARKER: what}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --- outputs: recognised, checked, written atomically --------------------------------------------


def _is_metrics(data) -> bool:
    return isinstance(data, dict) and set(METRIC_KEYS) <= set(data)


def is_hetvae_output(path: str | Path) -> bool:
    """Whether ``path`` is a regular file hetvae wrote: a PNG or safetensors file carrying
    :data:`hetvae.viz.OUTPUT_MARKER`, the JSON of ``hetvae eval`` / ``compare``, or the table of
    ``compare``. Unreadable or foreign files are not."""
    from hetvae.viz import OUTPUT_MARKER

    path = Path(path)
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return OUTPUT_MARKER in im.info
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return OUTPUT_MARKER in (f.metadata() or {})
        if suffix in (".json", ".md") and path.stat().st_size <= 1 << 20:
            text = path.read_text()
            if suffix == ".md":
                return text.startswith(_TABLE_HEADER + "\n")
            data = json.loads(text)
            return _is_metrics(data) or (isinstance(data, dict) and bool(data) and all(map(_is_metrics, data.values())))
    except Exception:  # unreadable, or not what its name says: not ours
        return False
    return False


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def check_output_folder(path: str | Path, flag: str = "output folder") -> Path:
    """``path`` as a folder outputs can go into (it may not exist yet); ``ValueError`` naming
    ``flag`` and the file in the way otherwise."""
    path = Path(path).expanduser()
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder (existing or to be created)")
    _check_parents(path, flag)
    return path


def check_output_file(path: str | Path, flag: str = "output") -> Path:
    """``path`` as a file hetvae may write: absent, or an earlier output of hetvae
    (:func:`is_hetvae_output`). ``ValueError`` naming ``flag`` and ``path`` otherwise."""
    path = Path(path).expanduser()
    _check_parents(path, flag)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; expected a file name")
    if (path.exists() or path.is_symlink()) and not is_hetvae_output(path):
        raise ValueError(
            f"{flag}: refusing to overwrite {path}: it exists and was not written by hetvae "
            "(choose another name or folder, or move the file)"
        )
    return path


def uncertainty_outputs(out: str | Path, name: str) -> tuple[Path, Path, Path]:
    """Where ``hetvae uncertainty`` writes the panel, scale map and raw maps of image ``name``
    (an :class:`ImageList` name such as ``a/x.png``): ``out/a/x.png_panel.png``,
    ``out/a/x.png_scale.png``, ``out/a/x.png_maps.safetensors``. Distinct names never share an
    output (no suffix ends another), and the extension keeps ``x.png`` and ``x.jpg`` apart."""
    out = Path(out)
    return out / f"{name}_panel.png", out / f"{name}_scale.png", out / f"{name}_maps.safetensors"


def save_maps(path: str | Path, prediction: Prediction, family: str, granularity: str) -> Path:
    """The raw ``(C, H, W)`` maps of one prediction (input, mean, log_scale, error) as safetensors,
    written atomically, with the family, granularity and :data:`hetvae.viz.OUTPUT_MARKER`."""
    p = prediction
    maps = {"input": p.target[0], "mean": p.mean[0], "log_scale": p.log_scale[0], "error": p.error[0]}
    return _save_marked_maps(path, maps, family, granularity, "uncertainty maps")


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`hetvae.checkpoint.atomic_write_text`)."""
    return atomic_write_text(path, text)


def write_json(result: dict, path: str | Path) -> Path:
    return write_text(json.dumps(result, indent=2) + "\n", path)
