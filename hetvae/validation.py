"""Validation while training: the model the run would export, scored on whole held-out images with
the pooled metrics of ``hetvae eval`` (:func:`hetvae.evaluate.evaluate`).

Which images (:func:`validation_images`): ``data.val_path`` (folders, image files, ``.txt`` list
files, as ``hetvae eval --images`` reads them); with ``data.path`` unset, the bundled photographs'
held-out split (the one ``hetvae eval RUN`` scores); otherwise none. Every file is checked at the
start (its header read): a folder with no image, or files none of which can be read, is a
:class:`~hetvae.schema.ConfigError` naming ``data.val_path``.

Scoring draws no random number (the posterior's mode, no dropout) and runs under a forked RNG
besides, so a run validates without changing its training: the same weights with and without
``train.val_every``.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from hetvae.autoencoder import AutoencoderKL
from hetvae.config import Config
from hetvae.evaluate import evaluate
from hetvae.images import ImageList, image_size, load_images
from hetvae.loss import HeteroscedasticNLL
from hetvae.predictor import Predictor
from hetvae.schema import ConfigError

__all__ = ["VAL_KEYS", "VAL_PREFIX", "validate", "validation_images"]

VAL_PREFIX = "val_"
"""Prefix of the validation metrics in ``metrics.jsonl`` and the loggers (``val_nll_bpd``, ...)."""
VAL_KEYS = ("nll_bpd", "psnr", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause", "chroma_kept")
"""The metrics of :func:`hetvae.evaluate.evaluate` a validation records (a ``None`` one, such as the
Spearman correlation of a constant scale, is left out), plus ``val_images``."""


def validation_images(cfg: Config) -> ImageList | None:
    """The images validation scores (module docstring); ``None`` when there are none to score.

    Raises:
        ConfigError: ``data.val_path`` names a path that does not exist, a folder or list file with no
            image, or only files that cannot be read (each named, up to five).
    """
    d = cfg.data
    if d.val_path is None:
        return load_images(None) if d.path is None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a list file's missing entries: counted below with the rest
            images = load_images(d.val_path)
    except (OSError, ValueError) as exc:
        raise ConfigError("data.val_path", f"no validation images: {exc}") from None
    good, bad = [], []
    for i, source in enumerate(images.sources):
        try:
            image_size(source)
        except (OSError, ValueError) as exc:
            bad.append(f"{source} ({exc})")
        else:
            good.append(i)
    if not good:
        shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ConfigError("data.val_path", f"none of its {len(bad)} image file(s) can be read: {shown}")
    if bad:
        warnings.warn(f"data.val_path: left out {len(bad)} unreadable image file(s): {'; '.join(bad[:5])}",
                      UserWarning, stacklevel=2)
        return ImageList([images.names[i] for i in good], [images.sources[i] for i in good],
                         lambda k: images.load(good[k]))
    return images


@contextlib.contextmanager
def _evaluating(model: AutoencoderKL, nll: HeteroscedasticNLL):
    """``model`` and ``nll`` in eval mode, the RNG streams forked; both modes restored after."""
    modes = model.training, nll.training
    device = next(model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        nll.eval()
        try:
            yield
        finally:
            model.train(modes[0])
            nll.train(modes[1])


def validate(model: AutoencoderKL, nll: HeteroscedasticNLL, images: ImageList, *, source: str | Path = "validation") -> dict[str, float]:
    """The :data:`VAL_KEYS` of ``model`` judged by ``nll`` on every image of ``images`` (whole, one at
    a time, pooled over all their elements), each key prefixed :data:`VAL_PREFIX`, plus
    ``val_images``: how many were scored."""
    with _evaluating(model, nll):
        result = evaluate(Predictor(model=model, nll=nll, source=str(source)), images)
    record = {VAL_PREFIX + k: float(result[k]) for k in VAL_KEYS if result.get(k) is not None}
    record[VAL_PREFIX + "images"] = float(result["n_images"])
    return record
