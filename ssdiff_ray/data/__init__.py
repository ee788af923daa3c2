"""Data sets as arrays of images in [-1, 1] (N x C x S x S) with integer labels.

One source per file, each a ``load(data_cfg) -> Dataset``; the list below is the one
place sources are registered (``data.name`` reads it). ``split`` spreads a data set over
clients, ``shards`` stores each client's part as a Parquet file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.errors import UserError
from ssdiff_ray.registry import load

# name -> (loader, what data.path must name; None: no path)
SOURCES: dict[str, tuple[str, str | None]] = {
    "digits": ("ssdiff_ray.data.digits:load", None),
    "colour_digits": ("ssdiff_ray.data.colour_digits:load", None),
    "parquet": ("ssdiff_ray.data.parquet:load", "a Parquet file"),
    "image_folder": ("ssdiff_ray.data.image_folder:load", "a folder of class folders"),
}


class DataError(UserError):
    """A user dataset that cannot be used; the message names what is wrong."""


@dataclass
class Dataset:
    images: np.ndarray            # N x C x S x S float32 in [-1, 1]
    labels: np.ndarray            # N int64; -1 where the source has no labels
    class_names: list[str] | None = None  # label k is class_names[k], where known


def load_dataset(data) -> Dataset:
    """The data set the ``[data]`` config section names (only ``data.classes``, if set)."""
    dataset = load(SOURCES[data.name][0])(data)
    return select_classes(dataset, data.classes) if data.classes else dataset


def select_classes(dataset: Dataset, classes: str) -> Dataset:
    """Keep the labels ``classes`` names ('5-9'), relabelled 0..K-1 in that order."""
    keep = parse_classes(classes)
    if dataset.labels.min() < 0:
        raise DataError(f"data.classes = {classes!r}: the data set has no labels")
    missing = sorted(set(keep) - set(np.unique(dataset.labels).tolist()))
    if missing:
        raise DataError(f"data.classes = {classes!r}: no images of class {missing[0]}")
    rows = np.isin(dataset.labels, keep)
    relabel = {c: i for i, c in enumerate(keep)}
    labels = np.array([relabel[int(c)] for c in dataset.labels[rows]], dtype=np.int64)
    names = [dataset.class_names[c] if dataset.class_names else str(c) for c in keep]
    return Dataset(dataset.images[rows], labels, names)


def parse_classes(text: str) -> list[int]:
    """``data.classes`` ('5-9', '1,3,7') as a sorted list of labels."""
    bad = ValueError(f"data.classes = {text!r}: must be labels like '5-9' or '1,3,7'")
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise bad from None
    if not out or min(out) < 0:
        raise bad
    return sorted(out)
