"""Predicting with a trained model and measuring its uncertainty on whole images.

:func:`load_predictor` opens either

* a **run folder** written by ``hetvae train`` (``config.yaml``, ``model.safetensors``,
  ``loss.safetensors``): the model plus its trained likelihood, whatever the granularity; or
* any **model** :func:`hetvae.convert.load_autoencoder` reads (diffusers folder, SD single file,
  hetvae checkpoint). With a per-pixel head, its map is the scale (soft-bounded with the default
  bounds); without one, the scale is the closed-form global optimum of each image (sigma-VAE), so
  the metrics then describe the mean with the best possible single scale.

:func:`evaluate` pools every element of every image and returns the metrics of
:mod:`hetvae.metrics` under the keys ``hetvae eval`` writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hetvae import metrics as M
from hetvae.autoencoder import AutoencoderKL
from hetvae.loss import HeteroscedasticNLL

RUN_FILES = ("config.yaml", "model.safetensors")
METRIC_KEYS = (
    "psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "spearman", "ause",
    "n_images", "granularity",
)


@dataclass
class Prediction:
    """One image's reconstruction and its scale, all ``(1, C, H, W)`` on the [-1, 1] scale."""

    target: Tensor
    mean: Tensor
    log_scale: Tensor

    @property
    def error(self) -> Tensor:
        return (self.target - self.mean).abs()

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()


@dataclass
class Predictor:
    """An autoencoder and the likelihood whose scale it is judged with."""

    model: AutoencoderKL
    nll: HeteroscedasticNLL
    source: str

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
        rec, _ = self.model(x, sample_posterior=False)
        mean = rec.mean.float()
        raw = rec.log_scale.float() if self.granularity == "pixel" else None
        s = self.nll.log_scale(x, mean, raw)
        return Prediction(x, mean, torch.broadcast_to(s, x.shape).contiguous())


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in RUN_FILES)


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A :class:`Predictor` from a run folder or any model checkpoint (module docstring)."""
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
            from safetensors.torch import load_file

            nll.load_state_dict(load_file(str(loss_file)))
        elif list(nll.parameters()):
            raise FileNotFoundError(
                f"{loss_file} is missing: the run's {nll.granularity!r} log-scale was learned and lives there"
            )
    else:
        model = load_autoencoder(path)
        if model.has_log_scale_head:
            nll = HeteroscedasticNLL(
                "pixel", channels=model.config.out_channels, init=model.config.log_scale_init
            )
        else:
            nll = HeteroscedasticNLL("global", channels=model.config.out_channels, fit="optimal")
    model.eval().to(device)
    nll.eval().to(device)
    return Predictor(model=model, nll=nll, source=str(path))


def _pooled(predictions: list[Prediction]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate images of any sizes as ``(1, C, N, 1)`` target, mean and log-scale."""

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name).flatten(2) for p in predictions], dim=2).unsqueeze(-1)

    return cat("target"), cat("mean"), cat("log_scale")


def summarize(predictions: list[Prediction], family: str, granularity: str) -> dict:
    """The metrics of ``hetvae eval`` over all elements of all predictions."""
    if not predictions:
        raise ValueError("no images to evaluate")
    target, mean, log_scale = _pooled(predictions)
    psnr = torch.cat([M.psnr((p.mean.clamp(-1, 1) + 1) / 2, (p.target + 1) / 2) for p in predictions])
    rho = M.spearman(target, mean, log_scale)
    return {
        "psnr": psnr.mean().item(),
        "nll_bpd": M.nll_bpd(target, mean, log_scale, family),
        "coverage_50": M.coverage(target, mean, log_scale, 0.5, family),
        "coverage_90": M.coverage(target, mean, log_scale, 0.9, family),
        "calibration_error": M.calibration_error(target, mean, log_scale, family),
        "spearman": None if math.isnan(rho) else rho,
        "ause": M.ause(target, mean, log_scale),
        "n_images": len(predictions),
        "granularity": granularity,
    }


def predict_all(predictor: Predictor, images: Iterable[Tensor], progress: bool = False) -> list[Prediction]:
    images = list(images)
    if progress:
        from tqdm.auto import tqdm

        images = tqdm(images, desc="predict", unit="img")
    return [predictor.predict(img) for img in images]


def evaluate(predictor: Predictor, images: Iterable[Tensor], progress: bool = False) -> dict:
    """Predict every image ``(C, H, W)`` in [-1, 1] and :func:`summarize` them."""
    return summarize(predict_all(predictor, images, progress), predictor.family, predictor.granularity)


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
            "| run | granularity | PSNR (dB) | bits/dim | coverage 50% | coverage 90% | calib. error | Spearman | AUSE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in self.results.items():
            lines.append(
                f"| {name} | {r['granularity']} | {fmt(r['psnr'], 2)} | {fmt(r['nll_bpd'], 3)} | "
                f"{fmt(r['coverage_50'], 3)} | {fmt(r['coverage_90'], 3)} | {fmt(r['calibration_error'], 3)} | "
                f"{fmt(r['spearman'], 3)} | {fmt(r['ause'], 3)} |"
            )
        return "\n".join(lines) + "\n"


def compare(predictors: dict[str, Predictor], images: list[Tensor], progress: bool = False) -> Comparison:
    """Evaluate each predictor on the same images; keep the reliability and sparsification curves."""
    results, reliability, sparsification = {}, {}, {}
    for name, predictor in predictors.items():
        predictions = predict_all(predictor, images, progress)
        results[name] = summarize(predictions, predictor.family, predictor.granularity)
        target, mean, log_scale = _pooled(predictions)
        reliability[name] = M.coverage_curve(target, mean, log_scale, predictor.family)
        sparsification[name] = M.sparsification_curves(target, mean, log_scale)
    return Comparison(results, reliability, sparsification)


def to_tensor(image) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # copy: PIL arrays are read-only


def load_images(paths: str | Path | list | None = None) -> list[tuple[str, Tensor]]:
    """``[(name, (3, H, W) in [-1, 1]), ...]`` from files / folders (recursive), or, with ``None``,
    scikit-image's held-out sample photographs (the ``"test"`` split training never sees)."""
    from hetvae.data import list_images, read_image, sample_images

    if paths is None:
        return [(name, to_tensor(img)) for name, img in sample_images("test")]
    out = []
    for file in list_images(paths):
        try:
            out.append((file.stem, to_tensor(read_image(file))))
        except Exception as error:  # name the file: PIL's messages often do not
            raise ValueError(f"cannot read image {file}: {error}") from error
    return out


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
