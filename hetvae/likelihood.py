"""The log-scale's settings in their three forms, and the one converter between each pair.

* :class:`hetvae.config.LogScaleConfig`: the ``log_scale`` section of a run's YAML (what a user
  writes). :func:`nll_from_config` builds the training loss from it, :func:`head_config_fields`
  the ``AutoencoderConfig.log_scale_*`` fields of the per-pixel head it describes.
* :class:`hetvae.loss.HeteroscedasticNLL`: the loss (its arguments are the settings).
* :class:`Likelihood`: the record every model file carries (``AutoencoderConfig.likelihood``):
  granularity, family, bounds, soft-clamp margin, fit, init, the learned value(s) of a global or
  channel scale and any post-hoc calibration. :func:`likelihood_from_nll` reads it off a loss;
  :func:`nll_from_likelihood` builds that loss back, giving the same log-scales to the bit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hetvae.calibration import Calibration, CalibrationError
from hetvae.config import LogScaleConfig
from hetvae.functional import soft_clamp
from hetvae.loss import HeteroscedasticNLL

__all__ = [
    "LIKELIHOOD_FAMILIES",
    "LIKELIHOOD_GRANULARITIES",
    "CalibrationDropped",
    "Likelihood",
    "finite_numbers",
    "grafted_record",
    "head_config_fields",
    "is_int",
    "is_number",
    "likelihood_from_nll",
    "nll_from_config",
    "nll_from_likelihood",
]

LIKELIHOOD_GRANULARITIES = ("global", "channel", "pixel")
LIKELIHOOD_FAMILIES = ("laplace", "gaussian")


class CalibrationDropped(UserWarning):
    """A post-hoc calibration was dropped because the scale it was fitted for is no longer the
    model's (a per-pixel head grafted in place of a global / channel scale, or in place of a lost
    head): the message is one line, for a command to print as a note."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_numbers(name: str, value: Any, length: int | None = None) -> tuple[float, ...]:
    """``value`` as a tuple of floats; a ``ValueError`` naming ``name`` if it is not a list of numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(map(is_number, value)):
        raise ValueError(f"{name} must be a list of finite numbers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must hold {length} numbers, got {len(value)}: {list(value)!r}")
    return tuple(float(v) for v in value)


@dataclass
class Likelihood:
    """The reconstruction likelihood a model was trained and is scored with, stored with the model.

    ``granularity``: where the log-scale comes from: ``"global"`` / ``"channel"`` (a value of the
    loss, stored here) or ``"pixel"`` (the decoder's head). ``family``, ``bounds``, ``margin``,
    ``fit``, ``init`` as in :class:`hetvae.loss.HeteroscedasticNLL`; ``free``: the learned free
    parameter(s) of a ``global`` (1 value) or ``channel`` (``out_channels`` values) scale with
    ``fit="learned"``, so the bounded log-scale is ``soft_clamp(init + free, *bounds, margin)``;
    None otherwise. Training-only settings (beta, faithful, the constant) do not change a score and
    are not kept.

    ``channel_coupling``: ``"none"``, ``"global"`` (``coupling`` holds the learned coefficients,
    ``C (C - 1) / 2`` numbers in the storage order of :func:`hetvae.functional.coupling_pairs`) or
    ``"pixel"`` (the head predicts them: its last ``C (C - 1) / 2`` output maps); ``coupling_order``
    the channel order, earliest first (None: ``0, 1, ..., C - 1``). The scales are then each
    channel's given the earlier ones (docs/math.md, "Coupled colour channels").
    """

    granularity: str = "global"
    family: str = "laplace"
    bounds: tuple[float, float] = (-7.0, 3.0)
    margin: float = 1.0
    fit: str = "learned"
    init: float = 0.0
    free: tuple[float, ...] | None = None
    calibration: dict[str, Any] | None = None
    """A post-hoc correction of the scale (:meth:`hetvae.calibration.Calibration.to_dict`), fitted
    by ``hetvae calibrate``; None: uncalibrated."""
    channel_coupling: str = "none"
    coupling: tuple[float, ...] | None = None
    coupling_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.granularity not in LIKELIHOOD_GRANULARITIES:
            raise ValueError(f"likelihood.granularity must be one of {LIKELIHOOD_GRANULARITIES}, got {self.granularity!r}")
        if self.family not in LIKELIHOOD_FAMILIES:
            raise ValueError(f"likelihood.family must be one of {LIKELIHOOD_FAMILIES}, got {self.family!r}")
        if self.fit not in ("learned", "optimal") or (self.fit == "optimal" and self.granularity == "pixel"):
            raise ValueError(f"likelihood.fit must be 'learned' (or 'optimal' for global/channel), got {self.fit!r}")
        self.bounds = finite_numbers("likelihood.bounds", self.bounds, 2)  # type: ignore[assignment]
        for name in ("margin", "init"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"likelihood.{name} must be a finite number, got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))
        if self.free is not None:
            self.free = finite_numbers("likelihood.free", self.free)
        learned = self.fit == "learned" and self.granularity != "pixel"
        if learned != (self.free is not None):
            raise ValueError(
                f"likelihood.free must hold the learned value(s) of a learned global/channel scale and be null "
                f"otherwise; got {self.free!r} for granularity {self.granularity!r}, fit {self.fit!r}"
            )
        if self.granularity == "global" and self.free is not None and len(self.free) != 1:
            raise ValueError(f"likelihood.free of a global scale must hold 1 value, got {len(self.free)}")
        self._check_coupling()
        if self.calibration is not None:
            try:
                self.calibration = self.calibrator().to_dict()  # normalised: lists of floats
            except ValueError:
                # kept as found: a model with a damaged record still loads, so that the record can be
                # removed or refitted; using it (calibrator(), a calibrated score or decode) raises
                if not isinstance(self.calibration, dict):
                    raise

    def _check_coupling(self) -> None:
        if self.channel_coupling not in ("none", "global", "pixel"):
            raise ValueError(
                f"likelihood.channel_coupling must be one of ('none', 'global', 'pixel'), got {self.channel_coupling!r}"
            )
        if self.coupling is not None:
            self.coupling = finite_numbers("likelihood.coupling", self.coupling)
        if (self.channel_coupling == "global") != (self.coupling is not None):
            raise ValueError(
                f"likelihood.coupling must hold the coefficients of channel_coupling 'global' and be null otherwise; "
                f"got {self.coupling!r} for channel_coupling {self.channel_coupling!r}"
            )
        if self.channel_coupling == "pixel" and self.granularity != "pixel":
            raise ValueError(f"likelihood.channel_coupling 'pixel' needs granularity 'pixel', got {self.granularity!r}")
        if self.coupling_order is not None:
            order = self.coupling_order
            if isinstance(order, (str, bytes)) or not isinstance(order, (list, tuple)) or not all(map(is_int, order)) \
                    or sorted(order) != list(range(len(order))) or self.channel_coupling == "none":
                raise ValueError(
                    f"likelihood.coupling_order must be null or, with coupling, a permutation of the channel indices "
                    f"such as [0, 1, 2]; got {order!r} with channel_coupling {self.channel_coupling!r}"
                )
            self.coupling_order = tuple(order)

    def bound(self, raw: Tensor, calibration: Any = None, mean: Tensor | None = None) -> Tensor:
        """A head's raw output -> this likelihood's bounded log-scale
        ``soft_clamp(raw, *bounds, margin)`` (computed in at least float32) -> corrected by
        ``calibration`` (a :class:`hetvae.calibration.Calibration`) when given; in ``raw``'s dtype.
        ``mean``: the decoded image, which a calibration's chroma term reads (required then).
        What a calibrated model's decode and an attached head return."""
        s = soft_clamp(raw.to(torch.promote_types(raw.dtype, torch.float32)), *self.bounds, self.margin)
        if calibration is not None:
            s = calibration.apply(s, None if mean is None else mean.to(s.dtype))
        return s.to(raw.dtype)

    def calibrator(self):
        """The :class:`hetvae.calibration.Calibration` stored here, or None; ``ValueError`` when the
        record cannot be read or was fitted for another family."""
        if self.calibration is None:
            return None
        try:
            cal = Calibration.from_dict(self.calibration, "likelihood.calibration")
        except CalibrationError as e:
            raise ValueError(str(e)) from None
        if cal.family != self.family:
            raise ValueError(f"likelihood.calibration was fitted for {cal.family!r}, the likelihood is {self.family!r}")
        return cal

    def with_grafted_head(self, init: float) -> Likelihood:
        """The record of a model once a fresh per-pixel head (zero weights, bias ``init``) is grafted
        on: granularity ``"pixel"``, fit ``"learned"``, no learned global/channel value and no
        calibration (it was fitted for the scale the head replaces); family, bounds and margin kept."""
        coupling = {} if self.channel_coupling != "pixel" else {"channel_coupling": "none", "coupling_order": None}
        return dataclasses.replace(
            self, granularity="pixel", fit="learned", init=float(init), free=None, calibration=None, **coupling
        )


def grafted_record(record: Likelihood | None, init: float, stacklevel: int = 2) -> Likelihood | None:
    """:meth:`Likelihood.with_grafted_head` of ``record`` (None stays None: a model without a record
    is scored with its head under the default bounds). A calibration it drops is announced with a
    one-line :class:`CalibrationDropped` warning; ``stacklevel`` as in :func:`warnings.warn`, from
    the caller of this function."""
    if record is None:
        return None
    if record.calibration is not None:
        scale = "a per-pixel head the model no longer has" if record.granularity == "pixel" else f"its {record.granularity} scale"
        warnings.warn(
            f"the model's post-hoc calibration was fitted for {scale}; the grafted per-pixel log-scale head "
            "replaces it, so the calibration is dropped (fit one for the new model with hetvae calibrate)",
            CalibrationDropped, stacklevel=stacklevel + 1,
        )
    return record.with_grafted_head(init)


def likelihood_from_nll(nll: HeteroscedasticNLL) -> Likelihood:
    """The :class:`Likelihood` record of a :class:`hetvae.loss.HeteroscedasticNLL`: granularity,
    family, bounds, margin, fit, init, the learned value(s) of a global/channel scale and the channel
    coupling (the learned coefficients of ``"global"``; ``"pixel"``'s are the head's)."""
    head = nll.head
    free = getattr(head, "free", None)
    coupling = getattr(nll, "coupling", None)
    order = getattr(nll, "coupling_order", None)
    return Likelihood(
        granularity=nll.granularity, family=nll.family, bounds=head.bounds, margin=head.margin, fit=head.fit,
        init=head.init, free=None if free is None else tuple(free.detach().cpu().flatten().tolist()),
        channel_coupling=getattr(nll, "channel_coupling", "none"),
        coupling=None if coupling is None else tuple(coupling.detach().cpu().double().tolist()),
        coupling_order=None if order is None or order == tuple(range(len(order))) else tuple(order),
    )


def nll_from_likelihood(likelihood: Likelihood, channels: int) -> HeteroscedasticNLL:
    """The :class:`hetvae.loss.HeteroscedasticNLL` a :class:`Likelihood` records (eval mode): it
    gives the same log-scales, to the bit, as the loss it was recorded from."""
    lik = likelihood
    nll = HeteroscedasticNLL(
        lik.granularity, channels=channels, family=lik.family, init=lik.init, bounds=lik.bounds,
        margin=lik.margin, fit=lik.fit, channel_coupling=lik.channel_coupling, coupling_order=lik.coupling_order,
    )
    if lik.coupling is not None:
        if len(lik.coupling) != nll.coupling.numel():
            raise ValueError(f"likelihood.coupling holds {len(lik.coupling)} value(s), {channels} channels have "
                             f"{nll.coupling.numel()} coupling coefficients")
        with torch.no_grad():
            nll.coupling.copy_(torch.tensor(lik.coupling, dtype=torch.float64).to(nll.coupling.dtype))
    if lik.free is not None:
        free = nll.head.free
        if len(lik.free) != free.numel():
            raise ValueError(f"likelihood.free holds {len(lik.free)} value(s), a {lik.granularity} scale of "
                             f"{channels} channels has {free.numel()}")
        with torch.no_grad():
            free.copy_(torch.tensor(lik.free, dtype=free.dtype).view_as(free))
    return nll.eval()


def head_config_fields(log_scale: LogScaleConfig) -> dict[str, Any]:
    """``AutoencoderConfig`` fields of the per-pixel head described by ``log_scale``."""
    return {
        "log_scale_channels": 1 if log_scale.shared else None,
        "log_scale_init": log_scale.init,
        "log_scale_detach": log_scale.detach_features,
        "log_scale_head_layers": log_scale.head_layers,
        "log_scale_head_channels": log_scale.head_channels,
        "log_scale_head_sees_mean": log_scale.head_sees_mean,
        "log_scale_head_sees_latent": log_scale.head_sees_latent,
        "log_scale_head_sees_edges": log_scale.head_sees_edges,
        "log_scale_coupling": log_scale.channel_coupling == "pixel",
    }


def nll_from_config(log_scale: LogScaleConfig, channels: int, init: float | None = None) -> HeteroscedasticNLL:
    """The training loss a ``log_scale`` section describes, for ``channels`` output channels.
    ``init``: the per-pixel head's actual bias when it differs from ``log_scale.init`` (a loaded
    head); the faithful mean's single scale still starts at ``log_scale.init``."""
    ls = log_scale
    faithful = ls.faithful and ls.granularity != "global"  # one scale gives the mean that gradient anyway
    return HeteroscedasticNLL(
        ls.granularity,
        channels=channels,
        family=ls.family,
        init=ls.init if init is None else init,
        include_constant=ls.include_constant,
        beta=ls.beta,
        bounds=ls.bounds,
        fit=ls.fit,
        faithful=faithful,
        trainable=ls.trainable,
        mean_scale=ls.mean_scale if faithful else "map",
        mean_scale_init=ls.init,
        channel_coupling=ls.channel_coupling,
        coupling_order=ls.coupling_order,
    )
