"""A fused forward/backward of the reduced heteroscedastic NLL, for the training hot path.

:class:`hetvae.loss.HeteroscedasticNLL` computes, per element and with ``k = 1`` (Laplace,
``d = |r|``) or ``k = 2`` (Gaussian, ``d = r^2 / 2``), ``r = x - mu``::

    nll  = (d + extra) * e + s (+ const),      e = exp(-k s)
    loss = sum(c * nll),                       c = w * sg(exp(k beta s)) / n

with ``n`` the batch size (reduction "batch") or the element count ("mean"). Written eagerly that
is a dozen passes over the image forward and as many backward, each saving its own temporary. The
loss's gradients are elementwise and known in closed form::

    dloss/dmu    = -c e d'(r)            d'(r) = sign(r) (Laplace), r (Gaussian)
    dloss/dx     =  c e d'(r)
    dloss/ds     =  c (1 - k (d + extra) e)      summed to the shape of s
    dloss/dextra =  c e                          summed to the shape of extra
    dloss/dw     =  sg(exp(k beta s)) nll / n    summed to the shape of w

(beta's weight is a stop-gradient, so it only scales). :class:`FusedNLL` computes ``loss``, the
``nll`` map and these gradients *per unit of* ``dloss`` in the same forward pass, reusing the
residual buffer in place, and keeps only the gradients it will return; its backward multiplies
them by the incoming gradient (or returns them as they are when that is 1). ``nll`` is a
differentiable output too (the objective differentiates it for SD's adaptive GAN weight); that
rarer path recomputes the per-element derivatives from the saved inputs with the eager reference.

Shapes: ``target`` and ``mean`` ``(B, C, *spatial)`` of one float dtype (the caller upcasts half
precision); ``log_scale``, ``weights`` and ``extra`` already broadcastable to them and of that
dtype (``()``, ``(1, C, 1, 1)``, ``(B, 1, H, W)``, ...: never materialised at full size unless the
math needs it). :mod:`hetvae.functional` keeps the readable eager reference this is tested against.

How it runs (``HETVAE_FUSED``, see :func:`mode`): large inputs go through ``torch.compile`` of
:func:`_forward`, which turns the whole forward, unit gradients included, into one or two loops over
the image (seconds of compilation once per configuration; a failed compile warns once and falls
back). Otherwise the same function runs eagerly, still several times fewer passes than the
reference. Either way :class:`hetvae.loss.HeteroscedasticNLL` also skips the head's full-size soft
clamp when the predicted map lies in its identity band. ``benchmarks/nll.py`` measures all three.

Double backward through the fused path is not supported (``once_differentiable``); set
``HETVAE_FUSED=0`` to run the eager reference instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hetvae.functional import beta_weight, distance, log_normalizer, nll_from_distance

MODES = ("auto", "compile", "eager", "0")
COMPILE_MIN_NUMEL = 1 << 19
"""In mode "auto", inputs of at least this many elements (e.g. (4, 3, 256, 256)) go through
``torch.compile``: a few seconds of compilation once per shape family, then one pass instead of a
dozen. Smaller ones, such as the tests' and most interactive calls, never wait for a compiler."""


def mode() -> str:
    """``HETVAE_FUSED``: "auto" (default; compile large inputs), "compile" (always), "eager" (the
    fused math without ``torch.compile``) or "0" (the eager reference, e.g. for double backward)."""
    value = os.environ.get("HETVAE_FUSED", "auto")
    if value not in MODES:
        raise ValueError(f"HETVAE_FUSED must be one of {MODES}, got {value!r}")
    return value


def enabled() -> bool:
    """Whether :class:`hetvae.loss.HeteroscedasticNLL` takes the fused path at all."""
    return mode() != "0"


