"""The fused NLL (hetvae.fused) against the eager reference: values, gradients, broadcasting, dtypes."""

import pytest
import torch

from hetvae import fused
from hetvae.functional import FAMILIES
from hetvae.loss import HeteroscedasticNLL

SHAPE = (2, 3, 4, 5)
LOG_SCALE_SHAPES = {"global": (), "channel": (1, 3, 1, 1), "shared": (2, 1, 4, 5), "pixel": SHAPE}


@pytest.fixture
def fused_mode(monkeypatch):
    def set_mode(value):
        monkeypatch.setenv("HETVAE_FUSED", value)

    set_mode("eager")  # the fused math without torch.compile: fast, and what compile must equal
    return set_mode


def _inputs(dtype, scale_shape, *, weights=False, extra_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    mu = (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    s = (torch.randn(scale_shape, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    w = torch.rand((2, 1, 4, 5), generator=g, dtype=torch.float64).to(dtype) if weights else None
    extra = None if extra_shape is None else torch.rand(extra_shape, generator=g, dtype=torch.float64).to(dtype)
    return [x, mu, s, w, extra]


def _loss_and_grads(fn, inputs, spec, with_nll):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    loss, nll = fn(*leaves, spec)
    total = loss + (nll * torch.linspace(0.5, 1.5, nll.numel(), dtype=nll.dtype).view(nll.shape)).sum() if with_nll else loss
    wanted = [t for t in leaves if t is not None]
    return [loss, nll, *torch.autograd.grad(total, wanted)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", list(LOG_SCALE_SHAPES))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_fused_equals_the_eager_reference(family, scale, beta, dtype, tol, fused_mode):
    for reduction, weights, extra_shape, constant, with_nll in [
        ("batch", False, None, False, False),
        ("mean", True, (2, 1, 1, 1), True, False),
        ("batch", True, (2, 1, 4, 5), False, True),  # nll's own gradient too (SD's adaptive weight)
    ]:
        spec = fused.NLLSpec(family, beta, constant, reduction)
        inputs = _inputs(dtype, LOG_SCALE_SHAPES[scale], weights=weights, extra_shape=extra_shape)
        got = _loss_and_grads(fused.fused_nll, inputs, spec, with_nll)
        want = _loss_and_grads(fused.reference, inputs, spec, with_nll)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", list(LOG_SCALE_SHAPES))
def test_gradcheck_through_the_function(family, scale):
    # beta = 0: finite differences in every input, through both outputs (loss and the nll map)
    spec = fused.NLLSpec(family, 0.0, True, "batch")
    inputs = _inputs(torch.float64, LOG_SCALE_SHAPES[scale], weights=True, extra_shape=(2, 1, 1, 1))
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: fused.FusedNLL.apply(*t, spec), tuple(inputs))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_gradcheck_with_beta(family, beta):
    # beta's weight is a stop-gradient of s: finite differences may move everything but s
    spec = fused.NLLSpec(family, beta, False, "batch")
    x, mu, s, w, extra = _inputs(torch.float64, SHAPE, weights=True, extra_shape=(2, 1, 4, 5))
    args = tuple(t.requires_grad_(True) for t in (x, mu, w, extra))
    assert torch.autograd.gradcheck(lambda x, mu, w, e: fused.FusedNLL.apply(x, mu, s, w, e, spec), args)


@pytest.mark.parametrize("granularity,map_channels", [("global", None), ("channel", None), ("pixel", 3), ("pixel", 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("push", [0.0, 4.0])
def test_module_matches_the_reference_path(granularity, map_channels, dtype, push, fused_mode):
    # the module end to end, half precision upcast; push=4 puts part of the map outside the soft
    # clamp's identity band (the head's clamp), push=0 keeps it inside (the clamp is skipped)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(SHAPE, generator=g) * 2 - 1).to(dtype)
    mu = (torch.rand(SHAPE, generator=g) * 2 - 1).to(dtype)
    raw = None if map_channels is None else (torch.randn((2, map_channels, 4, 5), generator=g) * (1 + push)).to(dtype)
    crit = HeteroscedasticNLL(granularity, family="gaussian", beta=0.5)
    if granularity != "pixel":
        with torch.no_grad():
            crit.head.free.fill_(push + 0.3)
    results = []
    for value in ("0", "eager"):
        fused_mode(value)
        leaves = [mu.detach().requires_grad_(True)]
        leaves += list(crit.parameters()) if raw is None else [raw.detach().requires_grad_(True)]
        out = crit(x, leaves[0], log_scale=None if raw is None else leaves[1])
        results.append([out.loss, out.nll, out.log_scale, *torch.autograd.grad(out.loss, leaves)])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    assert results[1][0].dtype == torch.float32 and results[1][3].dtype == dtype


def test_identity_band_and_errors(fused_mode):
    assert fused.in_identity_band(torch.tensor([-6.0, 2.0]), (-7.0, 3.0), 1.0)
    assert not fused.in_identity_band(torch.tensor([-6.01, 0.0]), (-7.0, 3.0), 1.0)
    assert not fused.in_identity_band(torch.tensor([float("nan")]), (-7.0, 3.0), 1.0)
    # the skipped head still checks the map's shape, with its own message
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"predicted log_scale map of shape \(2, 2, 4, 5\) does not fit target"):
        HeteroscedasticNLL("pixel")(x, x, log_scale=torch.zeros(2, 2, 4, 5))
    fused_mode("fast")
    with pytest.raises(ValueError, match="HETVAE_FUSED must be one of"):
        HeteroscedasticNLL("global")(x, x)


def test_gradient_scaled_by_the_incoming_gradient(fused_mode):
    spec = fused.NLLSpec("laplace", 0.5, False, "batch")
    x, mu, s, _, _ = _inputs(torch.float32, SHAPE)
    mu.requires_grad_(True)
    (one,) = torch.autograd.grad(fused.fused_nll(x, mu, s, None, None, spec)[0], mu)
    (three,) = torch.autograd.grad(3.0 * fused.fused_nll(x, mu, s, None, None, spec)[0], mu)
    torch.testing.assert_close(three, 3.0 * one)
    assert one.abs().sum() > 0


def test_falls_back_to_eager_when_compile_fails(fused_mode, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(fused, "_compiled", None)
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    fused_mode("compile")
    spec = fused.NLLSpec("laplace", 0.0, False, "batch")
    inputs = _inputs(torch.float32, SHAPE)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        got = _loss_and_grads(fused.fused_nll, inputs, spec, False)
    assert fused._compile_failed
    want = _loss_and_grads(fused.reference, inputs, spec, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # a genuine input error still raises, and does not count as a compiler failure
    monkeypatch.setattr(fused, "_compile_failed", False)
    with pytest.raises(RuntimeError, match="size"):
        fused.fused_nll(inputs[0], inputs[1], torch.zeros(2, 2, 4, 5), None, None, spec)
    assert not fused._compile_failed


@pytest.mark.slow
def test_compiled_equals_eager(fused_mode):
    torch._dynamo.reset()
    for family in FAMILIES:
        spec = fused.NLLSpec(family, 0.5, False, "batch")
        inputs = _inputs(torch.float32, (2, 1, 4, 5), weights=True)
        fused_mode("eager")
        want = _loss_and_grads(fused.fused_nll, inputs, spec, False)
        fused_mode("compile")
        got = _loss_and_grads(fused.fused_nll, inputs, spec, False)
        assert not fused._compile_failed
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
