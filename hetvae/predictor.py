"""Predicting with a trained model: :class:`Predictor` (a model and the likelihood its scale is
judged with), :func:`load_predictor`, streaming predictions, and fitting and storing a post-hoc
calibration of its scale (:func:`calibrate`; the math lives in :mod:`hetvae.calibration`).

:func:`load_predictor` opens either

* a **run folder** written by ``hetvae train`` (``config.yaml``, ``model.safetensors``,
  ``loss.safetensors``): the model plus its trained likelihood, whatever the granularity;
* one of its **training checkpoints** (``checkpoints/step_XXXXXXXX``): the model and likelihood
  the run would have exported at that step (EMA weights when the run keeps them); or
* a **head file** (``log_scale_head.safetensors``, :func:`hetvae.attach.save_log_scale_head`: what
  a ``train.head_only`` run writes) joined to its base model, the one it records or one given; or
* any **model** :func:`hetvae.convert.load_autoencoder` reads (diffusers folder, SD single file,
  hetvae checkpoint). With a per-pixel head, its map is the scale (soft-bounded with the default
  bounds); without one, the scale is the closed-form global optimum of each image (sigma-VAE), so
  the metrics then describe the mean with the best possible single scale.

An image larger than :data:`AUTO_TILE_PIXELS` is reconstructed in tiles of :data:`AUTO_TILE_SIZE`
pixels unless the predictor says otherwise (:attr:`Predictor.tile`), and running out of memory is a
``ValueError`` that says to tile.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hetvae.attach import is_head_file, load_with_head, store_head_likelihood
from hetvae.autoencoder import AutoencoderKL
from hetvae.build import model_nll
from hetvae.calibration import (
    DEFAULT_METHOD,
    Calibration,
    CalibrationError,
    check_image_values,
    fit_calibration,
    pooled,
    pooled_reconstruction,
)
from hetvae.checkpoint import is_checkpoint
from hetvae.convert import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_HEAD_FILE,
    DIFFUSERS_WEIGHTS,
    LDM_FILE,
    head_sidecar_path,
    inspect_checkpoint,
    likelihood_file,
    load_autoencoder,
    save_autoencoder,
    store_likelihood,
)
from hetvae.files import hub_cache_entry
from hetvae.functional import coupled_mean
from hetvae.hub import is_hub_id, resolve_model
from hetvae.images import ImageList, calibration_photos, load_images
from hetvae.likelihood import likelihood_from_nll
from hetvae.loss import HeteroscedasticNLL
from hetvae.outputs import check_replaceable
from hetvae.runs import MODEL_FILE, is_run_folder, read_run, read_step

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
    coupling: Tensor | None = None
    """With channel coupling (docs/math.md, "Coupled colour channels"), the coefficients the
    likelihood uses: ``(C (C - 1) / 2,)`` (``global``) or maps ``(1, C (C - 1) / 2, H, W)`` (``pixel``),
    in the storage order of :func:`hetvae.functional.coupling_pairs` for ``coupling_order``; the
    log-scales are then each channel's given the earlier ones. ``None``: independent channels."""
    coupling_order: tuple[int, ...] | None = None

    @property
    def error(self) -> Tensor:
        """``|x - mu|``: the marginal error of each channel (what PSNR sees)."""
        return (self.target - self.mean).abs()

    @property
    def centre(self) -> Tensor:
        """Each channel's conditional centre given the earlier channels' true values
        (:func:`hetvae.functional.coupled_mean`, float32); the mean itself without coupling."""
        if self.coupling is None:
            return self.mean
        return coupled_mean(self.target, self.mean, self.coupling, self.coupling_order).to(self.mean.dtype)

    @property
    def conditional_error(self) -> Tensor:
        """``|x - centre|``: the error the log-scale is the scale of (the marginal error without coupling)."""
        return (self.target - self.centre).abs()

    def maps(self) -> dict[str, Tensor]:
        """The raw ``(C, H, W)`` maps ``hetvae uncertainty`` writes: input, mean, log_scale, error;
        with colour coupling also ``centre`` and ``conditional_error`` (``log_scale`` is then the
        conditional scale) and ``coupling``, the coefficients ``(P, H, W)`` (a global set repeated)."""
        maps = {"input": self.target[0], "mean": self.mean[0], "log_scale": self.log_scale[0], "error": self.error[0]}
        if self.coupling is not None:
            a = self.coupling if self.coupling.ndim == 4 else self.coupling.view(1, -1, 1, 1)
            maps.update(centre=self.centre[0], conditional_error=self.conditional_error[0],
                        coupling=a.expand(1, -1, *self.target.shape[-2:])[0].contiguous())
        return maps

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

    def maps(self, latent: Tensor) -> dict[str, Tensor]:
        """The raw maps ``hetvae uncertainty`` writes for a decoded ``latent``: the latent as decoded,
        mean, log_scale (float32)."""
        maps = {"latents": latent.reshape(-1, *latent.shape[-2:]), "mean": self.mean[0], "log_scale": self.log_scale[0]}
        return {k: v.float() for k, v in maps.items()}


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
        pads to its down-sampling factor and crops back) from the posterior mode.

        ``ValueError`` for what is not such an image (:func:`_one_image`: a batch of several, no
        pixels, a complex dtype; an integer dtype or values outside [-1, 1], for which
        :func:`hetvae.calibration.check_image_values` names the conversion) and for a
        reconstruction or scale that is not finite (it cannot be scored)."""
        x = _one_image(image, self.model.config.in_channels)
        x = x.to(next(self.model.parameters()).device, torch.float32)
        rec, _ = self._run(lambda: self.model(x, sample_posterior=False), *x.shape[-2:], "reconstructing")
        return self._prediction(x, rec)

    def _prediction(self, x: Tensor, rec) -> Prediction:
        """The :class:`Prediction` of one image ``x`` (1, C, H, W) from its reconstruction ``rec``."""
        mean, s, uncalibrated = self._scales(x, rec)
        coupling = self.nll.coefficients(rec.coupling if self.nll.channel_coupling == "pixel" else None)
        if coupling is not None:
            coupling = coupling.detach().float()
            _check_finite(coupling, "colour-coupling coefficients")
        return Prediction(x, mean, s, raw_log_scale=uncalibrated, coupling=coupling,
                          coupling_order=self.nll.coupling_order)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Tensor]) -> list[Prediction]:
        """:meth:`predict` of several images of one size in one forward pass (faster on a GPU); each
        prediction is the one :meth:`predict` gives that image alone, up to the rounding of batched
        kernels (the model treats the images of a batch independently, and each scale is fitted to
        its own image). ``ValueError`` for images of different sizes, and as :meth:`predict`."""
        xs = [_one_image(image, self.model.config.in_channels) for image in images]
        shapes = sorted({tuple(x.shape[1:]) for x in xs})
        if len(shapes) > 1:
            raise ValueError(f"a batch holds images of one size, got {len(shapes)}: {shapes[0]}, {shapes[1]}, ...")
        if not xs:
            return []
        x = torch.cat(xs).to(next(self.model.parameters()).device, torch.float32)
        rec, _ = self._run(lambda: self.model(x, sample_posterior=False), *x.shape[-2:],
                           f"reconstructing (in a batch of {len(xs)})")
        out = []
        for i in range(len(xs)):
            one = dataclasses.replace(
                rec, mean=rec.mean[i:i + 1], log_scale=None if rec.log_scale is None else rec.log_scale[i:i + 1],
                coupling=None if rec.coupling is None else rec.coupling[i:i + 1])
            out.append(self._prediction(x[i:i + 1], one))
        return out

    def _scales(self, like: Tensor, rec) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(mean, log-scale, uncalibrated log-scale or None)`` of a reconstruction, the scales
        broadcast to the mean's shape and calibrated when :attr:`calibration` is set. ``like``: the
        target (its values matter only to a closed-form scale; its shape is the mean's)."""
        mean = rec.mean.float()
        _check_finite(mean, "reconstruction")
        raw = rec.log_scale.float() if self.granularity == "pixel" else None
        s = torch.broadcast_to(self.nll.log_scale(like, mean, raw), mean.shape).contiguous()
        _check_finite(s, "predicted log-scale")
        if self.calibration is None:
            return mean, s, None
        calibrated = torch.broadcast_to(self.calibration.apply(s, mean), mean.shape).contiguous()
        _check_finite(calibrated, "calibrated log-scale")
        return mean, calibrated, s

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


