"""Data sets as arrays of images in [-1, 1] (N x C x S x S) with integer labels.

One source per file, each a ``load(data_cfg) -> Dataset``; the list below is the one
place sources are registered (``data.name`` reads it). ``split`` spreads a data set over
clients, ``shards`` stores each client's part as a Parquet file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.registry import load

# name -> (loader, what data.path must name; None: no path)
SOURCES: dict[str, tuple[str, str | None]] = {
    "digits": ("ssdiff_ray.data.digits:load", None),
    "colour_digits": ("ssdiff_ray.data.colour_digits:load", None),
    "parquet": ("ssdiff_ray.data.parquet:load", "a Parquet file"),
    "image_folder": ("ssdiff_ray.data.image_folder:load", "a folder of class folders"),
}


class DataError(ValueError):
    """A user dataset that cannot be used; the message names what is wrong."""


@dataclass
class Dataset:
    images: np.ndarray            # N x C x S x S float32 in [-1, 1]
    labels: np.ndarray            # N int64; -1 where the source has no labels
    class_names: list[str] | None = None  # label k is class_names[k], where known


def load_dataset(data) -> Dataset:
    """The data set the ``[data]`` config section names."""
    return load(SOURCES[data.name][0])(data)

