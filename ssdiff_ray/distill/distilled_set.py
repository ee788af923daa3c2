"""A distilled data set on disk: ``data.parquet`` (PNG bytes and labels, readable as
``data.name = parquet``), ``manifest.json`` (where it came from) and ``grid.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssdiff_ray.distill import DistillError
from ssdiff_ray.images import from_png, save_grid, to_png


def write_set(out_dir: str | Path, images: np.ndarray, labels: np.ndarray,
              manifest: dict) -> dict:
    """Write the set; the manifest gains ``images``, ``per_class``, ``bytes`` (of
    ``data.parquet``: what an edge device downloads) and ``data_sha256``. Returns the
    manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": pa.array([to_png(im) for im in images], type=pa.binary()),
                      "label": pa.array(np.asarray(labels, np.int64))})
    pq.write_table(table, out / "data.parquet.tmp")
    (out / "data.parquet.tmp").replace(out / "data.parquet")  # never half a file
    per_class = np.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    manifest = {**manifest, "images": int(len(labels)), "per_class": per_class.tolist(),
                "bytes": (out / "data.parquet").stat().st_size,
                "data_sha256": _sha256(out / "data.parquet")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    order = np.argsort(labels, kind="stable")[:256]
    save_grid(images[order], out / "grid.png")
    return manifest


def set_bytes(images: np.ndarray, labels: np.ndarray) -> int:
    """Bytes of ``data.parquet`` for these images (PNG) and labels, written to memory."""
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": pa.array([to_png(im) for im in images], type=pa.binary()),
                             "label": pa.array(np.asarray(labels, np.int64))}), buf)
    return buf.getvalue().size


def read_set(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images N x C x S x S in [-1, 1], labels, manifest) of a set ``write_set`` wrote."""
    path = Path(path)
    if not (path / "data.parquet").is_file() or not (path / "manifest.json").is_file():
        raise DistillError(f"{path}: not a distilled set (expected data.parquet and "
                           "manifest.json, as ssdiff distill writes)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (ValueError, RecursionError) as e:
        raise DistillError(f"{path / 'manifest.json'}: not JSON ({e})") from None
    want = manifest.get("data_sha256") if isinstance(manifest, dict) else None
    if want is not None and want != _sha256(path / "data.parquet"):
        raise DistillError(f"{path / 'data.parquet'}: does not match the manifest's "
                           "data_sha256 (changed after the set was written)")
    table = pq.read_table(path / "data.parquet")
    images = np.stack([from_png(b) for b in table.column("image").to_pylist()])
    return images.astype(np.float32), table.column("label").to_numpy(), manifest


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
