"""The loss API under hostile inputs (issue 13, items 14 and 15): every call gives a correct result,
checked against ``torch.distributions``, or a ``ValueError`` that names the culprit; never a raw
traceback, never a silent coercion.

Property-based tests draw one culprit at a time on top of valid arguments, so the error must name
that argument; valid draws must match an independent float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch.distributions import Laplace, Normal

from hetvae.functional import FAMILIES, gaussian_nll, laplace_nll
from hetvae.heads import DEFAULT_BOUNDS, DEFAULT_MARGIN, GRANULARITIES, LOG_SCALE_LIMIT, create_head
from hetvae.loss import HeteroscedasticNLL

DIST = {"laplace": Laplace, "gaussian": Normal}
CONST = {"laplace": math.log(2.0), "gaussian": 0.5 * math.log(2.0 * math.pi)}
K = {"laplace": 1.0, "gaussian": 2.0}
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NOT_FLOATS = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]
SHAPE = (2, 3, 4, 4)


@pytest.fixture(params=["eager", "0"], ids=["fused", "reference"])
def fused_mode(request, monkeypatch):
    """Both paths of HeteroscedasticNLL: the fused forward/backward and the eager reference."""
    monkeypatch.setenv("HETVAE_FUSED", request.param)
    return request.param


def _xy(shape=SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(dtype), (torch.rand(shape, generator=g) * 2 - 1).to(dtype)


# --- item 14: init within the margin of a bound ---------------------------------------------------


def test_init_within_margin_of_a_bound_is_refused():
    with pytest.raises(ValueError, match=r"init=-6.5 .*margin 1.0 of bounds \(-7.0, 3.0\).* -6.39"):
        HeteroscedasticNLL("global", init=-6.5)
    with pytest.raises(ValueError, match=r"init=2.5 .*\[-6.0, 2.0\]"):
        HeteroscedasticNLL("channel", init=2.5)
    with pytest.raises(ValueError, match=r"init=-6.5"):
        HeteroscedasticNLL("pixel", init=-6.5)  # the head's bias would be moved just the same
    # fit="optimal" never uses init; inside the bounds it is accepted as before
    HeteroscedasticNLL("global", init=-6.5, fit="optimal")


@pytest.mark.parametrize("init,margin", [(-6.0, 1.0), (2.0, 1.0), (-6.5, 0.5), (-6.9, 0.1)])
def test_an_init_inside_the_band_reproduces_sd_exactly(init, margin):
    x, mu = _xy()
    crit = HeteroscedasticNLL("global", init=init, margin=margin)
    out = crit(x, mu)
    assert out.log_scale == torch.tensor(init)
    logvar = torch.tensor(init)
    sd = ((x - mu).abs() / torch.exp(logvar) + logvar).sum() / x.shape[0]
    torch.testing.assert_close(out.loss, sd, rtol=1e-6, atol=0)


# --- item 15: the loss API's inputs --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_input_is_refused(shape, fused_mode):
    x = torch.zeros(shape)
    for reduction in ("batch", "mean"):
        with pytest.raises(ValueError, match=r"target of shape \(%s\) has no elements" % ", ".join(map(str, shape))):
            HeteroscedasticNLL("global", reduction=reduction)(x, x)


@pytest.mark.parametrize("dtype", NOT_FLOATS)
def test_integer_bool_and_complex_tensors_are_refused(dtype, fused_mode):
    x, mu = _xy()
    bad = torch.zeros(SHAPE, dtype=dtype)
    crit = HeteroscedasticNLL("global")
    for kwargs, name in [
        (dict(target=bad, mean=mu), "target"),
        (dict(target=x, mean=bad), "mean"),
        (dict(target=x, mean=mu, weights=bad), "weights"),
        (dict(target=x, mean=mu, extra_distance=bad), "extra_distance"),
    ]:
        with pytest.raises(ValueError, match=rf"{name} has dtype {dtype}; .*floating-point"):
            crit(**kwargs)
    with pytest.raises(ValueError, match=rf"log_scale has dtype {dtype}"):
        HeteroscedasticNLL("pixel")(x, mu, log_scale=bad)
    for fn in (laplace_nll, gaussian_nll):
        with pytest.raises(ValueError, match=rf"target has dtype {dtype}"):
            fn(bad, mu, torch.zeros(()))
        with pytest.raises(ValueError, match=rf"log_scale has dtype {dtype}"):
            fn(x, mu, bad)


@pytest.mark.parametrize("name", ["weights", "extra_distance"])
@pytest.mark.parametrize("shape", [(5,), (3,), (4,), (2, 3, 4, 5), (1, 2, 3, 4, 4), (2, 3, 4), (3, 1, 1, 1)])
def test_weights_and_extra_distance_of_a_wrong_shape_are_named(name, shape, fused_mode):
    # (3,) and (4,) would broadcast along the last dimension (W = 4), not the channels: ambiguous, refused
    x, mu = _xy()
    pattern = rf"{name} of shape \({', '.join(map(str, shape))},?\) does not fit target of shape \(2, 3, 4, 4\)"
    with pytest.raises(ValueError, match=pattern):
        HeteroscedasticNLL("global")(x, mu, **{name: torch.ones(shape)})


def test_negative_extra_distance_is_refused(fused_mode):
    x, mu = _xy()
    extra = torch.tensor([0.5, -0.25]).view(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"extra_distance must be >= 0 .* -0.25"):
        HeteroscedasticNLL("global")(x, mu, extra_distance=extra)


@pytest.mark.parametrize(
    "bounds",
    [(-100.0, 100.0), (-math.inf, math.inf), (-7.0, math.inf), (-21.0, 3.0), (-7.0, 20.5), (math.nan, 3.0)],
)
def test_bounds_where_exp_can_overflow_are_refused(bounds):
    with pytest.raises(ValueError, match=r"bounds .* must be finite and inside \[-20.0, 20.0\]"):
        HeteroscedasticNLL("global", bounds=bounds)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("push", [-1e4, 1e4])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_widest_bounds_stay_finite(family, granularity, push, beta, fused_mode):
    """What docs/math.md promises: inside [-20, 20], exp(-k s) and the beta weight cannot overflow float32,
    even with residuals of 1e4 and a log-scale pushed far past the bounds."""
    x = torch.full(SHAPE, 1e4).requires_grad_(True)
    mu = torch.full(SHAPE, -1e4).requires_grad_(True)
    crit = HeteroscedasticNLL(granularity, family=family, bounds=(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT), beta=beta)
    raw = None
    if granularity == "pixel":
        raw = torch.full(SHAPE, push).requires_grad_(True)
    else:
        with torch.no_grad():
            crit.head.free.fill_(push)
    out = crit(x, mu, log_scale=raw)
    params = [x, mu] + ([raw] if raw is not None else [crit.head.free])
    grads = torch.autograd.grad(out.loss, params)
    assert torch.isfinite(out.loss) and torch.isfinite(out.nll).all()
    assert all(torch.isfinite(g).all() for g in grads)


# --- property-based: the constructor -------------------------------------------------------------

_junk = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans())


def _valid_bounds_for_zero(low, high):
    """Bounds valid with init 0 and margin 1: finite, inside the limit, 0 in [low + 1, high - 1]."""
    return -LOG_SCALE_LIMIT <= low <= -1.0 and 1.0 <= high <= LOG_SCALE_LIMIT and high - low > 2.0


_valid_base = dict(
    channels=3, family="laplace", init=0.0, include_constant=False, beta=0.0, bounds=DEFAULT_BOUNDS,
    margin=DEFAULT_MARGIN, fit="learned", reduction="batch", faithful=False,
)
_bad_args = {
    "granularity": st.one_of(_junk, st.text(max_size=8).filter(lambda s: s not in GRANULARITIES), st.integers()),
    "family": st.one_of(_junk, st.text(max_size=8).filter(lambda s: s not in FAMILIES), st.integers()),
    "init": st.one_of(
        _junk, st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not -6.0 <= v <= 2.0)
    ),
    "bounds": st.one_of(
        _junk,
        st.tuples(st.floats(), st.floats()).filter(lambda b: not _valid_bounds_for_zero(*b)),
        st.lists(st.floats(-5, 5), min_size=0, max_size=4).filter(lambda b: len(b) != 2).map(tuple),
    ),
    "margin": st.one_of(_junk, st.floats().filter(lambda m: not 0.0 < m <= 3.0)),
    "channels": st.one_of(_junk, st.integers(max_value=0), st.floats()),
    "beta": st.one_of(_junk, st.floats().filter(lambda b: not 0.0 <= b <= 1.0)),
    "fit": st.one_of(_junk, st.text(max_size=8).filter(lambda s: s not in ("learned", "optimal"))),
    "reduction": st.one_of(_junk, st.text(max_size=8).filter(lambda s: s not in ("batch", "mean"))),
    "include_constant": st.one_of(st.none(), st.text(max_size=3), st.integers(), st.floats()),
    "faithful": st.one_of(st.none(), st.text(max_size=3), st.integers(), st.floats(), st.just(True)),
}


@given(
    granularity=st.sampled_from(GRANULARITIES),
    culprit=st.sampled_from(sorted(_bad_args)),
    data=st.data(),
)
def test_constructor_refuses_each_bad_argument_by_name(granularity, culprit, data):
    value = data.draw(_bad_args[culprit], label=culprit)
    if culprit == "faithful" and value is True:
        assume(granularity == "global")  # faithful=True is valid for pixel and channel
    kwargs = dict(_valid_base, **{culprit: value})
    args = (value,) if culprit == "granularity" else (granularity,)
    kwargs.pop("granularity", None)
    with pytest.raises(ValueError) as err:
        HeteroscedasticNLL(*args, **kwargs)
    assert culprit in str(err.value), str(err.value)


@given(
    granularity=st.sampled_from(GRANULARITIES),
    family=st.sampled_from(FAMILIES),
    low=st.floats(-LOG_SCALE_LIMIT, 0.0),
    width=st.floats(0.5, 2 * LOG_SCALE_LIMIT),
    margin_fraction=st.floats(0.01, 0.49),
    init_at=st.floats(0.0, 1.0),
    channels=st.integers(1, 5),
    beta=st.floats(0.0, 1.0),
    fit=st.sampled_from(["learned", "optimal"]),
    include_constant=st.booleans(),
)
def test_constructor_accepts_valid_arguments_and_starts_at_init(
    granularity, family, low, width, margin_fraction, init_at, channels, beta, fit, include_constant
):
    high = min(low + width, LOG_SCALE_LIMIT)
    margin = margin_fraction * (high - low)
    assume(high - low > 2 * margin > 0)
    init = (low + margin) + init_at * (high - low - 2 * margin)  # anywhere in the identity band
    assume(low + margin <= init <= high - margin)
    if granularity == "pixel":
        fit = "learned"
    crit = HeteroscedasticNLL(
        granularity, channels=channels, family=family, init=init, include_constant=include_constant,
        beta=beta, bounds=(low, high), margin=margin, fit=fit,
    )
    assert crit.head.bounds == (low, high) and crit.head.init == init and crit.beta == beta
    if fit == "learned" and granularity != "pixel":
        x = torch.zeros((1, channels, 2, 2))
        s = crit.log_scale(x, x)
        assert (s == torch.tensor(init, dtype=torch.float32)).all(), (s, init)  # exactly init, item 14


# --- property-based: the forward pass against torch.distributions ---------------------------------


def _ref_clamp(x, low, high, m):
    a, b = low + m, high - m
    below = low + m * torch.exp(torch.clamp(x - a, max=0.0) / m)
    above = high - m * torch.exp(torch.clamp(b - x, max=0.0) / m)
    return torch.where(x < a, below, torch.where(x > b, above, x))


def _ref_nll(x, mu, s, family, include_constant, extra):
    """-log p from torch.distributions in float64, with SD's extra distance added to the data term."""
    nll = -DIST[family](mu, torch.exp(s)).log_prob(x)
    if extra is not None:
        nll = nll + extra * torch.exp(-K[family] * s)
    return nll if include_constant else nll - CONST[family]


