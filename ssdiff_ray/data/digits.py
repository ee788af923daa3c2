"""The built-in data set: scikit-learn's 8x8 digits (it ships with the package), resized."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.data import Dataset
from ssdiff_ray.data.resize import resize


def load_digits(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 1 x S x S in [-1, 1] and labels 0..9."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    images = d.images.astype(np.float32) / 16.0  # values are 0..16
    images = resize(images, image_size)
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    return images[:, None].astype(np.float32), d.target.astype(np.int64)


def load(data) -> Dataset:
    images, labels = load_digits(data.image_size)
    return Dataset(images, labels, [str(k) for k in range(10)])
