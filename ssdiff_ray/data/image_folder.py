"""A user data set as an image folder in the usual layout: ``root/<class name>/*.png|jpg``.
Class names, sorted, become labels 0..K-1; their order is saved with the run.

As torchvision's ``ImageFolder``: every image is converted to one mode, RGB unless
``data.channels = 1`` (grey), so a folder mixing grey, palette, CMYK and RGBA files loads;
files that are not images by their suffix are skipped. A warning counts both."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ssdiff_ray.data import DataError, Dataset
from ssdiff_ray.data.decode import as_array, open_image, to_array

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def load(data) -> Dataset:
    root = Path(data.path)
    if not root.is_dir():
        raise DataError(f"image folder {root}: no such directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root}: no class folders (expected root/<class>/*.png)")
    mode = "L" if data.channels == 1 else "RGB"
    images, wheres, labels = [], [], []
    converted: Counter = Counter()  # original mode -> images converted from it
    skipped: list[str] = []
    for k, folder in enumerate(classes):
        entries = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        files = [f for f in entries if f.suffix.lower() in SUFFIXES]
        skipped += [str(f.relative_to(root)) for f in entries if f.suffix.lower() not in SUFFIXES]
        if not files:
            raise DataError(f"image folder {root}: class folder {folder.name!r} has no images "
                            f"({', '.join(SUFFIXES)})")
        for f in files:
            try:
                img = open_image(f.read_bytes(), f"image {f}")
            except OSError as e:
                raise DataError(f"image {f}: not readable ({e.strerror})") from None
            if img.mode != mode:
                converted[img.mode] += 1
            images.append(as_array(img, mode))
            wheres.append(f"image {f}")
            labels.append(k)
    _report(root, mode, converted, skipped)
    return Dataset(to_array(images, wheres, data.image_size), np.array(labels, np.int64),
                   [c.name for c in classes])


def _report(root: Path, mode: str, converted: Counter, skipped: list[str]) -> None:
    parts = []
    if converted:
        modes = ", ".join(f"{n} {m}" for m, n in converted.most_common())
        parts.append(f"{sum(converted.values())} images converted to {mode} ({modes})")
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        parts.append(f"{len(skipped)} files that are not images skipped ({shown})")
    if parts:
        warnings.warn(f"image folder {root}: {'; '.join(parts)}", stacklevel=2)
