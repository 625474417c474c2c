"""The colour dead-leaves generator: deterministic, colourful, natural-image statistics."""

import hashlib

import numpy as np
import pytest

from hetvae.procedural import dead_leaves


def test_same_generator_state_gives_the_same_image():
    a = dead_leaves(48, np.random.default_rng(7))
    b = dead_leaves(48, np.random.default_rng(7))
    c = dead_leaves(48, np.random.default_rng(8))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_images_are_coloured_with_flat_regions_and_edges():
    images = [dead_leaves(64, np.random.default_rng(i)).astype(float) for i in range(6)]
    stack = np.stack(images)
    chroma = stack.max(axis=3) - stack.min(axis=3)
    assert chroma.mean() > 20  # colour, not grey
    gradient = np.abs(np.diff(stack.mean(axis=3), axis=2))
    # photograph-like: most neighbouring pixels nearly equal (flat leaves), a minority of strong edges
    assert np.median(gradient) < 6 and np.percentile(gradient, 99) > 40


def test_power_spectrum_falls_like_a_natural_image():
    # natural images: power ~ 1/f^alpha with alpha about 2; white noise would give 0
    spectra = []
    for i in range(8):
        grey = dead_leaves(64, np.random.default_rng(i)).astype(float).mean(axis=2)
        spectra.append(np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2)
    power = np.mean(spectra, axis=0)
    yy, xx = np.mgrid[-32:32, -32:32]
    radius = np.hypot(yy, xx).astype(int)
    f = np.arange(2, 28)
    radial = np.array([power[radius == r].mean() for r in f])
    alpha = -np.polyfit(np.log(f), np.log(radial), 1)[0]
    assert 1.3 < alpha < 3.5


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="size"):
        dead_leaves(0, np.random.default_rng(0))


def test_the_images_of_a_generator_state_do_not_change_between_versions():
    """The embedded training data is a pure function of the seed: a faster renderer must draw
    the very same images, or every documented run (docs/results.md) would silently train on other
    data. Digests of the renderer as first shipped."""
    for size, digest in ((48, "c94032e30e35695b"), (160, "c7629d4926204767")):
        image = dead_leaves(size, np.random.default_rng(5))
        assert hashlib.sha256(image.tobytes()).hexdigest()[:16] == digest, size