def _one_image(image: Any, channels: int) -> Tensor:
    """``image`` as ``(1, C, H, W)``, or ``ValueError`` for what :meth:`Predictor.predict` does not
    take: a batch of more than one image (the metrics would pool it as one image, and
    ``Prediction.maps`` keeps one), another number of dimensions or channels, an image with no
    pixels (no convolution can run on it), a complex dtype, and then what
    :func:`hetvae.calibration.check_image_values` refuses. The shape is checked before the values."""
    if isinstance(image, Tensor):
        if image.is_complex():
            raise ValueError(f"dtype {image.dtype} is not supported: expected a real floating-point image in [-1, 1]")
        shape = tuple(image.shape)
        if image.ndim == 4 and shape[0] != 1:
            raise ValueError(
                f"got a batch of {shape[0]} images (shape {shape}): pass the images one at a time, (C, H, W) or "
                "(1, C, H, W) each (iterate over the batch; evaluate, calibrate and predict_all take a list)"
            )
        if image.ndim not in (3, 4):
            raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got shape {shape}")
        if shape[-3] != channels:
            raise ValueError(f"expected {channels} channels (the model's in_channels), got {shape[-3]}: shape {shape}")
        if image.numel() == 0:
            raise ValueError(f"the image has no pixels (shape {shape}): there is nothing to reconstruct")
    check_image_values(image)
    return image if image.ndim == 4 else image.unsqueeze(0)


