"""``Predictor.predict`` takes one image, ``(C, H, W)`` or ``(1, C, H, W)`` in [-1, 1], and refuses
with a ``ValueError`` saying what is wrong: an image with no pixels (torch's raw "Calculated padded
input size" error before), a batch of several images (scored as one image by ``evaluate`` while
``Prediction.maps()`` kept the first), another number of dimensions or channels, and a complex
dtype (refused with advice about 8-bit pixels before). ``evaluate`` and ``calibrate`` name the image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.convert import save_autoencoder
from hetvae.evaluate import evaluate
from hetvae.images import load_images
from hetvae.predictor import calibrate, load_predictor, predict_all

SIZE = 16


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale="pixel", mid_block_attention=False)
    folder = tmp_path_factory.mktemp("model")
    return load_predictor(save_autoencoder(AutoencoderKL(config).eval(), folder / "m.safetensors"))


def _image(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1


# --- no pixels --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 0, 0), (3, 0, SIZE), (3, SIZE, 0), (1, 3, 0, 0)])
def test_an_image_with_no_pixels_is_refused_saying_so(predictor, shape):
    with pytest.raises(ValueError, match=re.escape(f"the image has no pixels (shape {tuple(shape)})")):
        predictor.predict(torch.zeros(shape))


def test_evaluate_and_calibrate_name_the_image_with_no_pixels(predictor):
    empty = torch.zeros(3, 0, 0)
    with pytest.raises(ValueError, match=r"^image #1: the image has no pixels"):
        evaluate(predictor, [_image(3, SIZE, SIZE), empty])
    with pytest.raises(ValueError, match=r"^image empty\.png: the image has no pixels"):
        evaluate(predictor, [("empty.png", empty)])
    with pytest.raises(ValueError, match=r"^image #0: the image has no pixels"):
        calibrate(predictor, [empty])


def test_an_image_file_of_no_pixels_is_refused_naming_the_file(tmp_path, predictor):
    """Pillow refuses a width or height of 0 in every format it reads; the file is named."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = tmp_path / "empty.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=rf"cannot read image {png}"):
        evaluate(predictor, load_images(png))


# --- one image, not a batch -------------------------------------------------------------------


def test_one_image_with_or_without_the_batch_dimension_gives_the_same_prediction(predictor):
    x = _image(3, SIZE, SIZE)
    a, b = predictor.predict(x), predictor.predict(x[None])
    assert a.mean.shape == b.mean.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.log_scale, b.log_scale)
    assert evaluate(predictor, [x]) == evaluate(predictor, [x[None]])


@pytest.mark.parametrize("n", [2, 5])
def test_a_batch_of_several_images_is_refused_saying_to_pass_them_one_at_a_time(predictor, n):
    batch = _image(n, 3, SIZE, SIZE)
    expected = rf"got a batch of {n} images \(shape \({n}, 3, {SIZE}, {SIZE}\)\): pass the images one at a time"
    with pytest.raises(ValueError, match=expected):
        predictor.predict(batch)
    with pytest.raises(ValueError, match=r"^image #0: " + expected):
        evaluate(predictor, [batch])
    assert len(predict_all(predictor, list(batch))) == n  # iterating over the batch is the way


def test_an_empty_batch_is_refused(predictor):
    with pytest.raises(ValueError, match=r"got a batch of 0 images \(shape \(0, 3, 16, 16\)\)"):
        predictor.predict(torch.zeros(0, 3, SIZE, SIZE))


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (3,), (1, 1, 3, SIZE, SIZE), ()])
def test_another_number_of_dimensions_is_refused(predictor, shape):
    with pytest.raises(ValueError, match=r"expected one image \(C, H, W\) or \(1, C, H, W\), got shape"):
        predictor.predict(torch.zeros(shape))


@pytest.mark.parametrize("channels", [1, 4])
def test_another_number_of_channels_is_refused(predictor, channels):
    with pytest.raises(ValueError, match=rf"expected 3 channels \(the model's in_channels\), got {channels}: shape"):
        predictor.predict(torch.zeros(channels, SIZE, SIZE))


# --- dtype --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_a_complex_image_is_refused_as_an_unsupported_dtype(predictor, dtype):
    with pytest.raises(ValueError, match=rf"dtype {dtype} is not supported") as error:
        predictor.predict(torch.zeros(3, SIZE, SIZE, dtype=dtype))
    assert "8-bit" not in str(error.value)
    with pytest.raises(ValueError, match=rf"^image #0: .*dtype {dtype} is not supported"):
        evaluate(predictor, [torch.zeros(3, SIZE, SIZE, dtype=dtype)])


def test_uint8_still_gets_the_conversion(predictor):
    with pytest.raises(ValueError, match=r"got dtype torch\.uint8: convert 8-bit pixels"):
        predictor.predict(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8))


def test_the_shape_is_checked_before_the_values(predictor):
    """A batch of 0..255 floats is told it is a batch (the values message would not help yet)."""
    with pytest.raises(ValueError, match="got a batch of 2 images"):
        predictor.predict(torch.full((2, 3, SIZE, SIZE), 255.0))


def test_a_path_is_not_an_image(predictor):
    with pytest.raises(ValueError, match="expected an image tensor in"):
        predictor.predict(Path("x.png"))
