"""Shared test helpers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a bounded number of examples in the default run (2 CPU cores), no per-example
# deadline (the first call of a torch op can be slow), reproducible (derandomized) so CI is stable.
# HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))


def _assert_matches_reference(ours: Callable, model, theirs: Callable, ref, *inputs: torch.Tensor) -> None:
    """``ours(model, *inputs)`` computes what ``theirs(ref, *inputs)`` does.

    * In float64 (copies of both models) the two agree to rounding, 1e-10: every weight is mapped
      right, whichever kernels each side picks. In float32 a difference of ~1e-5 is only rounding:
      on outputs of magnitude ~3, diffusers' own float32 result moves by 1.1e-5 when its input is
      channels_last instead of NCHW, and lies 8e-6 from its float64 result.
    * So in float32 hetvae must be as accurate as the reference itself: its distance to the
      reference's float64 output at most 4x the reference's own float32 error (or 1e-6): with 16
      threads on another CPU one conversion test measured 2.03x (7.1e-6 vs 3.5e-6), while a
      half-precision or wrong-order slip costs ~1e-3.
    """
    with torch.no_grad():
        got32, want32 = ours(model, *inputs), theirs(ref, *inputs)
        model64, ref64 = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
        wide = [t.double() for t in inputs]
        got64, want64 = ours(model64, *wide), theirs(ref64, *wide)
    torch.testing.assert_close(got64, want64, rtol=0, atol=1e-10)
    ours_err = (got32.double() - want64).abs().max().item()
    ref_err = (want32.double() - want64).abs().max().item()
    assert ours_err <= max(4 * ref_err, 1e-6), f"float32 error {ours_err:.3g} vs the reference's own {ref_err:.3g}"


@pytest.fixture
def assert_matches_reference():
    return _assert_matches_reference


def write_noise_photos(folder: Path, count: int, size: int, seed: int, prefix: str = "im") -> Path:
    """``count`` uniform-noise RGB PNGs ``{prefix}{i}.png`` of ``size`` x ``size`` pixels in ``folder``
    (which must exist), from ``numpy.random.default_rng(seed)``; returns ``folder``. Training data for
    tiny test runs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder
