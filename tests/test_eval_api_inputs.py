"""Issue 35, item 10: the Python API's evaluate(), calibrate() and fit_calibration() take images on
the [-1, 1] scale only. uint8 tensors (torchvision.io.read_image), 0..255 floats, NaN and other
integer dtypes are refused with a ValueError naming what was found and the conversion; an image of
any floating dtype in range is scored as the command line scores the same photograph."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from PIL import Image

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import CalibrationError, fit_calibration
from hetvae.cli import main
from hetvae.convert import save_autoencoder
from hetvae.evaluate import evaluate
from hetvae.images import read_image
from hetvae.predictor import calibrate, load_predictor

SIZE = 104  # 10,816 pixels: enough for a calibration fit (MIN_PIXELS = 10,000)
SEEDS = (0, 1)
INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _png(path: Path, seed: int) -> Path:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], -1) * 0.45 + 0.5
    base[:, SIZE // 2:] += np.random.default_rng(seed).normal(0, 0.12, (SIZE, SIZE - SIZE // 2, 3))
    Image.fromarray((base.clip(0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, two photographs, and what the command line says of each (eval, calibrate)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale="pixel")
    model = save_autoencoder(AutoencoderKL(config).eval(), root / "m.safetensors")
    cli = {}
    for seed in SEEDS:
        png = _png(root / f"p{seed}.png", seed)
        assert main(["eval", str(model), "--images", str(png), "--out", str(root / f"e{seed}.json")]) == 0
        assert main(["calibrate", str(model), "--images", str(png), "--out", str(root / f"c{seed}")]) == 0
        u8 = torch.from_numpy(read_image(png).copy()).permute(2, 0, 1).contiguous()  # as torchvision.io.read_image
        cli[seed] = (u8, json.loads((root / f"e{seed}.json").read_text()), load_predictor(root / f"c{seed}").calibration)
    return load_predictor(model, calibrated=False), cli


def test_what_torchvision_and_pil_give_is_refused_with_the_conversion(setup):
    predictor, cli = setup
    u8 = cli[0][0]
    for call in (lambda x: evaluate(predictor, [x]), lambda x: calibrate(predictor, [x])):
        with pytest.raises(ValueError, match=r"got dtype torch\.uint8: convert 8-bit pixels \(0\.\.255\) with x\.float\(\) / 127\.5 - 1"):
            call(u8)
        with pytest.raises(ValueError, match=r"values span \[\d+, 255\], expected an image in \[-1, 1\]: convert 8-bit values \(0\.\.255\) with x / 127\.5 - 1"):
            call(u8.float())
    p = predictor.predict(u8.float() / 127.5 - 1)
    with pytest.raises(CalibrationError, match=r"target: expected a floating-point image in \[-1, 1\], got dtype torch\.uint8"):
        fit_calibration(u8[None], p.mean, p.log_scale)
    with pytest.raises(CalibrationError, match=r"target: values span \[\d+, 255\]"):
        fit_calibration(u8[None].double(), p.mean, p.log_scale)


def _image(u8: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """``u8`` as a user might hand it over: raw 0..255, 0..1 (``ToTensor``), [-1, 1] (right), a
    resize's overshoot past [-1, 1], or with a NaN."""
    x = u8.double()
    x = {"0..255": x, "0..1": x / 255, "[-1, 1]": x / 127.5 - 1, "overshoot": x / 127.5 - 1.02,
         "nan": torch.where(x == x.max(), math.nan, x / 127.5 - 1)}[kind]
    return x.to(dtype) if dtype.is_floating_point else x.round().clamp(0, 255).to(dtype) if dtype != torch.bool else x > 0


def _refused(call, match: str) -> bool:
    try:
        call()
    except ValueError as error:
        assert match in str(error), str(error)
        return True
    return False


KINDS = ("0..255", "0..1", "[-1, 1]", "overshoot", "nan")
SURFACES = ("evaluate", "calibrate", "fit_calibration")


@settings(max_examples=100)
@given(seed=st.sampled_from(SEEDS), dtype=st.sampled_from(INTEGER + FLOAT), kind=st.sampled_from(KINDS),
       surface=st.sampled_from(SURFACES))
def test_any_dtype_and_range_is_refused_or_scored_as_the_command_line_scores_it(setup, seed, dtype, kind, surface):
    _check(setup, seed, dtype, kind, surface)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("dtype", FLOAT, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_every_float_dtype_in_range_is_scored_as_the_command_line_scores_it(setup, seed, dtype, surface):
    """The accepted corner of the property above, every case of it (the property samples it)."""
    _check(setup, seed, dtype, "[-1, 1]", surface)


def _event(text: str) -> None:
    try:
        event(text)  # counted by --hypothesis-show-statistics
    except InvalidArgument:  # called from the parametrized test
        pass


def _check(setup, seed, dtype, kind, surface):
    predictor, cli = setup
    u8, cli_metrics, cli_calibration = cli[seed]
    x = _image(u8, dtype, kind)
    reference = predictor.predict(u8.float() / 127.5 - 1)
    call = {
        "evaluate": lambda: evaluate(predictor, [x]),
        "calibrate": lambda: calibrate(predictor, [x]),
        "fit_calibration": lambda: fit_calibration(x[None], reference.mean, reference.log_scale, predictor.family),
    }[surface]
    if not dtype.is_floating_point:
        assert _refused(call, f"got dtype {dtype}: convert 8-bit pixels (0..255) with x.float() / 127.5 - 1")
        return
    if kind in ("0..255", "overshoot"):
        assert _refused(call, "expected an image in [-1, 1]: convert 8-bit values (0..255) with x / 127.5 - 1")
        return
    if kind == "nan":
        assert _refused(call, "are NaN or infinite; expected an image of finite values in [-1, 1]")
        return
    result = call()
    _event(f"scored: {surface}, {'0..1' if kind == '0..1' else 'exact' if dtype in (torch.float32, torch.float64) else 'half'}")
    if kind == "0..1":  # inside [-1, 1]: a dark photograph as far as anyone can tell; scored, not refused
        return
    exact = dtype in (torch.float32, torch.float64)  # float16 / bfloat16 hold k / 127.5 - 1 only approximately
    if surface == "evaluate":
        for key in ("psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "ause"):
            want = cli_metrics[key]
            tol = 1e-5 if exact else {"psnr": 0.5, "nll_bpd": 0.05}.get(key, 0.02)
            assert math.isclose(result[key], want, rel_tol=tol, abs_tol=tol), (key, result[key], want)
    else:
        tol = 1e-5 if exact else 0.05
        torch.testing.assert_close(result.offset, cli_calibration.offset, rtol=tol, atol=tol)
        torch.testing.assert_close(result.slope, cli_calibration.slope, rtol=tol, atol=tol)