@st.composite
def _shapes(draw):
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    return (b, c) + spatial


def _broadcastable(draw, full, name):
    """A shape the loss accepts for weights / extra_distance: () or one entry per target dimension, each
    the target's or 1."""
    if draw(st.booleans(), label=f"{name} scalar"):
        return ()
    return tuple(d if draw(st.booleans()) else 1 for d in full)


def _tensor(draw, shape, lo, hi, dtype, label):
    values = draw(st.lists(st.floats(lo, hi), min_size=math.prod(shape), max_size=math.prod(shape)), label=label)
    return torch.tensor(values, dtype=torch.float64).view(shape).to(dtype)


@given(data=st.data())
def test_forward_matches_torch_distributions(data, fused_mode):
    draw = data.draw
    shape = draw(_shapes(), label="shape")
    granularity = draw(st.sampled_from(GRANULARITIES), label="granularity")
    family = draw(st.sampled_from(FAMILIES), label="family")
    dtype = draw(st.sampled_from(FLOATS), label="dtype")
    beta = draw(st.sampled_from([0.0, 0.5, 1.0, 0.3]), label="beta")
    include_constant = draw(st.booleans(), label="include_constant")
    reduction = draw(st.sampled_from(["batch", "mean"]), label="reduction")
    init = draw(st.floats(-3.0, 1.0), label="init")
    x = _tensor(draw, shape, -100, 100, dtype, "target")
    mu = _tensor(draw, shape, -100, 100, dtype, "mean")
    weights = extra = raw = None
    if draw(st.booleans(), label="use weights"):
        weights = _tensor(draw, _broadcastable(draw, shape, "weights"), 0.0, 3.0, dtype, "weights")
    if draw(st.booleans(), label="use extra"):
        extra = _tensor(draw, _broadcastable(draw, shape, "extra"), 0.0, 3.0, dtype, "extra_distance")

    crit = HeteroscedasticNLL(
        granularity, channels=shape[1], family=family, init=init, include_constant=include_constant,
        beta=beta, reduction=reduction,
    )
    if dtype == torch.float64:
        crit = crit.double()
    low, high = crit.head.bounds
    if granularity == "pixel":
        c = draw(st.sampled_from([1, shape[1]]), label="map channels")
        raw = _tensor(draw, (shape[0], c) + shape[2:], -30, 30, dtype, "log_scale")
        s = _ref_clamp(raw.double(), low, high, crit.head.margin)
    else:
        free = _tensor(draw, crit.head.free.shape, -15, 15, crit.head.free.dtype, "free")
        with torch.no_grad():
            crit.head.free.copy_(free)
        s = _ref_clamp(init + free.double(), low, high, crit.head.margin)
        if granularity == "channel":
            s = s.view((1, -1) + (1,) * (len(shape) - 2))

    out = crit(x, mu, log_scale=raw, weights=weights, extra_distance=extra)

    xd, md = x.double(), mu.double()
    ed = None if extra is None else extra.double()
    want_nll = _ref_nll(xd, md, s, family, include_constant, ed)
    weighted = want_nll * torch.exp(K[family] * beta * s)
    if weights is not None:
        weighted = weighted * weights.double()
    weighted = torch.broadcast_to(weighted, shape)
    n = shape[0] if reduction == "batch" else math.prod(shape)
    want_loss = weighted.sum() / n

    # error scale: float32 rounding of each term (the compute dtype of every input but float64)
    eps = 1e-12 if dtype == torch.float64 else 2e-6
    d = (xd - md).abs() if family == "laplace" else 0.5 * (xd - md) ** 2
    if ed is not None:
        d = d + ed
    size = torch.broadcast_to(d * torch.exp(-K[family] * s) + s.abs() + 1.0, shape)
    assert out.nll.shape == shape and out.nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ((out.nll.double() - want_nll).abs() <= 8 * eps * size * (1 + s.abs())).all()
    wsize = size * torch.exp(K[family] * beta * s) * (1.0 if weights is None else weights.double())
    tol = 8 * eps * (torch.broadcast_to(wsize * (1 + s.abs()), shape).sum() / n) + 1e-30
    assert (out.loss.double() - want_loss).abs() <= tol, (out.loss, want_loss)
    torch.testing.assert_close(out.log_scale.double(), s.to(out.log_scale.dtype).double(), rtol=8 * eps, atol=8 * eps)


