"""Each client's part of the data as one Parquet file, which its pool reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def shard_path(shard_dir: str | Path, client_id: int) -> Path:
    return Path(shard_dir) / f"client_{client_id:06d}.parquet"


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
        table = table.replace_schema_metadata({"image_side": str(side),
                                               "image_channels": str(images.shape[1])})
        path = shard_path(out_dir, cid)
        pq.write_table(table, path, compression="none")
        paths.append(path)
    return paths


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A client's shard back as (images N x C x S x S float32, labels int64)."""
    table = pq.read_table(path)
    meta = table.schema.metadata
    side, channels = int(meta[b"image_side"]), int(meta.get(b"image_channels", b"1"))
    col = table.column("image").combine_chunks()
    flat = np.array(col.values.to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
    images = flat.reshape(len(table), channels, side, side)
    labels = table.column("label").to_numpy()
    return images, labels
