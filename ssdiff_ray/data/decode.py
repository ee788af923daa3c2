"""Images from user files into one array: decoding (PNG/JPEG bytes, Hugging Face image
structs, arrays), checks that name the offending row or file, resizing and scaling to
[-1, 1], and labels (integers, or class names)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ssdiff_ray.data import DataError
from ssdiff_ray.data.resize import resize

MIN_SIDE = 8  # smaller images carry too little to train a diffusion model on


GREY_MODES = ("1", "L", "I;16", "I", "F")


def read_image_bytes(data: bytes, where: str, mode: str | None = None) -> np.ndarray:
    """H x W x C uint8 from encoded bytes, in ``mode`` ("L" or "RGB"), else grey stays
    1 channel and everything else (palette, CMYK, RGBA, ...) is RGB."""
    return as_array(open_image(data, where), mode)


def open_image(data: bytes, where: str):
    """The decoded PIL image, or a DataError naming ``where`` and the decoder's reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (no format PIL reads)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data error
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {reason})") from None
    return img


def as_array(img, mode: str | None = None) -> np.ndarray:
    """H x W x C uint8 of a PIL image in ``mode`` (default: grey stays grey, else RGB)."""
    arr = np.asarray(img.convert(mode or ("L" if img.mode in GREY_MODES else "RGB")))
    return arr[..., None] if arr.ndim == 2 else arr


MAX_IMAGE_FILE_BYTES = 64 << 20


def decode_value(value, where: str, base: Path | None = None) -> np.ndarray:
    """One table cell as H x W x C (uint8 from bytes, float from arrays). An image struct
    without bytes names a file under ``base`` (the table's folder): a table from someone
    else must not make us read any path on this host (``/dev/zero``, a key file)."""
    if isinstance(value, dict):  # Hugging Face `datasets`' image struct {"bytes", "path"}
        if value.get("bytes"):
            return read_image_bytes(value["bytes"], where)
        path = value.get("path")
        if not path or not isinstance(path, str):
            raise DataError(f"{where}: image struct has neither bytes nor a path")
        return read_image_bytes(_read_beside(path, base, where), where)
    if isinstance(value, (bytes, bytearray)):
        return read_image_bytes(bytes(value), where)
    if value is None:
        raise DataError(f"{where}: no image")
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 1:
        side = int(round(np.sqrt(arr.size)))
        if side * side != arr.size:
            raise DataError(f"{where}: flat image of {arr.size} values is not square")
        arr = arr.reshape(side, side)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{where}: image has shape {arr.shape}, expected H x W or H x W x C "
                        "with C = 1 or 3")
    return arr


def _read_beside(path: str, base: Path | None, where: str) -> bytes:
    """The bytes of ``path`` (relative to ``base``) if it is a regular file under ``base``."""
    base = (base or Path.cwd()).resolve()
    full = (base / path).resolve()
    if not full.is_relative_to(base):
        raise DataError(f"{where}: image path {path!r} is outside the table's folder {base}")
    try:
        if not full.is_file():
            raise DataError(f"{where}: image path {path!r}: not a regular file")
        if full.stat().st_size > MAX_IMAGE_FILE_BYTES:
            raise DataError(f"{where}: image path {path!r}: over {MAX_IMAGE_FILE_BYTES >> 20} MiB")
        return full.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: image path {path!r}: {e.strerror}") from None


def to_array(images: list[np.ndarray], wheres: list[str], image_size: int) -> np.ndarray:
    """N x C x S x S float32 in [-1, 1] from H x W x C images: all with one channel count,
    at least MIN_SIDE pixels on a side; uint8 or values > 1 are 0..255, else 0..1."""
    channels = images[0].shape[-1]
    for im, where in zip(images, wheres):
        if im.shape[-1] != channels:
            raise DataError(f"{where}: {im.shape[-1]} channels, but {wheres[0]} has {channels} "
                            "(all images must be grey or all colour)")
        if min(im.shape[:2]) < MIN_SIDE:
            raise DataError(f"{where}: image is {im.shape[0]} x {im.shape[1]} px, "
                            f"at least {MIN_SIDE} x {MIN_SIDE} is needed")
        if not np.isfinite(np.asarray(im, np.float32)).all():
            raise DataError(f"{where}: image contains NaN or Inf")
    scale = 255.0 if any(im.dtype == np.uint8 or im.max() > 1.0 for im in images) else 1.0
    out = np.empty((len(images), channels, image_size, image_size), np.float32)
    for i, im in enumerate(images):
        x = np.asarray(im, np.float32).transpose(2, 0, 1) / scale  # C x H x W in [0, 1]
        out[i] = resize(x, image_size)
    return np.clip(out, 0.0, 1.0) * 2.0 - 1.0  # each channel [0, 1] -> [-1, 1]


def to_labels(values: list, label_type: str, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels, or class names mapped to 0..K-1 in sorted order (the names are
    returned). ``label_type``: "int", "name", or "auto" (whichever the column holds)."""
    is_name = [isinstance(v, str) for v in values]
    is_int = [isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values]
    for i, v in enumerate(values):
        if not (is_name[i] or is_int[i]):
            raise DataError(f"{where} row {i}: label {v!r} is neither an integer nor a name")
    want = label_type if label_type != "auto" else ("name" if is_name[0] else "int")
    bad = next((i for i in range(len(values)) if is_name[i] != (want == "name")), None)
    if bad is not None:
        kind = "a string" if is_name[bad] else "a number"
        expect = "class names (strings)" if want == "name" else "integers"
        raise DataError(f"{where} row {bad}: label {values[bad]!r} is {kind}; the column "
                        f"holds {expect}" + (" (data.label_type)" if label_type != "auto" else ""))
    if want == "int":
        labels = np.asarray(values, dtype=np.int64)
        if labels.min() < 0:
            raise DataError(f"{where} row {int(labels.argmin())}: label {labels.min()} < 0")
        return labels, None
    names = sorted(set(values))
    index = {n: k for k, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names
