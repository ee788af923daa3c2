"""A user data set as an image folder in the usual layout: ``root/<class name>/*.png|jpg``.
Class names, sorted, become labels 0..K-1; their order is saved with the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssdiff_ray.data import DataError, Dataset
from ssdiff_ray.data.decode import read_image_bytes, to_array

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def load(data) -> Dataset:
    root = Path(data.path)
    if not root.is_dir():
        raise DataError(f"image folder {root}: no such directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root}: no class folders (expected root/<class>/*.png)")
    images, wheres, labels = [], [], []
    for k, folder in enumerate(classes):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"image folder {root}: class folder {folder.name!r} has no images "
                            f"({', '.join(SUFFIXES)})")
        for f in files:
            images.append(read_image_bytes(f.read_bytes(), f"image {f}"))
            wheres.append(f"image {f}")
            labels.append(k)
    return Dataset(to_array(images, wheres, data.image_size), np.array(labels, np.int64),
                   [c.name for c in classes])
