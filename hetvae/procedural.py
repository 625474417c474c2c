"""Procedural natural-looking images: a colour dead-leaves model with texture.

The dead-leaves model (Matheron 1968; Lee, Mumford & Huang 2001) drops opaque shapes one on top of
the other. With radii drawn from ``p(r) ~ r^-3`` the result is scale invariant and has the power
spectrum, occlusion edges and flat-region statistics of natural photographs. Restoration networks
trained on colour dead leaves with texture come close to ones trained on photographs (Achddou,
Gousseau & Ladjal 2021; Baradad et al. 2021), which makes it a useful complement to the few colour
photographs that ship offline: it brings every hue, sharp edges at every orientation and smooth
shading, but no content that could leak into a held-out photograph.

:func:`dead_leaves` is a pure function of its ``numpy.random.Generator``: the same generator state
gives the same image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["dead_leaves"]


def _leaf_colour(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour in [0, 1] (shape ``(3,)``): hue uniform, saturation mostly moderate
    (photographs rarely saturate), value spread over the range."""
    # size-1 draws: the generator advances exactly as it always has, so the images stay the same
    h, s, v = rng.random(1)[0], rng.beta(1.5, 2.5, 1)[0], rng.beta(2.0, 1.6, 1)[0]
    h6 = h * 6.0  # HSV -> RGB
    i = int(np.floor(h6)) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array(((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i])


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A zero-mean texture over the coordinates ``yy, xx``: a sinusoidal grating or smooth noise."""
    if rng.random() < 0.5:
        freq = rng.uniform(0.05, 0.6)  # cycles per pixel at the rendering resolution
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        return np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    # value noise: a coarse random grid bilinearly interpolated (cheap band-limited noise)
    cell = rng.uniform(1.5, 8.0)
    gh, gw = int(size / cell) + 3, int(size / cell) + 3
    grid = rng.standard_normal((gh, gw))
    gy, gx = yy / cell, xx / cell
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = gy - y0, gx - x0
    # np.minimum / np.maximum: np.clip's own overhead dominated these small integer arrays
    y0, x0 = np.minimum(np.maximum(y0, 0), gh - 2), np.minimum(np.maximum(x0, 0), gw - 2)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy) / 0.6


def dead_leaves(
    size: int,
    rng: np.random.Generator,
    *,
    min_radius: float = 3.0,
    max_radius: float | None = None,
    supersample: int = 2,
) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 colour dead-leaves image.

    Shapes (discs, or ellipses with probability 1/2) with radii from ``p(r) ~ r^-3`` on
    ``[min_radius, max_radius]`` pixels (default ``max_radius``: ``size``) are stacked until
    99.8% of the canvas is covered (the rest is a background colour); each has a random colour, and with probability 0.7 a texture (a grating
    or smooth noise, amplitude up to 30% of its colour) and a linear shading gradient. The image is
    rendered ``supersample`` times larger and reduced with an area filter (antialiased edges), then
    with probability 0.3 blurred slightly (depth of field) and given faint sensor noise.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    s = max(int(supersample), 1)
    big = size * s
    r_min = min_radius * s
    r_max = (max_radius if max_radius is not None else size) * s
    canvas = np.zeros((big, big, 3), dtype=np.float32)
    covered = np.zeros((big, big), dtype=bool)
    n_covered = 0  # covered.sum(), kept up to date: a full-canvas count per shape dominated large images
    # drawn front to back: a new shape only paints the pixels nobody in front of it covered
    for _ in range(2000):
        if n_covered > 0.998 * covered.size:
            break
        u = rng.random()
        # inverse CDF of p(r) ~ r^-3 on [r_min, r_max]
        r = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
        cy, cx = rng.uniform(-r, big + r, 2)
        ry, rx = (r, r) if rng.random() < 0.5 else (r * rng.uniform(0.4, 1.0), r)
        angle = rng.uniform(0, np.pi)
        extent = max(ry, rx)
        y0, y1 = max(int(cy - extent), 0), min(int(cy + extent) + 2, big)
        x0, x1 = max(int(cx - extent), 0), min(int(cx + extent) + 2, big)
        if y0 >= y1 or x0 >= x1:
            continue  # off the canvas
        # only the box's pixels that nobody in front covers can be painted: every expression below
        # runs on them alone (element by element the same arithmetic as over the whole box)
        free_y, free_x = np.nonzero(~covered[y0:y1, x0:x1])
        if free_y.size == 0:
            continue  # hidden behind what is already drawn (no draw is skipped)
        yy = (free_y + y0).astype(np.float32)
        xx = (free_x + x0).astype(np.float32)
        dy, dx = yy - cy, xx - cx
        ca, sa = np.cos(angle), np.sin(angle)
        inside = ((ca * dx + sa * dy) / rx) ** 2 + ((-sa * dx + ca * dy) / ry) ** 2 <= 1.0
        if not inside.any():
            continue
        yy, xx, dy, dx = yy[inside], xx[inside], dy[inside], dx[inside]
        colour = _leaf_colour(rng).astype(np.float32)
        value = np.empty((yy.size, 3), dtype=np.float32)
        value[:] = colour
        if rng.random() < 0.7:
            amplitude = rng.uniform(0.05, 0.3)
            value *= 1 + amplitude * _texture(rng, yy / s, xx / s, size)[..., None]
            g = rng.uniform(-0.4, 0.4, 2) / max(extent, 1.0)
            value *= (1 + g[0] * dy + g[1] * dx)[..., None]
        rows, cols = free_y[inside] + y0, free_x[inside] + x0
        canvas[rows, cols] = value
        covered[rows, cols] = True
        n_covered += rows.size
    # the few pixels left uncovered get the colour of a last, background leaf
    canvas[~covered] = _leaf_colour(rng)
    canvas = np.clip(canvas, 0.0, 1.0)
    image = Image.fromarray(np.rint(canvas * 255).astype(np.uint8))
    if s > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    out = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.3:
        out = np.asarray(Image.fromarray(out.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))),
                         dtype=np.float32)
        out = out + rng.normal(0.0, rng.uniform(0.5, 2.0), out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
