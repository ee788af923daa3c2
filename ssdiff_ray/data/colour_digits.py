"""The built-in colour data set, made on the fly (no download): 32 x 32 RGB digits.

Each image is one of scikit-learn's handwritten digits, upscaled, scaled (16-26 px) and
placed at a random position, drawn in a class-dependent hue (jittered) on a textured
background of another hue: low-frequency colour noise plus a random stripe pattern. A
model must learn shape (which digit) and colour (which hue goes with it) and not copy the
background. Seeded: the same images on every machine.
"""

from __future__ import annotations

import numpy as np

from ssdiff_ray.data import Dataset
from ssdiff_ray.data.resize import resize

SIDE = 32
COPIES = 3  # renderings of each of the 1,797 digits: 5,391 images


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns ... x 3."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t),
                                                 (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None], 0)[0]


def _background(rng: np.random.Generator, hue: float) -> np.ndarray:
    """SIDE x SIDE x 3: a dim hue with low-frequency noise and faint stripes."""
    coarse = rng.random((4, 4)).astype(np.float32)
    noise = resize(coarse[None], SIDE)[0]
    yy, xx = np.mgrid[:SIDE, :SIDE] / SIDE
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    value = 0.18 + 0.22 * noise + 0.08 * stripes
    h = np.full((SIDE, SIDE), hue) + 0.05 * (noise - 0.5)
    s = np.full((SIDE, SIDE), rng.uniform(0.35, 0.7))
    return _hsv_to_rgb(h % 1.0, s, value)


def _glyph(digit: np.ndarray, side: int) -> np.ndarray:
    """An 8 x 8 digit (0..16) as a soft side x side mask in [0, 1]."""
    up = resize((digit / 16.0).astype(np.float32)[None], side)[0]
    return np.clip((up - 0.25) * 2.5, 0.0, 1.0)


def make_colour_digits(seed: int = 0, copies: int = COPIES) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 3 x 32 x 32 in [0, 1] and labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(copies):
        for digit, y in zip(d.images, d.target):
            side = int(rng.integers(16, 27))
            r0, c0 = rng.integers(0, SIDE - side + 1, 2)
            mask = np.zeros((SIDE, SIDE), np.float32)
            mask[r0:r0 + side, c0:c0 + side] = _glyph(digit, side)
            fg_hue = (y / 10.0 + rng.uniform(-0.03, 0.03)) % 1.0
            fg = _hsv_to_rgb(np.array(fg_hue), np.array(rng.uniform(0.65, 1.0)),
                             np.array(rng.uniform(0.75, 1.0)))
            bg = _background(rng, (fg_hue + rng.uniform(0.3, 0.7)) % 1.0)
            img = bg * (1 - mask[..., None]) + fg * mask[..., None]
            images.append(img.transpose(2, 0, 1))
            labels.append(int(y))
    return np.stack(images).astype(np.float32), np.array(labels, np.int64)


def load(data) -> Dataset:
    images, labels = make_colour_digits()
    images = resize(images, data.image_size)
    return Dataset(np.clip(images, 0, 1) * 2 - 1, labels, [str(k) for k in range(10)])
