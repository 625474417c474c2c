"""Uncertainty panels: what the model reconstructs and where it says it is unsure.

One row per image, four columns::

    input | reconstruction | |error| | predicted scale exp(log_scale)

The error and the scale share one colour range per row: for a Laplace likelihood the scale ``b``
*is* the expected absolute error (for a Gaussian, ``sigma`` is the error's standard deviation),
so a well-calibrated map looks like a blurred copy of the error map. Both are averaged over
channels. A global or per-channel log-scale gives a constant scale panel, which is the point of
comparing granularities.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, no global backend switch), so
it is safe in training loops, threads and headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["uncertainty_panel", "save_uncertainty_panel"]

_COLUMNS = ("input", "reconstruction", "|error|", "predicted scale")


def _to_image(x: Tensor) -> np.ndarray:
    """``(C, H, W)`` in [-1, 1] -> ``(H, W, 3)`` float in [0, 1]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return x[:3].transpose(1, 2, 0)


def uncertainty_panel(
    inputs: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    *,
    title: str | None = None,
    cmap: str = "magma",
) -> Figure:
    """A figure of ``B`` rows: input, reconstruction, |error| and ``exp(log_scale)``.

    Args:
        inputs, mean: images ``(B, C, H, W)`` in [-1, 1].
        log_scale: the bounded log-scale used by the loss, broadcastable to ``inputs``: ``()``,
            ``(1, C, 1, 1)`` or ``(B, C|1, H, W)`` (``HeteroscedasticNLL.log_scale`` returns it).
        title: figure title (e.g. the step).
        cmap: matplotlib colormap of the error and scale panels.

    Returns a ``matplotlib.figure.Figure`` on an Agg canvas; ``fig.savefig(path)`` writes it.
    """
    if inputs.shape != mean.shape or inputs.ndim != 4:
        raise ValueError(f"inputs {tuple(inputs.shape)} and mean {tuple(mean.shape)} must be one (B, C, H, W) shape")
    inputs, mean = inputs.detach().float().cpu(), mean.detach().float().cpu()
    scale = torch.broadcast_to(log_scale.detach().float().cpu(), inputs.shape).exp().mean(dim=1)  # (B, H, W)
    error = (inputs - mean).abs().mean(dim=1)  # (B, H, W), same units as the Laplace scale

    rows = inputs.shape[0]
    fig = Figure(figsize=(4 * 2.6, rows * 2.4 + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 4, squeeze=False)
    for r in range(rows):
        err, sc = error[r].numpy(), scale[r].numpy()
        # one range for error and scale; the 99th percentile keeps a few outliers from washing it out
        vmax = float(max(np.percentile(err, 99), np.percentile(sc, 99), 1e-6))
        axes[r, 0].imshow(_to_image(inputs[r]))
        axes[r, 1].imshow(_to_image(mean[r]))
        for c, values in ((2, err), (3, sc)):
            im = axes[r, c].imshow(values, cmap=cmap, vmin=0.0, vmax=vmax)
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_COLUMNS[c], fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_uncertainty_panel(
    path: str | os.PathLike,
    inputs: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw :func:`uncertainty_panel` and write it to ``path`` (PNG); returns the path.

    Written to a temporary name and renamed, so a viewer never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = uncertainty_panel(inputs, mean, log_scale, title=title)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path
