"""Uncertainty panels: what the model reconstructs and where it says it is unsure.

One row per image, four columns (five with ``standardized=True``)::

    input | reconstruction | |error| | predicted scale exp(log_scale) [| |error| / scale]

With colour coupling (docs/math.md, "Coupled colour channels") the scale is each channel's given the
earlier channels: pass ``centre`` (``Prediction.centre``) and the error column becomes the conditional
error ``|x - centre|`` the scale describes; pass per-pixel ``coupling`` maps and a last column shows
:func:`coupling_strength`, how strongly the channels' errors move together at each pixel.

Decoded latents have no input to compare with: :func:`decoded_panel` draws the decoded image and its
predicted scale only.

The error and the scale share one colour range per row: for a Laplace likelihood the scale ``b``
*is* the expected absolute error (for a Gaussian, ``sigma`` is the error's standard deviation),
so a well-calibrated map looks like a blurred copy of the error map. Both are averaged over
channels and drawn on a *logarithmic* colour scale labelled in 8-bit grey levels (1 level =
1/127.5 on the [-1, 1] scale): errors are heavy-tailed, so on a linear range set by the largest
errors a typical scale map would be near-black; on a log range flat regions (a level or less) and
edges (tens of levels) both show their structure. The range runs from the row's 99th percentile
down to the smaller of the scale's 1st and the error's 10th percentile (at most a factor 1000). A global or per-channel log-scale gives a constant scale panel, which is the point of
comparing granularities.

The maps are averaged in float64, so any finite float32 image and reconstruction can be drawn
(a float32 channel sum of values near its largest overflows); a map with a NaN or infinite value
has no colour range and is refused, a ``ValueError`` naming the map and the panel's title.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, no global backend switch), so
it is safe in training loops, threads and headless machines. Every file is written atomically
(:func:`write_atomically`) and every PNG carries the text chunk :data:`hetvae.outputs.OUTPUT_MARKER`, by which
``hetvae`` recognises its own outputs (it overwrites them, skips them as inputs, and refuses to
overwrite anything else).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image, PngImagePlugin
from torch import Tensor

from hetvae.files import write_atomically
from hetvae.metrics import CALIBRATION_LEVELS
from hetvae.outputs import OUTPUT_MARKER

__all__ = [
    "coupling_strength",
    "decoded_panel",
    "save_decoded_panel",
    "save_reliability_diagram",
    "save_scale_map",
    "save_sparsification_plot",
    "save_uncertainty_panel",
    "uncertainty_panel",
    "write_atomically",
]

_COLUMNS = ("input", "reconstruction", "|error|", "predicted scale", "|error| / scale")
LEVELS_PER_UNIT = 127.5  # 8-bit grey levels per unit of the [-1, 1] image scale
_LEVEL_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200)  # tick marks, in 8-bit levels


def _level_ticks(bar, vmin: float, vmax: float) -> None:
    """Colour-bar ticks at round numbers of 8-bit levels (the bar's data is on the [-1, 1] scale)."""
    ticks = [v / LEVELS_PER_UNIT for v in _LEVEL_STEPS if vmin <= v / LEVELS_PER_UNIT <= vmax]
    bar.ax.minorticks_off()
    bar.set_ticks(ticks)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value * LEVELS_PER_UNIT:g}"))


