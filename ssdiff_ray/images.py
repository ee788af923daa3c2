"""Sample grids as PNG files (NumPy and PIL only: the driver writes them without torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> one uint8 grid image (H' x W' or H' x W' x 3)."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.zeros((c, ncol * (h + 1) + 1, nrow * (w + 1) + 1), dtype=np.float32)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = (
            (im + 1) / 2
        )
    grid = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: np.ndarray, path: str | Path, scale: int = 4) -> None:
    """Write a PNG grid of the images, upscaled ``scale`` times (nearest) for viewing."""
    from PIL import Image

    g = image_grid(images)
    g = np.kron(g, np.ones((scale, scale) + (() if g.ndim == 2 else (1,)), dtype=np.uint8))
    Image.fromarray(g).save(path)


def to_png(image: np.ndarray) -> bytes:
    """One C x H x W image in [-1, 1] as PNG bytes (grayscale or RGB, 8 bits)."""
    import io

    from PIL import Image

    a = (np.clip((np.asarray(image, dtype=np.float32) + 1) / 2, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes -> C x H x W float32 in [-1, 1] (inverse of ``to_png`` up to 8-bit rounding)."""
    import io

    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 127.5 - 1
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