# --- property-based: hostile forward inputs, one culprit at a time -----------------------------------

_bad_value = st.one_of(st.none(), st.text(max_size=4), st.lists(st.floats(-1, 1), max_size=3), st.floats(), st.integers())


def _valid_aux_shape(shape, full):
    """The rule for weights / extra_distance: all ones (a scalar in effect) or target.ndim dimensions,
    each the target's or 1."""
    return (len(shape) <= len(full) and all(s == 1 for s in shape)) or (len(shape) == len(full) and all(s in (1, t) for s, t in zip(shape, full)))


def _valid_map_shape(shape, full):
    """The pixel head's rule: (B, C|1, *spatial)."""
    return len(shape) == len(full) and shape[0] == full[0] and shape[2:] == full[2:] and shape[1] in (1, full[1])


@given(data=st.data())
def test_hostile_forward_inputs_give_a_named_error_or_a_correct_result(data, fused_mode):
    draw = data.draw
    granularity = draw(st.sampled_from(GRANULARITIES), label="granularity")
    family = draw(st.sampled_from(FAMILIES), label="family")
    culprit = draw(st.sampled_from(["target", "mean", "log_scale", "weights", "extra_distance"]), label="culprit")
    kind = draw(st.sampled_from(["shape", "dtype", "value", "object"]), label="kind")
    full = (2, 3, 4, 4)
    x, mu = _xy(full)
    args = dict(target=x, mean=mu, log_scale=torch.zeros(full) if granularity == "pixel" else None,
                weights=None, extra_distance=None)
    valid = False
    if kind == "object":
        args[culprit] = draw(_bad_value, label="value")
        if culprit == "log_scale" and args[culprit] is None:
            valid = granularity != "pixel"
        if culprit in ("weights", "extra_distance") and args[culprit] is None:
            valid = True
    elif kind == "dtype":
        dtype = draw(st.sampled_from(FLOATS + NOT_FLOATS), label="dtype")
        args[culprit] = torch.full(full, 0.5, dtype=dtype) if dtype in FLOATS else torch.ones(full, dtype=dtype)
        valid = dtype in FLOATS and (culprit != "log_scale" or granularity == "pixel")
    elif kind == "value":
        value = draw(st.floats(-10, 10), label="value")
        args[culprit] = torch.full(full, value)
        valid = (culprit != "extra_distance" or value >= 0) and (culprit != "log_scale" or granularity == "pixel")
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=5), label="shape"))
        args[culprit] = torch.rand(shape)
        if culprit == "target":
            args["mean"] = torch.rand(shape)  # both: the target's own shape is on trial
            valid = len(shape) >= 2 and math.prod(shape) > 0 and (granularity == "global" or shape[1] == 3)
            if granularity == "pixel":
                args["log_scale"] = torch.zeros(shape)
        elif culprit == "mean":
            valid = shape == full
        elif culprit == "log_scale":
            valid = granularity == "pixel" and _valid_map_shape(shape, full)
        else:
            valid = _valid_aux_shape(shape, full)

    crit = HeteroscedasticNLL(granularity, family=family)
    event(f"valid={valid}")
    if not valid:
        with pytest.raises(ValueError) as err:
            crit(**args)
        assert culprit in str(err.value), str(err.value)
        return
    out = crit(**args)  # a valid draw: the result must be the reference's
    target, mean = args["target"].double(), args["mean"].double()
    s = args["log_scale"]
    s = _ref_clamp(s.double(), *crit.head.bounds, crit.head.margin) if s is not None else torch.zeros((), dtype=torch.float64)
    extra = args["extra_distance"]
    nll = _ref_nll(target, mean, s, family, False, None if extra is None else extra.double())
    if args["weights"] is not None:
        nll = nll * args["weights"].double()
    want = torch.broadcast_to(nll, target.shape).sum() / target.shape[0]
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)


