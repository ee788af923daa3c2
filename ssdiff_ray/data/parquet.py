"""A user data set: a Parquet table with an image column (PNG bytes or arrays) and labels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ssdiff_ray.data import DataError, Dataset
from ssdiff_ray.data.resize import resize


def _decode_image(value, index: int) -> np.ndarray:
    if isinstance(value, (bytes, bytearray)):
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(value)).convert("L")
        except Exception as e:  # noqa: BLE001 - any decoder failure is a data error
            raise DataError(f"row {index}: image bytes are not a readable image ({e})") from None
        return np.asarray(img, dtype=np.float32) / 255.0
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 1:
        side = int(round(np.sqrt(arr.size)))
        if side * side != arr.size:
            raise DataError(f"row {index}: flat image of {arr.size} values is not square")
        arr = arr.reshape(side, side)
    if arr.ndim != 2:
        raise DataError(f"row {index}: image has shape {arr.shape}, expected H x W (grayscale)")
    return arr


def load_parquet_dataset(
    path: str | Path, image_column: str = "image", label_column: str = "label", image_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """A user dataset: a Parquet table with an image column (PNG bytes or arrays) and labels.

    Array images are taken as already in [0, 1] if their max is <= 1, else as 0..255.
    Missing label column gives label -1 for every row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"dataset {path}: not a readable Parquet file ({e})") from None
    if image_column not in table.column_names:
        raise DataError(
            f"dataset {path}: no column {image_column!r} (columns: {', '.join(table.column_names)})"
        )
    if len(table) == 0:
        raise DataError(f"dataset {path}: the table has no rows")
    raw = table.column(image_column).to_pylist()
    imgs = [_decode_image(v, i) for i, v in enumerate(raw)]
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise DataError(f"dataset {path}: images have different shapes {sorted(shapes)[:3]}")
    images = np.stack(imgs)
    if images.max() > 1.0:
        images = images / 255.0
    if not np.isfinite(images).all():
        raise DataError(f"dataset {path}: images contain NaN or Inf")
    images = np.clip(resize(images, image_size), 0.0, 1.0) * 2.0 - 1.0
    if label_column in table.column_names:
        labels = np.asarray(table.column(label_column).to_pylist(), dtype=np.int64)
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    return images[:, None].astype(np.float32), labels


def load(data) -> Dataset:
    images, labels = load_parquet_dataset(data.path, data.image_column, data.label_column,
                                          data.image_size)
    return Dataset(images, labels)
