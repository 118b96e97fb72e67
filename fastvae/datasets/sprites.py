"""The built-in procedural dataset: dSprites-like shapes (Matthey et al. 2017,
"dSprites: Disentanglement testing Sprites dataset"), rendered on the fly from
a seed, with their five generative factors, so that ``fastvae train`` needs
no download and disentanglement scores (MIG) have known factors.
"""

from __future__ import annotations

import numpy as np

from fastvae.datasets.dataset import Dataset
from fastvae.errors import DataError
from fastvae.training.memory import preflight
from fastvae.naming import option

SPRITE_FACTORS = ["shape", "scale", "orientation", "pos_x", "pos_y"]
SPRITE_SHAPES = ["square", "ellipse", "heart"]


def render_sprites(shape, scale, orientation, pos_x, pos_y, size: int = 64) -> np.ndarray:
    """Binary ``(N, size, size)`` uint8 images of dSprites-like shapes
    (Matthey et al. 2017): ``shape`` in {0 square, 1 ellipse, 2 heart},
    ``scale`` in [0.5, 1], ``orientation`` in radians, ``pos_x``/``pos_y`` in [0, 1]."""
    n = len(shape)
    out = np.zeros((n, size, size), dtype=np.uint8)
    c = (np.arange(size, dtype=np.float32) + 0.5)
    r0 = size * 0.16                      # half-size of a scale-1 shape, pixels
    margin = size * 0.17
    f32 = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]
    for k in range(3):
        ids = np.flatnonzero(np.asarray(shape) == k)
        for s in range(0, len(ids), 1024):
            e = ids[s:s + 1024]
            cx = margin + f32(pos_x[e]) * (size - 2 * margin)
            cy = margin + f32(pos_y[e]) * (size - 2 * margin)
            th = f32(orientation[e])
            rad = f32(scale[e]) * r0
            cos, sin = np.cos(th) / rad, np.sin(th) / rad
            dx, dy = c[None, None, :] - cx, c[None, :, None] - cy
            u = cos * dx + sin * dy
            v = cos * dy - sin * dx
            if k == 0:
                m = np.maximum(np.abs(u), np.abs(v)) <= 0.8
            elif k == 1:
                m = u * u + 4.0 * v * v <= 1.0
            else:                          # heart curve, point down, centred
                hu, hv = u * 1.1, v * -1.1 + 0.15
                r = hu * hu + hv * hv - 1
                m = r * r * r <= hu * hu * hv * hv * hv
            out[e] = m
    return out


def make_sprites(n: int = 12000, seed: int = 0, size: int = 64, test_fraction: float = 0.1) -> Dataset:
    """The built-in procedural dataset: ``n`` random dSprites-like images.

    Factors drawn uniformly from the dSprites grid: shape (3), scale (6 values
    in [0.5, 1]), orientation (40 values in [0, 2 pi)), x and y position (32
    values each in [0, 1]). Seeded and reproducible; labels are the shape
    index, all five factor values are in ``factors_*``. Zero downloads.
    Raises DataError for fewer than 2 sprites, ConfigError when the images
    (uint8 while drawn, then float32: 5 bytes a pixel) would not fit in
    memory (checked before anything is drawn).
    """
    if n < 2:
        raise DataError(f"n_sprites must be at least 2, got {n}")
    preflight(n * (size * size * 5 + 6 * 8), None, f"{n:,} sprites of {size}x{size} pixels",
              f"use a smaller {option('n_sprites')}")
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = rng.integers(0, 3, n)
    scale = np.linspace(0.5, 1.0, 6)[rng.integers(0, 6, n)]
    orient = np.linspace(0, 2 * np.pi, 40, endpoint=False)[rng.integers(0, 40, n)]
    px = np.linspace(0, 1, 32)[rng.integers(0, 32, n)]
    py = np.linspace(0, 1, 32)[rng.integers(0, 32, n)]
    imgs = render_sprites(shape, scale, orient, px, py, size)
    factors = np.stack([shape, scale, orient, px, py], axis=1).astype(np.float64)
    n_test = int(round(n * test_fraction))
    n_tr = n - n_test
    x = imgs.reshape(n, -1).astype(np.float32)
    y = shape.astype(np.int64)
    te = slice(n_tr, n) if n_test else slice(0, 0)
    return Dataset("sprites", x[:n_tr], y[:n_tr], x[te] if n_test else None, y[te] if n_test else None,
                   (size, size), label_names=SPRITE_SHAPES,
                   factors_train=factors[:n_tr], factors_test=factors[te] if n_test else None,
                   factor_names=SPRITE_FACTORS)