# --- property-based: laplace_nll / gaussian_nll --------------------------------------------------


def _valid_functional_shape(shape, full):
    """The functional rule: (), (C,) along dimension 1, or target.ndim dimensions each the target's or 1."""
    if len(shape) == 0:
        return True
    if len(full) < 2:
        return False
    return (len(shape) == 1 and shape[0] == full[1]) or _valid_aux_shape(shape, full)


@given(data=st.data())
def test_functional_nll_matches_torch_distributions_or_names_the_culprit(data):
    draw = data.draw
    family = draw(st.sampled_from(FAMILIES), label="family")
    fn = laplace_nll if family == "laplace" else gaussian_nll
    include_constant = draw(st.booleans(), label="include_constant")
    full = draw(_shapes(), label="shape")
    culprit = draw(st.sampled_from(["none", "target", "mean", "log_scale"]), label="culprit")
    dtypes = {"none": FLOATS + NOT_FLOATS, "target": NOT_FLOATS}.get(culprit, FLOATS)
    dtype = draw(st.sampled_from(dtypes), label="target dtype")
    x = _tensor(draw, full, -50, 50, torch.float64, "target")
    mu = _tensor(draw, full, -50, 50, draw(st.sampled_from(FLOATS), label="mean dtype"), "mean")
    s_shape = draw(st.sampled_from([(), (full[1],), full, (1,) * len(full)]), label="log_scale shape")
    s = _tensor(draw, s_shape, -10, 10, draw(st.sampled_from(FLOATS), label="log_scale dtype"), "log_scale")
    args = dict(target=x.to(dtype), mean=mu, log_scale=s)
    valid = True
    if culprit == "target":
        valid = False
    elif culprit == "mean":
        kind = draw(st.sampled_from(["shape", "object", "dtype"]), label="kind")
        if kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=5), label="mean shape"))
            args["mean"] = torch.rand(shape)
            valid = shape == full
        elif kind == "object":
            args["mean"] = draw(_bad_value, label="mean value")
            valid = False
        else:
            args["mean"] = mu.to(draw(st.sampled_from(NOT_FLOATS), label="mean dtype"))
            valid = False
    elif culprit == "log_scale":
        kind = draw(st.sampled_from(["shape", "object", "dtype", "number"]), label="kind")
        if kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=5), label="log_scale shape"))
            args["log_scale"] = torch.rand(shape)
            valid = _valid_functional_shape(shape, full)
        elif kind == "object":
            args["log_scale"] = draw(st.one_of(st.none(), st.text(max_size=4), st.lists(st.floats(-1, 1), max_size=3)))
            valid = False
        elif kind == "number":
            args["log_scale"] = draw(st.one_of(st.floats(-10, 10), st.integers(-10, 10)), label="log_scale number")
        else:
            args["log_scale"] = s.to(draw(st.sampled_from(NOT_FLOATS), label="log_scale dtype"))
            valid = False
    else:
        valid = dtype in FLOATS

    event(f"valid={valid}")
    if not valid:
        with pytest.raises(ValueError) as err:
            fn(**args, include_constant=include_constant)
        name = "target" if culprit == "none" else culprit
        assert name in str(err.value), str(err.value)
        return
    got = fn(**args, include_constant=include_constant)
    target, mean = args["target"].double(), args["mean"].double()
    ls = torch.as_tensor(args["log_scale"], dtype=torch.float64)
    if ls.ndim == 1:
        ls = ls.view((1, -1) + (1,) * (len(full) - 2))
    want = torch.broadcast_to(_ref_nll(target, mean, ls, family, include_constant, None), full)
    assert got.shape == full
    dtypes = [t.dtype for t in args.values() if isinstance(t, torch.Tensor)]
    assert got.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * (1 + want.abs().max().item()))
