"""A user data set in Parquet: an image column of arrays (H x W or H x W x C), encoded
PNG/JPEG bytes, or Hugging Face `datasets`' image struct {"bytes", "path"}; an optional label
column of integers or class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ssdiff_ray.data import DataError, Dataset
from ssdiff_ray.data.decode import decode_value, to_array, to_labels


def read_table(path: str | Path, image_column: str):
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error
        raise DataError(f"dataset {path}: not a readable Parquet file ({e})") from None
    if image_column not in table.column_names:
        raise DataError(f"dataset {path}: no column {image_column!r} "
                        f"(columns: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise DataError(f"dataset {path}: the table has no rows")
    return table


def load(data) -> Dataset:
    table = read_table(data.path, data.image_column)
    where = f"dataset {data.path}"
    raw = table.column(data.image_column).to_pylist()
    wheres = [f"{where} row {i}" for i in range(len(raw))]
    base = Path(data.path).resolve().parent  # where an image struct's path may point
    images = to_array([decode_value(v, w, base) for v, w in zip(raw, wheres)], wheres,
                      data.image_size)
    if data.label_column not in table.column_names:
        return Dataset(images, np.full(len(images), -1, dtype=np.int64))
    labels, names = to_labels(table.column(data.label_column).to_pylist(), data.label_type,
                              f"{where} column {data.label_column!r}")
    return Dataset(images, labels, names)