def shared_log_range(error: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """``(vmin, vmax)`` of the log colour range shared by an error map and a scale map (see the
    module docstring): the 99th percentile of either at the top, the scale's 1st / the error's
    10th percentile at the bottom, at most a factor 1000 apart."""
    vmax = float(max(np.percentile(error, 99), np.percentile(scale, 99), 1e-6))
    vmin = float(min(np.percentile(scale, 1), np.percentile(error, 10)))
    return max(vmin, vmax / 1000.0), vmax


def _panel(title: str | None) -> str:
    return "the panel" + (f" {title!r}" if title else "")


def _check_drawable(drawing: str, *maps: tuple[str, Tensor]) -> None:
    """A NaN or infinite value has no place on a colour range: ``ValueError`` naming ``drawing``
    (the panel, its title) and the map of the ``(name, tensor)`` pairs that has one."""
    for what, x in maps:
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        if nan or inf:
            found = " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
            raise ValueError(f"cannot draw {drawing}: the {what} has {found} value(s) (of {x.numel():,})")


def _scale_map(log_scale: Tensor, shape: tuple[int, ...], drawing: str) -> Tensor:
    """``exp(log_scale)`` broadcast to ``shape`` ``(B, C, H, W)`` and averaged over channels, in
    float64 (a float32 channel sum of large scales overflows); ``ValueError`` for what cannot be drawn."""
    log_scale = log_scale.detach().double().cpu()
    _check_drawable(drawing, ("log-scale", log_scale))
    scale = torch.broadcast_to(log_scale, shape).exp()
    _check_drawable(drawing, ("scale exp(log_scale)", scale))
    return scale.mean(dim=1)


def coupling_strength(coupling: Tensor) -> Tensor:
    """How strongly the colour channels' errors move together at each pixel: the root mean square
    of the coupling coefficients ``(B, P, H, W)`` over the pairs, ``(B, H, W)`` float64. 0: the
    channels are independent given the mean; 1: each later channel's centre moves, on average,
    by the earlier channels' whole residual (an error shared by all channels, as in brightness)."""
    if coupling.ndim != 4:
        raise ValueError(f"coupling must be per-pixel maps (B, P, H, W), got shape {tuple(coupling.shape)}")
    return coupling.detach().double().cpu().square().mean(dim=1).sqrt()


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
    standardized: bool = False,
    centre: Tensor | None = None,
    coupling: Tensor | None = None,
) -> Figure:
    """A figure of ``B`` rows: input, reconstruction, |error| and ``exp(log_scale)`` on one shared
    logarithmic colour range labelled in 8-bit levels (and, with ``standardized``,
    ``|error| / scale``: about 1 where the scale is right, large where the model is
    over-confident; drawn on a fixed 0..4 range).

    Args:
        inputs, mean: images ``(B, C, H, W)`` in [-1, 1].
        log_scale: the bounded log-scale used by the loss, broadcastable to ``inputs``: ``()``,
            ``(1, C, 1, 1)`` or ``(B, C|1, H, W)`` (``HeteroscedasticNLL.log_scale`` returns it).
        title: figure title (e.g. the step).
        cmap: matplotlib colormap of the error and scale panels.
        centre: with colour coupling, each channel's conditional centre ``(B, C, H, W)``; the error
            column is then ``|inputs - centre|``, the error the conditional scale describes.
        coupling: per-pixel coupling coefficients ``(B, P, H, W)``: one more column, their
            :func:`coupling_strength` on a linear 0..1+ range.

    Returns a ``matplotlib.figure.Figure`` on an Agg canvas; ``fig.savefig(path)`` writes it.
    """
    if inputs.shape != mean.shape or inputs.ndim != 4:
        raise ValueError(f"inputs {tuple(inputs.shape)} and mean {tuple(mean.shape)} must be one (B, C, H, W) shape")
    inputs, mean = inputs.detach().double().cpu(), mean.detach().double().cpu()
    _check_drawable(_panel(title), ("input", inputs), ("reconstruction", mean))
    scale = _scale_map(log_scale, inputs.shape, _panel(title))  # (B, H, W)
    if centre is not None and centre.shape != inputs.shape:
        raise ValueError(f"centre {tuple(centre.shape)} must have the inputs' shape {tuple(inputs.shape)}")
    around = mean if centre is None else centre.detach().double().cpu()
    error = (inputs - around).abs().mean(dim=1)  # (B, H, W), same units as the Laplace scale; float64: finite
    strength = None
    if coupling is not None:
        if coupling.ndim != 4 or coupling.shape[0] != inputs.shape[0] or coupling.shape[-2:] != inputs.shape[-2:]:
            raise ValueError(f"coupling {tuple(coupling.shape)} must be maps (B, P, H, W) of the inputs' "
                             f"{tuple(inputs.shape)} batch and size")
        strength = coupling_strength(coupling)
        _check_drawable(_panel(title), ("coupling", strength))
    titles = list(_COLUMNS[:4 + standardized])
    if centre is not None:
        titles[2] = "|x - centre| (given earlier channels)"
        titles[3] = "conditional scale"
    if strength is not None:
        titles.append("channels move together")

    columns = len(titles)
    rows = inputs.shape[0]
    fig = Figure(figsize=(columns * 2.6, rows * 2.4 + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = colormaps[cmap].with_extremes(under=colormaps[cmap](0.0), bad=colormaps[cmap](0.0))
    for r in range(rows):
        err, sc = error[r].numpy(), scale[r].numpy()
        vmin, vmax = shared_log_range(err, sc)
        axes[r, 0].imshow(_to_image(inputs[r]))
        axes[r, 1].imshow(_to_image(mean[r]))
        for c, values in ((2, err), (3, sc)):
            im = axes[r, c].imshow(values, cmap=colours, norm=LogNorm(vmin=vmin, vmax=vmax, clip=True))
            bar = fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
            _level_ticks(bar, vmin, vmax)
            bar.set_label(("|error|" if c == 2 else "scale b") + ", 8-bit levels (log)", fontsize=8)
        if standardized:
            im = axes[r, 4].imshow(err / np.maximum(sc, 1e-12), cmap="viridis", vmin=0.0, vmax=4.0)
            fig.colorbar(im, ax=axes[r, 4], fraction=0.046, pad=0.02).set_label("|error| / scale", fontsize=8)
        if strength is not None:
            im = axes[r, -1].imshow(strength[r].numpy(), cmap="cividis", vmin=0.0, vmax=max(1.0, float(strength.max())))
            fig.colorbar(im, ax=axes[r, -1], fraction=0.046, pad=0.02).set_label("rms coupling coefficient", fontsize=8)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.text(
        0.5, 0.0, "|error| and scale share one log colour range in 8-bit levels; b is the expected |error| "
        "(Laplace), so a right map looks like a blurred error map",
        ha="center", va="bottom", fontsize=7, color="0.3",
    )
    return fig


def save_uncertainty_panel(
    path: str | os.PathLike,
    inputs: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    *,
    title: str | None = None,
    dpi: int = 100,
    standardized: bool = False,
    centre: Tensor | None = None,
    coupling: Tensor | None = None,
) -> Path:
    """Draw :func:`uncertainty_panel` and write it to ``path`` (PNG); returns the path."""
    fig = uncertainty_panel(inputs, mean, log_scale, title=title, standardized=standardized, centre=centre,
                            coupling=coupling)
    return _save(fig, path, dpi, "uncertainty panel")


def decoded_panel(mean: Tensor, log_scale: Tensor, *, title: str | None = None, cmap: str = "magma") -> Figure:
    """A figure of ``B`` rows for decoded latents, which have no target: the decoded image and its
    predicted scale ``exp(log_scale)`` (averaged over channels) on a logarithmic colour range from
    the scale's 1st to its 99th percentile (at most a factor 1000), labelled in 8-bit levels.

    Args:
        mean: decoded images ``(B, C, H, W)`` in [-1, 1].
        log_scale: the bounded (or calibrated) log-scale, broadcastable to ``mean``.
    """
    if mean.ndim != 4:
        raise ValueError(f"mean must be (B, C, H, W), got {tuple(mean.shape)}")
    mean = mean.detach().double().cpu()
    _check_drawable(_panel(title), ("decoded image", mean))
    scale = _scale_map(log_scale, mean.shape, _panel(title))  # (B, H, W)
    rows = mean.shape[0]
    fig = Figure(figsize=(2 * 2.6, rows * 2.4 + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    colours = colormaps[cmap].with_extremes(under=colormaps[cmap](0.0), bad=colormaps[cmap](0.0))
    for r in range(rows):
        sc = scale[r].numpy()
        vmax = max(float(np.percentile(sc, 99)), 1e-6)
        vmin = max(float(np.percentile(sc, 1)), vmax / 1000.0)
        vmin = min(vmin, vmax / 1.01)  # a constant map still gets a range (and shows as one colour)
        axes[r, 0].imshow(_to_image(mean[r]))
        im = axes[r, 1].imshow(sc, cmap=colours, norm=LogNorm(vmin=vmin, vmax=vmax, clip=True))
        bar = fig.colorbar(im, ax=axes[r, 1], fraction=0.046, pad=0.02)
        _level_ticks(bar, vmin, vmax)
        bar.set_label("scale b, 8-bit levels (log)", fontsize=8)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("decoded image", "predicted scale")[c], fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.0, "b: the expected |error| of each pixel (Laplace); large where the decoder lost detail",
             ha="center", va="bottom", fontsize=7, color="0.3")
    return fig


def save_decoded_panel(
    path: str | os.PathLike, mean: Tensor, log_scale: Tensor, *, title: str | None = None, dpi: int = 100
) -> Path:
    """Draw :func:`decoded_panel` and write it to ``path`` (PNG); returns the path."""
    return _save(decoded_panel(mean, log_scale, title=title), path, dpi, "decoded panel")


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 100, what: str = "figure") -> Path:
    """Write ``fig`` as a PNG marked with :data:`hetvae.outputs.OUTPUT_MARKER`, atomically."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", metadata={OUTPUT_MARKER: what}))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_reliability_diagram(
    path: str | os.PathLike, curves: dict[str, list[float]], levels: tuple[float, ...] | None = None
) -> Path:
    """Observed vs nominal coverage of central intervals, one line per model (the diagonal is calibrated)."""
    levels = levels or CALIBRATION_LEVELS
    fig = _figure(4.2, 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="calibrated")
    for name, observed in curves.items():
        ax.plot(levels, observed, marker="o", label=name)
    ax.set(xlabel="nominal coverage p", ylabel="observed coverage", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("Reliability of central intervals", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path, what="reliability diagram")


def save_sparsification_plot(path: str | os.PathLike, curves: dict[str, tuple[Tensor, Tensor, Tensor]]) -> Path:
    """Mean remaining |error| (relative) as the most-uncertain fraction is removed; dashed: oracles."""
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    for name, (fractions, by_scale, oracle) in curves.items():
        (line,) = ax.plot(fractions.numpy(), by_scale.numpy(), label=name)
        ax.plot(fractions.numpy(), oracle.numpy(), linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set(xlabel="fraction removed (largest predicted scale first)", ylabel="mean |error| of the rest / overall")
    ax.set_title("Sparsification (dashed: removing by true error)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path, what="sparsification plot")


def save_scale_map(path: str | os.PathLike, log_scale: Tensor, cmap: str = "magma") -> Path:
    """The predicted scale ``exp(log_scale)`` of one image ``(1|C, H, W)`` or ``(1, C|1, H, W)``,
    averaged over channels, as a plain colormapped PNG at the image's own size, on a logarithmic
    range from its 1st to its 99th percentile (at most a factor 1000: a constant map is one colour)."""
    maps = log_scale.reshape(1, -1, *log_scale.shape[-2:])
    scale = _scale_map(maps, maps.shape, f"the scale map {Path(path).name}")[0].numpy()
    hi = max(float(np.percentile(scale, 99)), 1e-12)
    lo = max(float(np.percentile(scale, 1)), hi / 1000.0)
    position = np.log(np.clip(scale, lo, hi) / lo) / max(np.log(hi / lo), 1e-12)
    rgba = colormaps[cmap](position, bytes=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(OUTPUT_MARKER, "scale map")
    return write_atomically(path, lambda tmp: Image.fromarray(rgba[..., :3]).save(tmp, format="PNG", pnginfo=info))
