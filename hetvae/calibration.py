"""Post-hoc calibration of a predicted scale on images the model never trained on.

A scale learned on training crops need not transfer to new photographs: the 90% interval of an
over-confident model covers fewer than 90% of the pixels of a new image. :func:`fit_calibration`
fits a correction on held-out images by minimising the discretized 8-bit NLL there
(Kuleshov et al., 2018; Levi et al., 2019), and :class:`Calibration` stores and applies it.

Two methods, the second on top of the first:

* ``"affine"``: per channel ``s' = a * s + c`` on the log-scale (``a > 0``). For a scale that is
  constant over each image (global / channel granularity, learned or the per-image best constant
  of ``fit: optimal`` and foreign VAEs) only the offset ``c`` is fitted and ``a`` stays 1: a slope
  there multiplies one number per image, a regression on as many points as fitting images, which
  does not transfer to new images (docs/math.md, "Post-hoc calibration"). The corrected
  distribution is the model's family with scale ``exp(s')``.
* ``"isotonic"``: the affine fit, then a monotone recalibration ``R`` of the *central level*
  ``u = P(|X - mu| <= |x - mu|)`` of each pixel under the affine-corrected distribution, per channel:
  ``R`` is the empirical distribution function of ``u`` on the fitting pixels, linear between
  ``knots`` quantiles, so that the recalibrated central ``p``-interval, the original one of level
  ``R^-1(p)``, covers a fraction ``p`` of the fitting pixels at every level. The recalibrated
  distribution is symmetric about the mean with CDF ``F'(y) = 1/2 + sign(y - mu) R(u(y)) / 2``; its
  density is the model's times ``R'(u)``, so photo errors, heavier-tailed than one Laplace, get
  their shape. The metrics then use that CDF. A returned ``log_scale`` is the log of the scale
  whose central **90%** interval (of the model's family) equals the recalibrated 90% interval.

Either method may add a **chroma term** (``chroma=True``): ``g1 * u + g2 * u^2`` on the log-scale,
shared by the channels, with ``u = log(CHROMA_FLOOR + chroma)`` of the model's *reconstruction* at
each pixel (:func:`log_chroma_magnitude`; RGB only). A map trained on data poor in saturated colour is
over-confident where a photograph's colour is strong (its reconstruction washes the colour out);
the term, fitted on photographs, widens the scale there (docs/math.md, "Post-hoc calibration"). The
feature always comes from the model's mean output, never from a colour-coupled conditional centre
(which depends on the true values): every method that applies such a calibration takes it.

A correction never stacks: it is always fitted to and applied on the model's *uncalibrated*
log-scale. A fit on fewer than ``min_pixels`` values per channel, or one that makes the bits/dim
on the fitting images worse, raises :class:`CalibrationError`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hetvae.files import write_atomically
from hetvae.functional import (
    bits_per_dim,
    broadcast_log_scale,
    check_family,
    discretized_nll,
    quantize_8bit,
)
from hetvae.metrics import CALIBRATION_LEVELS, LUMA_WEIGHTS, half_width

METHODS = ("affine", "isotonic")
DEFAULT_METHOD = "isotonic"
MIN_PIXELS = 10_000
MAX_FIT_PIXELS = 1_000_000  # per channel; a random subset beyond that (seeded) keeps the fit fast
PER_IMAGE_RUN = 256
"""A channel's log-scale whose values come in runs of equal neighbours at least this long on
average (in each image's pixel order) is constant over each image: its slope is not fitted."""
_BIN = 2.0 / 255.0
_META_KEY = "hetvae_calibration"
CHROMA_FLOOR = 0.01
"""Added to the chroma before its log in :func:`log_chroma_magnitude` ([-1, 1] units; the value of
:data:`hetvae.autoencoder.EDGE_FLOOR`): below it a pixel's colour is grey up to quantisation."""


def check_image_values(x: Tensor, what: str = "", error: type[ValueError] = ValueError) -> None:
    """Refuse what is not an image on the [-1, 1] scale the VAE works in (``x / 127.5 - 1`` of
    8-bit pixels, as :func:`hetvae.images.to_tensor` gives): an integer, boolean or complex
    dtype (``torchvision.io.read_image`` gives uint8), NaN or infinite values, or values outside
    [-1, 1] (0..255 floats). Raises ``error``, prefixed with ``what``, naming what was found and
    the conversion to use. (0..1 floats, as ``torchvision.transforms.ToTensor`` gives, lie inside
    [-1, 1] and cannot be told from a bright image: convert them with ``x * 2 - 1``.)"""
    pre = f"{what}: " if what else ""
    if not isinstance(x, Tensor):
        raise error(f"{pre}expected an image tensor in [-1, 1], got a {type(x).__name__}: convert it with "
                    "hetvae.images.to_tensor(numpy (H, W, 3) uint8 array), i.e. x / 127.5 - 1")
    if not x.is_floating_point():
        raise error(
            f"{pre}expected a floating-point image in [-1, 1], got dtype {x.dtype}: convert 8-bit pixels (0..255) "
            "with x.float() / 127.5 - 1"
        )
    if x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if not finite.all():
        raise error(f"{pre}{int((~finite).sum()):,} value(s) are NaN or infinite; expected an image of finite values in [-1, 1]")
    lo, hi = (v.item() for v in torch.aminmax(x.float()))
    if lo < -1 or hi > 1:
        raise error(
            f"{pre}values span [{lo:.6g}, {hi:.6g}], expected an image in [-1, 1]: convert 8-bit values (0..255) with "
            "x / 127.5 - 1 and 0..1 floats with x * 2 - 1 (values a resize pushed past the range: x.clamp(-1, 1))"
        )


class CalibrationError(ValueError):
    """A calibration that cannot be fitted, stored or read."""


def log_chroma_magnitude(image: Tensor) -> Tensor:
    """``log(CHROMA_FLOOR + chroma)`` ``(B, 1, H, W)`` of an RGB ``image`` ``(B, 3, H, W)`` in
    [-1, 1]: the chroma of a pixel is the mean absolute difference of its R, G, B from its BT.601
    luma (:data:`hetvae.metrics.LUMA_WEIGHTS`), how far its colour is from grey. The feature of the
    chroma term of a :class:`Calibration`; ``CalibrationError`` for an image that is not RGB."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise CalibrationError(f"the chroma feature needs the model's RGB reconstruction (B, 3, H, W), got {shape}")
    weights = image.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    luma = (image * weights).sum(dim=1, keepdim=True)
    return torch.log((image - luma).abs().mean(dim=1, keepdim=True) + CHROMA_FLOOR)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {METHODS}, got {method!r}")
    return method


def _per_channel(log_scale: Tensor, target: Tensor) -> Tensor:
    """``log_scale`` broadcast to ``target``'s shape ``(B, C, H, W)``."""
    return torch.broadcast_to(broadcast_log_scale(torch.as_tensor(log_scale), target), target.shape)


def _channels_last_flat(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(C, B*H*W)``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _folded_level(r: Tensor, family: str) -> tuple[Tensor, Tensor]:
    """``(u, 1 - u)`` for a standardized absolute error ``r >= 0``: ``u = P(|Z| <= r)``, computed
    so that the complement stays accurate in the tails."""
    if family == "laplace":
        v = torch.exp(-r)
        return -torch.expm1(-r), v
    v = torch.special.erfc(r / math.sqrt(2.0))
    return torch.special.erf(r / math.sqrt(2.0)), v


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation per row: ``x`` ``(C, N)``, increasing ``xp`` and ``fp`` ``(C, K)``."""
    k = xp.shape[1]
    idx = torch.searchsorted(xp.contiguous(), x.contiguous(), right=True).clamp(1, k - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


@dataclass
class Calibration:
    """A fitted correction of a predicted log-scale (module docstring).

    Attributes:
        method: ``"affine"`` or ``"isotonic"``.
        family: the likelihood family it was fitted for.
        slope, offset: ``(C,)`` float64, ``s' = slope * s + offset`` per channel.
        knots: ``(C, K+1)`` increasing central levels ``p_0 = 0 < ... < p_K = 1`` with
            ``R(p_k) = k / K`` (isotonic only; ``None`` for affine).
        n_pixels: values per channel the fit used.
        bpd_before, bpd_after: bits/dim on the fitting images without / with the correction.
        chroma: ``(2,)`` float64 ``(g1, g2)`` of the chroma term ``g1 * u + g2 * u^2`` added to every
            channel's log-scale, ``u`` = :func:`log_chroma_magnitude` of the model's mean (3
            channels only); ``None``: no chroma term.
    """

    method: str
    family: str
    slope: Tensor
    offset: Tensor
    knots: Tensor | None = None
    n_pixels: int = 0
    bpd_before: float = float("nan")
    bpd_after: float = float("nan")
    chroma: Tensor | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        check_family(self.family)
        self.slope = torch.as_tensor(self.slope, dtype=torch.float64).flatten()
        self.offset = torch.as_tensor(self.offset, dtype=torch.float64).flatten()
        if self.slope.shape != self.offset.shape or self.slope.numel() == 0:
            raise CalibrationError(
                f"calibration slope {tuple(self.slope.shape)} and offset {tuple(self.offset.shape)} "
                "must be (C,) vectors of the same length"
            )
        if not (torch.isfinite(self.slope).all() and torch.isfinite(self.offset).all()) or (self.slope <= 0).any():
            raise CalibrationError("calibration slope must be finite and > 0 and offset finite")
        if self.method == "isotonic":
            if self.knots is None:
                raise CalibrationError("an isotonic calibration needs its knots")
            self.knots = torch.as_tensor(self.knots, dtype=torch.float64)
            k = self.knots
            if k.ndim != 2 or k.shape[0] != self.channels or k.shape[1] < 3:
                raise CalibrationError(
                    f"calibration knots must be ({self.channels}, K+1) with K >= 2, got {tuple(k.shape)}"
                )
            if not torch.isfinite(k).all() or (k[:, 0] != 0).any() or (k[:, -1] != 1).any() or (k.diff(dim=1) <= 0).any():
                raise CalibrationError("calibration knots must increase strictly from 0 to 1 in every channel")
        elif self.knots is not None:
            raise CalibrationError("an affine calibration has no knots")
        if self.chroma is not None:
            self.chroma = torch.as_tensor(self.chroma, dtype=torch.float64).flatten()
            if self.chroma.shape != (2,) or not torch.isfinite(self.chroma).all():
                raise CalibrationError(f"calibration chroma must be 2 finite numbers (g1, g2), got {self.chroma.tolist()}")
            if self.channels != 3:
                raise CalibrationError(f"a chroma term needs 3 (RGB) channels, this calibration has {self.channels}")

    @property
    def channels(self) -> int:
        return self.slope.numel()

    # --- applying ---------------------------------------------------------------------------

    def _coefficients(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.channels, 1, 1)
        return (self.slope.to(like.device, like.dtype).view(shape), self.offset.to(like.device, like.dtype).view(shape))

    def chroma_term(self, mean: Tensor | None, like: Tensor) -> Tensor | None:
        """``g1 * u + g2 * u^2`` ``(B, 1, H, W)`` in ``like``'s dtype, ``u`` the log chroma of
        ``mean`` (the model's reconstruction); None without a chroma term (``mean`` is then not
        used). ``CalibrationError`` when the term needs a ``mean`` that is missing or not RGB."""
        if self.chroma is None:
            return None
        if mean is None:
            raise CalibrationError(
                "this calibration has a chroma term: pass the model's reconstruction as mean= (chroma_of= where "
                "mean is a colour-coupled centre), the (B, 3, H, W) image the scale belongs to"
            )
        u = log_chroma_magnitude(torch.as_tensor(mean).double())
        g = self.chroma.to(u.device)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return (g[0] * u + g[1] * u * u).to(dtype)

    def affine(self, log_scale: Tensor, mean: Tensor | None = None) -> Tensor:
        """``slope * s + offset`` per channel, ``s`` broadcastable to ``(B, C, H, W)`` (a scalar
        or ``(B, 1, H, W)`` map becomes ``C`` channels), plus the chroma term of ``mean``
        ``(B, 3, H, W)``, the model's reconstruction, when the calibration has one (required then,
        ignored otherwise)."""
        s = torch.as_tensor(log_scale)
        if not s.is_floating_point():
            raise CalibrationError(f"log_scale must be a floating-point tensor, got {s.dtype}")
        if s.ndim == 1:
            s = s.view(-1, 1, 1)
        if s.ndim >= 3 and s.shape[-3] not in (1, self.channels):
            raise CalibrationError(
                f"log_scale of shape {tuple(s.shape)} has {s.shape[-3]} channels; this calibration has {self.channels}"
            )
        a, c = self._coefficients(s)
        term = self.chroma_term(mean, s)
        return a * s + c if term is None else a * s + c + term.to(s.device)

    def _levels(self) -> Tensor:
        """``(C, K+1)``: ``R(p_k) = k / K``, the values of the recalibration map at the knots."""
        return torch.linspace(0, 1, self.knots.shape[1], dtype=torch.float64).expand_as(self.knots)

    def _affine_level(self, p: float) -> Tensor:
        """``(C, 1)``: the affine-corrected central level whose interval is the calibrated
        ``p``-interval, ``R^-1(p)`` (``p`` itself for an affine calibration)."""
        q = torch.full((self.channels, 1), float(p), dtype=torch.float64)
        return q if self.knots is None else _interp(q, self._levels(), self.knots)

    def interval_factor(self, p: float = 0.9) -> Tensor:
        """``(C,)`` ratio of the recalibrated central ``p``-interval to the affine one (1 for affine)."""
        if self.knots is None:
            return torch.ones(self.channels, dtype=torch.float64)
        u = self._affine_level(p)
        ref = half_width(torch.tensor(p, dtype=torch.float64), self.family)
        return (half_width(u.clamp(max=1 - 1e-12), self.family) / ref).flatten()

    def apply(self, log_scale: Tensor, mean: Tensor | None = None) -> Tensor:
        """The calibrated log-scale a user sees: the affine correction (with the chroma term of
        ``mean``, the model's reconstruction, if any), plus for isotonic the log of the factor that
        makes the family's 90% interval the recalibrated one (module docstring)."""
        s = self.affine(log_scale, mean)
        if self.knots is not None:
            s = s + self.interval_factor(0.9).log().to(s.device, s.dtype).view(self.channels, 1, 1)
        return s

    # --- the recalibrated distribution -------------------------------------------------------

    def central_levels(self, target: Tensor, mean: Tensor, log_scale: Tensor, *, chroma_of: Tensor | None = None) -> Tensor:
        """``(C, N)`` central level of each value under the *affine-corrected* distribution.
        ``mean``: the centre of the distribution; ``chroma_of``: the model's reconstruction the
        chroma term reads (required with a chroma term; with colour coupling ``mean`` is the
        conditional centre, which depends on the true values, so it is never used in its place)."""
        s = _per_channel(self.affine(log_scale, chroma_of).double(), target)
        r = (target.double() - mean.double()).abs() * torch.exp(-s)
        return _channels_last_flat(_folded_level(r, self.family)[0])

    def coverage_curve(self, target: Tensor, mean: Tensor, log_scale: Tensor, levels, *,
                       chroma_of: Tensor | None = None) -> list[float]:
        """Fraction of values inside the calibrated central ``p``-interval, for each ``p``
        (``chroma_of`` as in :meth:`central_levels`)."""
        u = self.central_levels(target, mean, log_scale, chroma_of=chroma_of)
        return [(u <= self._affine_level(p)).double().mean().item() for p in levels]

    def discretized_nll(self, target: Tensor, mean: Tensor, log_scale: Tensor, *,
                        chroma_of: Tensor | None = None) -> Tensor:
        """Per-element NLL in nats of 8-bit ``target`` under the calibrated distribution, ``(B, C, H, W)``
        (``chroma_of`` as in :meth:`central_levels`)."""
        s = self.affine(log_scale, chroma_of)
        if self.knots is None:
            return discretized_nll(target, mean, _per_channel(s, target), self.family)
        x = quantize_8bit(target.double())
        mu = mean.double()
        inv = torch.exp(-_per_channel(s.double(), x))
        k = torch.round((x + 1.0) / _BIN)
        lo_edge = torch.where(k <= 0, torch.full_like(x, -math.inf), x - _BIN / 2)
        hi_edge = torch.where(k >= 255, torch.full_like(x, math.inf), x + _BIN / 2)
        shape = x.shape
        # tail mass beyond an edge, on the edge's side of the mean: (1 - R(u)) / 2, from the accurate 1 - u
        comp_knots = (1.0 - self.knots).flip(1)  # increasing 1 - p_k
        comp_vals = (1.0 - self._levels()).flip(1)

        def tail(edge: Tensor) -> Tensor:
            r = (edge - mu).abs() * inv
            _, v = _folded_level(torch.nan_to_num(r, posinf=math.inf), self.family)
            return 0.5 * _interp(_channels_last_flat(v), comp_knots, comp_vals)

        t_lo, t_hi = tail(lo_edge), tail(hi_edge)
        lo_f, hi_f = _channels_last_flat(lo_edge), _channels_last_flat(hi_edge)
        m = _channels_last_flat(mu)
        above = lo_f >= m  # the whole bin above the mean: upper tail(lo) - upper tail(hi)
        below = hi_f <= m
        mass = torch.where(above, t_lo - t_hi, torch.where(below, t_hi - t_lo, 1.0 - t_lo - t_hi))
        nll = -torch.log(mass.clamp_min(torch.finfo(torch.float64).tiny))
        b, c, h, w = shape
        return nll.view(c, b, h, w).transpose(0, 1)

    def bits_per_dim(self, target: Tensor, mean: Tensor, log_scale: Tensor, *, chroma_of: Tensor | None = None) -> float:
        return bits_per_dim(self.discretized_nll(target, mean, log_scale, chroma_of=chroma_of)).item()

    # --- storage -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file atomically, holding :meth:`to_dict` as JSON in its
        metadata (the same record a model's likelihood carries; no tensors)."""
        meta = {_META_KEY: json.dumps(self.to_dict())}
        return write_atomically(path, lambda tmp: save_file({}, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(_META_KEY)
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CalibrationError(f"cannot read calibration file {path}: {e}") from None
        if text is None:
            raise CalibrationError(f"{path} holds no calibration (no {_META_KEY!r} metadata)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"invalid calibration in {path}: {e}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (how a model file's likelihood record carries it; :meth:`from_dict`)."""
        def num(x: float):
            return x if math.isfinite(x) else None

        data = {
            "method": self.method, "family": self.family,
            "slope": self.slope.tolist(), "offset": self.offset.tolist(),
            "knots": None if self.knots is None else self.knots.tolist(),
            "n_pixels": int(self.n_pixels), "bpd_before": num(self.bpd_before), "bpd_after": num(self.bpd_after),
        }
        if self.chroma is not None:  # absent, not null, without one: earlier records stay as they were
            data["chroma"] = self.chroma.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> Calibration:
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise CalibrationError(f"calibration{where} must be a mapping, got {type(data).__name__}")
        known = {"method", "family", "slope", "offset", "knots", "n_pixels", "bpd_before", "bpd_after", "chroma"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CalibrationError(f"unknown calibration key(s){where} {unknown}; valid keys: {sorted(known)}")
        try:
            def num(x):
                return float("nan") if x is None else float(x)

            return cls(
                method=data["method"], family=data["family"],
                slope=torch.tensor(data["slope"], dtype=torch.float64),
                offset=torch.tensor(data["offset"], dtype=torch.float64),
                knots=None if data.get("knots") is None else torch.tensor(data["knots"], dtype=torch.float64),
                n_pixels=int(data.get("n_pixels", 0)),
                bpd_before=num(data.get("bpd_before")), bpd_after=num(data.get("bpd_after")),
                chroma=None if data.get("chroma") is None else torch.tensor(data["chroma"], dtype=torch.float64),
            )
        except KeyError as e:
            raise CalibrationError(f"incomplete calibration{where}: {e.args[0]!r} is missing") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise CalibrationError(f"invalid calibration{where}: {e}") from None

    def describe(self) -> str:
        """One line for ``hetvae info`` / ``hetvae eval``."""
        a = ", ".join(f"{v:.3g}" for v in self.slope.tolist())
        c = ", ".join(f"{v:+.3g}" for v in self.offset.tolist())
        text = f"{self.method} (slope {a}; offset {c}"
        if self.knots is not None:
            text += f"; {self.knots.shape[1] - 1} knots, 90% interval x" + ", ".join(
                f"{v:.3g}" for v in self.interval_factor(0.9).tolist())
        if self.chroma is not None:
            g1, g2 = self.chroma.tolist()
            text += f"; chroma {g1:+.3g} u {g2:+.3g} u^2"
        return text + f"; fitted on {self.n_pixels:,} values/channel, bits/dim {self.bpd_before:.4f} -> {self.bpd_after:.4f})"


# --- fitting ------------------------------------------------------------------------------------


def _subsample(n: int, limit: int, seed: int) -> Tensor | None:
    if n <= limit:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit]


def constant_per_image(s: Tensor) -> Tensor:
    """``(C,)``: whether each channel of ``s`` ``(C, N)`` (images one after another, each in pixel
    order, as :func:`pooled` and ``(B, C, H, W)`` give them) is constant over each image: its
    values change at most once per :data:`PER_IMAGE_RUN` values on average. A per-image constant
    changes only between images; a map that varies within images changes at almost every pixel."""
    n = s.shape[1]
    changes = (s[:, 1:] != s[:, :-1]).sum(dim=1) if n > 1 else torch.zeros(s.shape[0], dtype=torch.long)
    return (changes + 1) * PER_IMAGE_RUN <= n


def _fit_affine(x: Tensor, mu: Tensor, s: Tensor, family: str, constant: Tensor,
                u: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel ``(a, c)`` minimising the discretized NLL, and with the chroma feature ``u``
    ``(1, N)`` the shared ``(g1, g2)`` of ``g1 * u + g2 * u^2`` fitted jointly (else None);
    ``x, mu, s``: ``(C, N)`` float64; ``constant``: ``(C,)``, channels whose slope stays 1 (only the
    offset is fitted)."""
    channels = x.shape[0]
    keep_a = (~constant).double().view(channels, 1)
    # standardise s per channel: slope and offset are then not coupled, and the fit is equally well
    # conditioned for a map that barely varies (a head after a few steps: spread 1e-5, best slope
    # 1e4, which an unscaled exp(log_a) overshot to inf) as for one that varies by units
    centre = s.mean(dim=1, keepdim=True)
    spread = torch.where(constant.view(channels, 1), 1.0, s.std(dim=1, keepdim=True))
    z = (s - centre) / spread
    # the slope on z starts at spread (the identity) where that is a usual spread, else at the
    # nearest of e^-2, e^1 (the loss's curvature in log_a scales with a^2: from a = 1e-5 the fit
    # is ill-conditioned); clamped so that a map the errors rank backwards (best slope 0, a
    # constant level) ends on a tiny positive slope, not on exp(-inf)
    log_a = torch.log(spread).clamp(-2.0, 1.0).requires_grad_(True)
    c = torch.zeros(channels, 1, dtype=torch.float64, requires_grad=True)
    # the chroma term on the standardised feature, whose square is then of order 1 as well
    g = torch.zeros(2, dtype=torch.float64, requires_grad=u is not None)
    if u is not None:
        u_centre, u_spread = u.mean(), u.std()
        v = (u - u_centre) / u_spread
        chroma_basis = torch.stack([v, v * v])  # (2, 1, N)
    params = [log_a, c] if u is None else [log_a, c, g]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def slope_on_z():
        return torch.exp(log_a.clamp(-30.0, 30.0) * keep_a)

    def closure():
        opt.zero_grad()
        s_new = slope_on_z() * z + centre + c
        if u is not None:
            s_new = s_new + (g.view(2, 1, 1) * chroma_basis).sum(dim=0)
        loss = discretized_nll(x.unsqueeze(0), mu.unsqueeze(0), s_new.unsqueeze(0), family).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        a = (slope_on_z() / spread).flatten()
        offset = c.flatten() + (1 - a) * centre.flatten()
        if u is None:
            return a.detach(), offset.detach(), None
        # h1 v + h2 v^2 with v = (u - m) / d  ==  g1 u + g2 u^2 + const, the constant into the offset
        h1, h2 = g.detach().tolist()
        m, d = u_centre.item(), u_spread.item()
        g2 = h2 / d**2
        g1 = h1 / d - 2 * h2 * m / d**2
        offset = offset + (h2 * m * m / d**2 - h1 * m / d)
    return a.detach(), offset.detach(), torch.tensor([g1, g2], dtype=torch.float64)


def fit_calibration(
    target: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    family: str = "laplace",
    method: str = DEFAULT_METHOD,
    *,
    knots: int = 100,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_FIT_PIXELS,
    seed: int = 0,
    slope: bool | None = None,
    chroma: bool = False,
    chroma_of: Tensor | None = None,
) -> Calibration:
    """Fit a :class:`Calibration` on pooled predictions.

    Args:
        target, mean: ``(B, C, H, W)`` on the [-1, 1] scale (``B`` images of one size, or pooled
            images as ``(1, C, N, 1)``).
        log_scale: the model's **uncalibrated** log-scale, broadcastable to ``target``.
        family: ``"laplace"`` or ``"gaussian"``.
        method: ``"affine"`` or ``"isotonic"`` (module docstring).
        knots: quantile knots of the isotonic map (at least 2).
        slope: fit the affine slope: None (default) in the channels where the log-scale varies
            within images (:func:`constant_per_image`; a scale constant over each image gets the
            offset only), True in every channel whose log-scale is not one constant, False in none.
        chroma: also fit the chroma term ``g1 * u + g2 * u^2`` (:class:`Calibration`), jointly with
            the affine coefficients; refused when it makes bits/dim on the fitting images worse than
            the same calibration without it.
        chroma_of: with ``chroma``, the model's reconstruction (its mean output, the shape of
            ``target``, 3 channels) the feature is read from. Required then: with colour coupling
            ``mean`` is the conditional centre, which depends on the true values.

    Raises:
        CalibrationError: too few values, a chroma term without ``chroma_of``, or over a
            reconstruction whose chroma does not vary, a target that is not an image in [-1, 1] (an integer
            dtype, 0..255 values: :func:`check_image_values`), non-finite inputs, or a fit that
            makes bits/dim worse.
    """
    check_method(method)
    family = check_family(family)
    if target.ndim != 4 or target.shape != mean.shape:
        raise CalibrationError(
            f"target and mean must be (B, C, H, W) of the same shape, got {tuple(target.shape)} and {tuple(mean.shape)}"
        )
    if knots < 2:
        raise CalibrationError(f"knots must be >= 2, got {knots}")
    if slope is not None and not isinstance(slope, bool):
        raise CalibrationError(f"slope must be None, True or False, got {slope!r}")
    if not isinstance(chroma, bool):
        raise CalibrationError(f"chroma must be True or False, got {chroma!r}")
    rec = None
    if chroma:
        if chroma_of is None:
            raise CalibrationError(
                "chroma=True needs chroma_of=, the model's reconstruction (its mean output; with colour coupling not "
                "the conditional centre)"
            )
        if tuple(chroma_of.shape) != tuple(target.shape):
            raise CalibrationError(
                f"chroma_of must have the target's shape {tuple(target.shape)}, got {tuple(chroma_of.shape)}")
        if not torch.isfinite(chroma_of).all():
            raise CalibrationError("chroma_of has non-finite values")
        if chroma_of.ndim != 4 or chroma_of.shape[1] != 3:
            raise CalibrationError(f"the chroma term needs 3 (RGB) channels, chroma_of has shape {tuple(chroma_of.shape)}")
        rec = _channels_last_flat(chroma_of.double())  # (3, N)
    check_image_values(target, "target", CalibrationError)
    s_full = _per_channel(torch.as_tensor(log_scale).double(), target)
    n = target.numel() // target.shape[1]
    if n < min_pixels:
        raise CalibrationError(
            f"calibration needs at least {min_pixels:,} values per channel to fit, got {n:,}: "
            "use more or larger held-out images"
        )
    for name, t in (("mean", mean), ("log_scale", s_full)):  # the target: check_image_values
        if not torch.isfinite(t).all():
            raise CalibrationError(f"{name} has non-finite values")
    x = _channels_last_flat(quantize_8bit(target.double()))
    mu = _channels_last_flat(mean.double())
    s = _channels_last_flat(s_full)
    fixed = constant_per_image(s) if slope is None else torch.full((s.shape[0],), not slope)
    pick = _subsample(n, max_pixels, seed)
    if pick is not None:
        x, mu, s = x[:, pick], mu[:, pick], s[:, pick]
        rec = None if rec is None else rec[:, pick]
    one_value = (s.std(dim=1) == 0) if s.shape[1] > 1 else torch.ones(s.shape[0], dtype=torch.bool)
    u = None if rec is None else log_chroma_magnitude(rec.unsqueeze(0).unsqueeze(-1))[0, ..., 0]  # (1, N)
    if u is not None and not u.std() > 1e-6:  # grey up to rounding: nothing to fit a term on
        raise CalibrationError(
            "the chroma of the reconstruction is the same at every fitting pixel (grey images?): the chroma term "
            "cannot be fitted; calibrate on colour photographs, or without the chroma term"
        )
    xs, mus, ss = x.unsqueeze(0), mu.unsqueeze(0), s.unsqueeze(0)  # (1, C, N) -> treat as (B=1, C, N, 1)
    xs, mus, ss = xs.unsqueeze(-1), mus.unsqueeze(-1), ss.unsqueeze(-1)
    before = bits_per_dim(discretized_nll(xs, mus, ss, family)).item()
    cal = _fitted(xs, mus, ss, family, method, knots, fixed | one_value)  # one value: no slope to fit
    if u is not None:
        plain = cal
        cal = _fitted(xs, mus, ss, family, method, knots, fixed | one_value, u, rec.unsqueeze(0).unsqueeze(-1))
        if not cal.bpd_after <= plain.bpd_after + 1e-9:
            raise CalibrationError(
                f"the chroma term makes bits/dim on the fitting images worse ({plain.bpd_after:.4f} without it, "
                f"{cal.bpd_after:.4f} with it); refused (calibrate without --chroma)"
            )
    after = cal.bpd_after
    cal.bpd_before = before
    if not math.isfinite(after) or after > before + 1e-9:
        raise CalibrationError(
            f"the {method} calibration makes bits/dim on the fitting images worse ({before:.4f} -> {after:.4f}); "
            "refused (try --method affine, or more held-out images)"
        )
    return cal


def _fitted(xs: Tensor, mus: Tensor, ss: Tensor, family: str, method: str, knots: int, fixed: Tensor,
            u: Tensor | None = None, recon: Tensor | None = None) -> Calibration:
    """The calibration of ``method`` fitted on pooled ``(1, C, N, 1)`` values, its ``bpd_after``
    set; with a chroma term read from ``recon`` ``(1, 3, N, 1)``, whose feature is ``u`` ``(1, N)``."""
    x, mu, s = xs[0, ..., 0], mus[0, ..., 0], ss[0, ..., 0]
    a, offset, g = _fit_affine(x, mu, s, family, fixed, u)
    cal = Calibration("affine", family, a, offset, n_pixels=x.shape[1], chroma=g)
    if method == "isotonic":
        u = cal.central_levels(xs, mus, ss, chroma_of=recon)  # (C, N)
        q = torch.linspace(0, 1, knots + 1, dtype=torch.float64)
        inner = torch.quantile(u, q[1:-1], dim=1).T
        k = torch.cat([torch.zeros(u.shape[0], 1, dtype=torch.float64), inner,
                       torch.ones(u.shape[0], 1, dtype=torch.float64)], dim=1)
        # strictly increasing: ties (e.g. many exact zeros) get a minimal spacing
        eps = 1e-9
        for j in range(1, k.shape[1]):
            k[:, j] = torch.maximum(k[:, j], k[:, j - 1] + eps)
        k = k / k[:, -1:]  # back to exactly 1 at the end, order kept
        k[:, -1] = 1.0
        cal = Calibration("isotonic", family, a, offset, knots=k, n_pixels=x.shape[1], chroma=g)
    cal.bpd_after = cal.bits_per_dim(xs, mus, ss, chroma_of=recon)
    return cal


def calibrated_metrics(target: Tensor, mean: Tensor, log_scale: Tensor, calibration: Calibration, levels=None, *,
                       chroma_of: Tensor | None = None) -> dict:
    """The likelihood and coverage metrics of :mod:`hetvae.metrics` under ``calibration``
    (``log_scale`` uncalibrated): ``nll_bpd``, ``coverage_50``, ``coverage_90``,
    ``calibration_error`` and the reliability curve ``coverage_curve`` at ``levels``.
    ``chroma_of``: the model's reconstruction, for a calibration with a chroma term
    (:meth:`Calibration.central_levels`)."""
    levels = CALIBRATION_LEVELS if levels is None else levels
    curve = calibration.coverage_curve(target, mean, log_scale, levels, chroma_of=chroma_of)
    c50, c90 = calibration.coverage_curve(target, mean, log_scale, (0.5, 0.9), chroma_of=chroma_of)
    return {
        "nll_bpd": calibration.bits_per_dim(target, mean, log_scale, chroma_of=chroma_of),
        "coverage_50": c50,
        "coverage_90": c90,
        "calibration_error": sum(abs(o - p) for o, p in zip(curve, levels)) / len(levels),
        "coverage_curve": curve,
    }


def pooled(predictions) -> tuple[Tensor, Tensor, Tensor]:
    """Predictions of images of any sizes as ``(1, C, N, 1)`` target, mean and log-scale. With
    colour coupling the "mean" is each channel's conditional centre (``Prediction.centre``), the
    centre the log-scale is the scale around, so a calibration fitted on it corrects the conditional
    scales; without coupling the centre is the mean itself."""
    predictions = list(predictions)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name).flatten(2) for p in predictions], dim=2).unsqueeze(-1)

    centre = "centre" if all(hasattr(p, "centre") for p in predictions) else "mean"
    return cat("target"), cat(centre), cat("log_scale")


def pooled_reconstruction(predictions) -> Tensor:
    """The model's reconstructions (``Prediction.mean``, never a coupled centre) of ``predictions``
    as one ``(1, C, N, 1)`` tensor in :func:`pooled`'s order: the ``chroma_of`` of a chroma term."""
    return torch.cat([p.mean.flatten(2) for p in predictions], dim=2).unsqueeze(-1)
