"""Datasets as tables of images, the non-IID Dirichlet split, and per-client Parquet shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """A user dataset that cannot be used; the message names what is wrong."""


def _source_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (i0, i1, weight of i1) per output index, as torch's interpolate with
    align_corners=False computes them (half-pixel centres, clamped at the first pixel)."""
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) \
        - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x H x W float images to N x size x size, in NumPy (the driver
    prepares the data and must not import torch); equal to torch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` up to float rounding."""
    x = images.astype(np.float32)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    r0, r1, wr = _source_weights(x.shape[-2], size)
    c0, c1, wc = _source_weights(x.shape[-1], size)
    rows = x[:, r0, :] * (1 - wr)[None, :, None] + x[:, r1, :] * wr[None, :, None]
    return (rows[:, :, c0] * (1 - wc) + rows[:, :, c1] * wc).astype(np.float32)


def load_digits(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (ships with the package): images N x 1 x S x S in [-1, 1], labels."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    images = d.images.astype(np.float32) / 16.0  # values are 0..16
    images = _resize(images, image_size)
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    return images[:, None].astype(np.float32), d.target.astype(np.int64)


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
    images = np.clip(_resize(images, image_size), 0.0, 1.0) * 2.0 - 1.0
    if label_column in table.column_names:
        labels = np.asarray(table.column(label_column).to_pylist(), dtype=np.int64)
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    return images[:, None].astype(np.float32), labels


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int = 2
) -> list[np.ndarray]:
    """Non-IID split: each class is spread over clients with Dirichlet(alpha) proportions.

    Small alpha gives label skew and quantity skew. Every client gets at least
    ``min_samples`` indices (taken from the largest clients) so no client is empty;
    with more clients than samples, samples are reused across clients.
    Returns a sorted index array per client.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes = np.unique(labels)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    shards = [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]
    # Top up clients below min_samples: move from the largest shard while it can spare,
    # else sample with replacement from the whole set (more clients than data).
    for k in range(num_clients):
        while len(shards[k]) < min_samples:
            big = int(np.argmax([len(s) for s in shards]))
            if len(shards[big]) > min_samples:
                take, shards[big] = shards[big][-1], shards[big][:-1]
            else:
                take = rng.integers(0, n)
            shards[k] = np.sort(np.append(shards[k], take))
    return [s.astype(np.int64) for s in shards]


def write_shards(
    images: np.ndarray, labels: np.ndarray, split: list[np.ndarray], out_dir: Path
) -> list[Path]:
    """One Parquet file per client: columns ``image`` (fixed-size float32 list) and ``label``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    side = images.shape[-1]
    paths = []
    for cid, idx in enumerate(split):
        flat = images[idx].reshape(len(idx), -1)
        values = pa.array(flat.ravel(), type=pa.float32())
        col = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
        table = pa.table({"image": col, "label": pa.array(labels[idx], type=pa.int64())})
        table = table.replace_schema_metadata({"image_side": str(side)})
        path = out_dir / f"client_{cid:06d}.parquet"
        pq.write_table(table, path, compression="none")
        paths.append(path)
    return paths


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A client's shard back as (images N x 1 x S x S float32, labels int64)."""
    table = pq.read_table(path)
    side = int(table.schema.metadata[b"image_side"])
    col = table.column("image").combine_chunks()
    flat = np.array(col.values.to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
    images = flat.reshape(len(table), 1, side, side)
    labels = table.column("label").to_numpy()
    return images, labels