def _check_finite(x: Tensor, what: str) -> None:
    """A model's output that is NaN or infinite anywhere cannot be scored: ``ValueError`` (the
    metrics would be NaN, and a panel's colour range undefined)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        nan = int(torch.isnan(x).sum())
        found = " and ".join(t for t in (f"{nan:,} NaN" * bool(nan), f"{int(bad.sum()) - nan:,} infinite" * bool(int(bad.sum()) - nan)) if t)
        raise ValueError(
            f"the model's {what} has {found} value(s) (of {x.numel():,}): it cannot be scored; the model's "
            "weights hold NaN or infinite values, or a layer overflowed (try the model in float32)"
        )


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (torch raises ``RuntimeError`` on the CPU)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return any(m in text for m in ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate"))


def load_predictor(path: str | Path, device: str | torch.device = "cpu", calibrated: bool = True,
                   base: str | Path | None = None) -> Predictor:
    """A :class:`Predictor` from a run folder, one of its training checkpoints
    (``RUN/checkpoints/step_XXXXXXXX``: the model the run would have exported at that step), a head
    file with its base model, any model checkpoint (module docstring) or a Hugging Face Hub id of
    one (``org/name``, ``org/name/vae``, ``org/name/file.safetensors``, ``@revision``:
    :func:`hetvae.hub.resolve_model`).

    ``calibrated``: use the post-hoc calibration stored with the model (``hetvae calibrate``), if
    any; False scores the model as trained (``--uncalibrated``). ``base``: for a head file, the VAE
    it was trained for (None: the one it records; :func:`hetvae.attach.load_with_head`); refused
    for anything else."""
    if not is_hub_id(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"checkpoint {Path(path).expanduser()} does not exist (expected a run folder, a model checkpoint, a "
            f"head file or a Hugging Face Hub id such as org/name)"
        )
    path = resolve_model(path)
    head_file = is_head_file(path)
    if base is not None and not head_file:
        raise ValueError(f"base={str(base)!r} names the VAE of a head file, but {path} is not a head file "
                         "(a .safetensors file holding only decoder.log_scale_* tensors)")
    if head_file:
        model = load_with_head(path, base)
        nll = model_nll(model, path)
    elif is_run_folder(path):
        model, nll = read_run(path)
    elif is_checkpoint(path):
        model, nll = read_step(path)
    else:
        model = load_autoencoder(path)
        nll = model_nll(model, path)
    model.eval().to(device)
    nll.eval().to(device)
    try:
        calibration = model.calibration if calibrated else None
    except ValueError as e:
        raise ValueError(
            f"{path}: the stored calibration cannot be used ({e}); score it uncalibrated (--uncalibrated), or "
            f"remove it (hetvae calibrate {path} --remove) or fit it again"
        ) from None
    if calibration is not None and calibration.family != nll.family:
        raise ValueError(f"{path}: the stored calibration was fitted for {calibration.family!r}, the model is scored as {nll.family!r}")
    return Predictor(model=model, nll=nll, source=str(path), calibration=calibration)


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
    predictor: Predictor, images: Iterable, progress: bool = False, desc: str = "predict", batch_size: int = 1
) -> Iterator[tuple[str | None, Prediction]]:
    """``(source, prediction)`` for each image, in order, one image in memory at a time. ``images``:
    an :class:`ImageList`, ``(name, image)`` pairs or images ``(C, H, W)`` in [-1, 1]. An error
    (out of memory, say) names the image's file.

    ``batch_size`` > 1: up to that many consecutive images of one size are reconstructed together
    (:meth:`Predictor.predict_batch`), and held in memory together; 1 reconstructs each alone."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    named = _named(images)
    if progress:
        named = tqdm(named, desc=desc, unit="img", total=len(images) if isinstance(images, Sequence) else None)
    pending: list[tuple[int, str | None, Any]] = []

    def shown(k: int, source: str | None) -> str:
        return source if source is not None else f"#{k}"

    def flush() -> Iterator[tuple[str | None, Prediction]]:
        batch = list(pending)
        pending.clear()
        if len(batch) == 1:
            predictions = [_predict_one(predictor, batch[0][2], shown(*batch[0][:2]))]
        else:
            try:
                predictions = predictor.predict_batch([image for _, _, image in batch])
            except ValueError:  # which image, and why: each alone
                predictions = [_predict_one(predictor, image, shown(k, source)) for k, source, image in batch]
        yield from ((source, p) for (_, source, _), p in zip(batch, predictions))

    for k, (source, image) in enumerate(named):
        if pending and _size(image) != _size(pending[0][2]):
            yield from flush()
        pending.append((k, source, image))
        if len(pending) == batch_size or _size(image) is None:
            yield from flush()
    if pending:
        yield from flush()