@dataclass(frozen=True)
class NLLSpec:
    """The non-tensor settings of one NLL: family, beta, constant, and the reduction ("batch" or
    "mean", which sets the divisor ``n`` of the sum)."""

    family: str
    beta: float
    include_constant: bool
    reduction: str

    @property
    def k(self) -> float:
        return 1.0 if self.family == "laplace" else 2.0


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the input it came from."""
    return t if t.shape == shape else t.sum_to_size(shape)


def reference(
    target: Tensor, mean: Tensor, log_scale: Tensor, weights: Tensor | None, extra: Tensor | None, spec: NLLSpec
) -> tuple[Tensor, Tensor]:
    """``(loss, nll)`` written eagerly with :mod:`hetvae.functional`: the definition the fused path must equal."""
    d = distance(target, mean, spec.family)
    if extra is not None:
        d = d + extra
    nll = nll_from_distance(d, log_scale, spec.family)
    if spec.include_constant:
        nll = nll + log_normalizer(spec.family)
    weighted = nll
    if spec.beta > 0.0:
        weighted = weighted * beta_weight(log_scale, spec.beta, spec.family)
    if weights is not None:
        weighted = weighted * weights
    weighted = torch.broadcast_to(weighted, target.shape)
    loss = weighted.sum() / target.shape[0] if spec.reduction == "batch" else weighted.mean()
    return loss, torch.broadcast_to(nll, target.shape)


def _beta_weight(e: Tensor, s: Tensor, spec: NLLSpec) -> Tensor:
    """beta-NLL's ``exp(k beta s) = e^-beta``, from ``e`` where that is cheaper than a second exp
    (eager ``exp`` is the dearest op of the loss on a CPU; ``pow`` is dearer still)."""
    if spec.beta == 0.5:
        return torch.rsqrt(e)
    if spec.beta == 1.0:
        return torch.reciprocal(e)
    return torch.exp(s * (spec.k * spec.beta))


def _forward(
    target: Tensor,
    mean: Tensor,
    s: Tensor,
    weights: Tensor | None,
    extra: Tensor | None,
    spec: NLLSpec,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """``loss``, ``nll`` and the unit gradients of ``loss`` for the inputs flagged in ``needs``
    (target, mean, log_scale, weights, extra).

    On a CPU a fresh full-size buffer costs more than the arithmetic written into it (first-touch
    page faults: an out-of-place op measured several times its in-place twin inside this loss), so
    every full-size temporary is written once and reused in place once its value is dead.
    """
    k = spec.k
    n = target.shape[0] if spec.reduction == "batch" else target.numel()
    # r = mu - x, the negated residual: d'(r) then has the sign dloss/dmu needs, saving a pass.
    r = mean - target
    d = r.abs() if spec.family == "laplace" else r.square().mul_(0.5)
    if extra is not None:
        d.add_(extra)  # d is full-size (it came from r), so any broadcastable extra fits in place
    e = torch.mul(s, -k).exp_()  # shape of s: a scalar, a channel vector or a map, never broadcast here
    nll = torch.addcmul(s, d, e)  # s + d e, full-size
    if spec.include_constant:
        nll.add_(log_normalizer(spec.family))

    # c = w * sg(b^beta) / n, the weight of each element's nll in the loss; None when it is 1/n
    c: Tensor | None = None
    if spec.beta > 0.0:
        c = _beta_weight(e, s, spec).div_(n)
    if weights is not None:
        c = weights / n if c is None else c * weights

    grads: list[Tensor | None] = [None] * 5
    need_target, need_mean, need_s, need_w, need_extra = needs
    if need_w:
        bw = 1.0 if spec.beta == 0.0 else _beta_weight(e, s, spec)
        grads[3] = _sum_to(nll * bw / n, weights.shape)
    if need_extra:  # dloss/dextra = c e per element
        grads[4] = _sum_to(torch.broadcast_to(e / n if c is None else c * e, target.shape), extra.shape)
    if need_s:
        if c is None and s.numel() < target.numel():
            # A shared scale: sum(1 - k d e) over its elements is count - k e sum(d); no full temporary.
            count = target.numel() // s.numel()
            grads[2] = (count - k * e * _sum_to(d, s.shape)) / n
        else:
            # d is dead: (1 - k d e) / n, or (1 - k d e) c, written into its buffer
            one = torch.full((), 1.0 / n if c is None else 1.0, dtype=d.dtype, device=d.device)
            t = torch.addcmul(one, d, e, value=-k / n if c is None else -k, out=d)
            grads[2] = _sum_to(t if c is None else t.mul_(c), s.shape)
    if need_mean or need_target:
        # r is dead: dloss/dmu = d'(r) c e in place, with d'(r) = sign(r) (torch's |r|' at 0 is 0 too) or r
        g = (r.sign_() if spec.family == "laplace" else r).mul_(e)
        g = g.div_(n) if c is None else g.mul_(c)
        grads[1] = g if need_mean else None
        grads[0] = (g.neg() if need_mean else g.neg_()) if need_target else None

    # Divide the plain sum by n exactly as the reference does, so the common case is bit-identical.
    if c is None:
        loss = nll.sum() / n
    else:
        # the weighted sum needs one full-size product: into e's buffer when that is full-size (now dead)
        spare = e if e.shape == nll.shape else None
        loss = torch.mul(nll, c, out=spare).sum()
    return loss, nll, grads


_compiled: Callable | None = None
_compile_failed = False


def _dispatch(target, mean, s, weights, extra, spec, needs):
    """Run :func:`_forward` compiled where that pays (see :data:`COMPILE_MIN_NUMEL`) and works."""
    global _compiled, _compile_failed
    current = mode()
    want = current == "compile" or (current == "auto" and target.numel() >= COMPILE_MIN_NUMEL)
    if not want or _compile_failed or torch.compiler.is_compiling():
        return _forward(target, mean, s, weights, extra, spec, needs)  # (an outer compile fuses it anyway)
    if _compiled is None:
        _compiled = torch.compile(_forward)
    try:
        return _compiled(target, mean, s, weights, extra, spec, needs)
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        out = _forward(target, mean, s, weights, extra, spec, needs)  # a genuine input error raises here
        _compile_failed = True
        warnings.warn(f"hetvae.fused: torch.compile failed ({type(err).__name__}: {err}); using the eager fused NLL")
        return out


class FusedNLL(torch.autograd.Function):
    """``(loss, nll) = FusedNLL.apply(target, mean, log_scale, weights, extra, spec)``.

    ``log_scale`` is the bounded log-scale (the soft clamp is the caller's); ``weights`` and
    ``extra`` may be None. ``loss`` is a scalar, ``nll`` the per-element map ``target.shape``
    (before weights and beta). Both are differentiable; see the module docstring for the math.
    """

    @staticmethod
    def forward(ctx, target, mean, log_scale, weights, extra, spec):
        needs = tuple(ctx.needs_input_grad[:5])
        loss, nll, grads = _dispatch(target, mean, log_scale, weights, extra, spec, needs)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.units = [i for i, g in enumerate(grads) if g is not None]
        # The inputs themselves are only read again if nll's own gradient is asked for.
        ctx.save_for_backward(target, mean, log_scale, weights, extra, *(grads[i] for i in ctx.units))
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_nll):
        saved = ctx.saved_tensors
        inputs, units = saved[:5], saved[5:]
        grads: list[Tensor | None] = [None] * 5
        if grad_loss is not None:
            # On the CPU reading the scalar is free and saves a pass per gradient when it is 1
            # (a plain loss.backward()); elsewhere it would synchronise, so always multiply.
            one = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
            for i, unit in zip(ctx.units, units):
                grads[i] = unit if one else unit * grad_loss
        if grad_nll is not None:
            for i, g in enumerate(_nll_vjp(inputs, ctx.spec, grad_nll, ctx.needs_input_grad[:5])):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (*grads, None)


def _nll_vjp(inputs, spec: NLLSpec, grad_nll: Tensor, needs) -> tuple[Tensor | None, ...]:
    """Vector-Jacobian product of the per-element ``nll`` map, by autograd through the reference."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        _, nll = reference(*leaves, spec)
        wanted = [t for t, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(nll, wanted, grad_nll, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def fused_nll(
    target: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    weights: Tensor | None,
    extra: Tensor | None,
    spec: NLLSpec,
) -> tuple[Tensor, Tensor]:
    """``(loss, nll)`` through :class:`FusedNLL`; the same values as :func:`reference`."""
    return FusedNLL.apply(target, mean, log_scale, weights, extra, spec)


def in_identity_band(log_scale: Tensor, bounds: tuple[float, float], margin: float) -> bool:
    """Whether every value lies where :func:`hetvae.functional.soft_clamp` is exactly the identity,
    ``[low + margin, high - margin]`` (value and gradient 1). NaN is never inside. One read pass."""
    low, high = bounds
    lo, hi = torch.aminmax(log_scale.detach())
    return bool((lo >= low + margin) & (hi <= high - margin))
