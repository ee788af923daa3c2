"""Bilinear resizing in NumPy: the driver prepares the data and must not import torch."""

from __future__ import annotations

import numpy as np


def _source_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (i0, i1, weight of i1) per output index, as torch's interpolate with
    align_corners=False computes them (half-pixel centres, clamped at the first pixel)."""
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) \
        - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ... x H x W float images to ... x size x size; equal to torch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` up to float rounding."""
    x = images.astype(np.float32)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    r0, r1, wr = _source_weights(x.shape[-2], size)
    c0, c1, wc = _source_weights(x.shape[-1], size)
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return (rows[..., c0] * (1 - wc) + rows[..., c1] * wc).astype(np.float32)