def _size(image: Any) -> tuple[int, ...] | None:
    """The ``(C, H, W)`` of an image that may share a batch, None for anything else."""
    return tuple(image.shape[-3:]) if isinstance(image, Tensor) and image.ndim in (3, 4) else None


def _predict_one(predictor: Predictor, image: Any, shown: str) -> Prediction:
    try:
        return predictor.predict(image)
    except ValueError as error:
        raise ValueError(f"image {shown}: {error}") from None


def predict_all(predictor: Predictor, images: Iterable, progress: bool = False) -> list[Prediction]:
    """Every prediction in a list (all in memory: :func:`iter_predictions` streams them)."""
    return [p for _, p in iter_predictions(predictor, images, progress)]


def calibrate(model: Any, images=None, method: str = DEFAULT_METHOD, **kwargs: Any) -> Calibration:
    """Fit a :class:`Calibration` of ``model``'s scale on ``images``.

    Args:
        model: a :class:`hetvae.predictor.Predictor` (a run folder's model and likelihood, as
            :func:`hetvae.predictor.load_predictor` returns), an :class:`hetvae.AutoencoderKL` with a
            log-scale head, or a path either of those loads from. Any calibration it already
            carries is ignored: the fit is on the uncalibrated scale (calibrating twice replaces).
        images: ``(C, H, W)`` tensors in [-1, 1], file paths or a folder; None: the unseen
            photographs that ship with hetvae (:func:`hetvae.images.calibration_photos`).
        method: ``"affine"`` or ``"isotonic"``.
        kwargs: passed to :func:`fit_calibration`.
    """
    if isinstance(model, (str, os.PathLike)):
        predictor = load_predictor(model)
    elif isinstance(model, Predictor):
        predictor = model
    elif isinstance(model, AutoencoderKL):
        if not model.has_log_scale_head:
            raise CalibrationError(
                "an AutoencoderKL without a log-scale head has no scale to calibrate: pass the run's "
                "Predictor (hetvae.predictor.load_predictor(run_dir)) for a global/channel scale"
            )
        predictor = Predictor(model=model.eval(), nll=model_nll(model).eval(), source="model")
    else:
        raise CalibrationError(f"model must be a Predictor, an AutoencoderKL or a path, got {type(model).__name__}")
    if images is None:
        images = load_images(calibration_photos())
    elif isinstance(images, (str, os.PathLike)):
        images = load_images(images)
    previous = predictor.calibration
    predictor.calibration = None  # fit on the uncalibrated scale: calibrating again replaces
    try:
        predictions = [p for _, p in iter_predictions(predictor, images)]
    finally:
        predictor.calibration = previous
    if not predictions:
        raise CalibrationError("no images to calibrate on")
    target, centre, log_scale = pooled(predictions)
    # a chroma term reads the reconstruction itself, never the coupled centre pooled() gives
    kwargs.setdefault("chroma_of", pooled_reconstruction(predictions))
    return fit_calibration(target, centre, log_scale, predictor.family, method, **kwargs)


def check_calibration_destination(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Any:
    """Raise :class:`CalibrationError` where :func:`store_calibration` would refuse to write or could
    not write: with ``out``, a destination that already holds a model (a new export replaces
    nothing) or that cannot be written to; without it, a run's training checkpoint, a single file
    hetvae did not write, or a model that cannot be rewritten (a read-only folder or file). Cheap
    (no model is read), so a caller checks before spending time on a fit. Returns the
    ``CheckpointInfo`` of the model file to rewrite in place, None for ``out`` or a run folder."""
    path = Path(path).expanduser()
    if out is not None:  # a new hetvae export: OUT/model.safetensors, or OUT itself for a .safetensors name
        out = Path(out).expanduser()
        file = out if out.suffix == ".safetensors" else out / MODEL_FILE
        try:
            check_replaceable(file, "--out")
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        if file.is_dir():
            raise CalibrationError(f"--out {out}: {file} is a folder; expected the model file to create there")
        names = [MODEL_FILE, DIFFUSERS_CONFIG, *DIFFUSERS_WEIGHTS, DIFFUSERS_HEAD_FILE, LDM_FILE,
                 head_sidecar_path(file.parent / LDM_FILE, "ldm").name] if file.name == MODEL_FILE else [file.name]
        present = [name for name in names if (file.parent / name).exists()]
        if present:
            raise CalibrationError(
                f"--out {out} already holds a model ({', '.join(present)}): calibrate writes a new export there "
                "and replaces nothing; choose a new folder or file name, or move that model away first"
            )
        return None
    if is_head_file(path):
        info, record = None, path
    elif is_run_folder(path):
        info, record = None, likelihood_file(path / MODEL_FILE)
    elif is_checkpoint(path):
        raise CalibrationError(
            f"{path} is a training checkpoint (the state a run resumes from): it is not rewritten. Pass --out DIR "
            "to write the model of that step with its calibration as a new hetvae export"
        )
    else:
        info = inspect_checkpoint(path)
        if info.format == "ldm" and info.config_source != "file metadata":
            raise CalibrationError(
                f"{info.weights_file} is a {info.format} checkpoint hetvae did not write (it may hold more than the "
                "VAE): it is not rewritten. Pass --out DIR to write the model with its calibration as a new hetvae "
                "export"
            )
        record = likelihood_file(info.path)
    cache = hub_cache_entry(path) or hub_cache_entry(record)
    if cache is not None:
        raise CalibrationError(
            f"{path} is in the Hugging Face Hub cache {cache}, whose files are links to blobs that every snapshot "
            "shares: it is not calibrated in place. Pass --out DIR to write the model with its calibration as a new "
            "hetvae export"
        )
    # the file holding the record is replaced atomically where it lies (through a link): its folder
    # must be writable, and the file not protected
    try:
        check_replaceable(Path(os.path.realpath(record)), "MODEL")
    except ValueError as e:
        raise CalibrationError(f"{e}; pass --out DIR to write the model as a new hetvae export instead") from None
    return info


def store_calibration(predictor: Any, calibration: Calibration | None, path: str | os.PathLike,
                      out: str | os.PathLike | None = None) -> Path:
    """Write ``calibration`` (None: remove it) with the model ``predictor`` was loaded from.

    ``path``: the run folder, head file or model checkpoint the predictor came from (a run's training
    checkpoint, ``checkpoints/step_N``, is never rewritten: it needs ``out``). The likelihood record of
    the model file (``AutoencoderConfig.likelihood``) gets the calibration, replacing any earlier
    one, so it travels through every export. Only the record changes
    (:func:`hetvae.convert.store_likelihood`): a diffusers folder's ``config.json``, or the metadata
    of a run folder's ``model.safetensors``, a hetvae file or an ldm file hetvae wrote, whose tensors
    keep their bytes and dtype; no file is added or removed and every file keeps its mode. A file
    reached through a symbolic link is changed where it lies. A model in a Hugging Face Hub cache
    (its files are links to blobs every snapshot shares) and other single files (an original SD
    checkpoint) are not rewritten: pass ``out``, a folder for a new hetvae export of the model with
    its calibration. Returns the file or folder written.
    """
    path = Path(path).expanduser()
    info = check_calibration_destination(path, out)
    model = predictor.model
    record = model.config.likelihood
    if record is None or record.granularity != predictor.granularity or record.family != predictor.family:
        record = likelihood_from_nll(predictor.nll)
    record = dataclasses.replace(record, calibration=None if calibration is None else calibration.to_dict())
    if out is not None:
        return save_autoencoder(model, Path(out).expanduser(), format="hetvae", likelihood=record, overwrite=False)
    if is_head_file(path):  # the record travels in the head file; its base stays as it is
        return store_head_likelihood(path, record)
    model_path = path / MODEL_FILE if info is None else info.path  # info is None for a run folder
    cache = hub_cache_entry(path) or hub_cache_entry(likelihood_file(model_path))
    if cache is not None:
        raise CalibrationError(
            f"{path} is in the Hugging Face Hub cache {cache}, whose files are links to blobs that every snapshot "
            "shares: it is not calibrated in place. Pass --out DIR to write the model with its calibration as a new "
            "hetvae export"
        )
    return store_likelihood(model_path, record)
