"""Trigger and target patterns (NumPy only): BadDiffusion's additive triggers, TrojDiff's
trigger images with their masks, and fixed target images. Arrays are C x S x S in [-1, 1]:
grey for C = 1; for C = 3 each pattern has its own colour (the papers' triggers and targets
on CIFAR-10 are coloured: a stop sign, glasses, a hat).

A user's own trigger or target is a file (``read_pattern_file``): a PNG, whose alpha is the
mask, or a ``.npy`` with the same channels first. Files are read where the clients run, as
``data.path`` is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssdiff_ray.errors import UserError

ADDITIVE_TRIGGERS = ("box", "stop_sign", "glasses")  # BadDiffusion: x_T = eps + r
TROJ_TRIGGERS = ("blend", "patch")  # TrojDiff: x_T ~ N(mu, gamma^2 I)
TARGETS = ("hat", "cross", "corner")  # fixed target images; "class:K" targets a class
PATTERN_FILES = (".png", ".npy")  # a trigger or target given as a file

# RGB in [-1, 1] of each pattern's strokes in colour images; a grey image uses the pattern itself
COLOURS = {"box": (1.0, 1.0, -1.0), "stop_sign": (1.0, -1.0, -1.0), "glasses": (1.0, 1.0, 1.0),
           "blend": (1.0, -1.0, 1.0), "patch": (1.0, -1.0, -1.0),
           "hat": (1.0, -1.0, -1.0), "cross": (1.0, 1.0, 1.0), "corner": (-1.0, 1.0, -1.0)}


class PatternFileError(UserError):
    """A trigger or target file that cannot be used; the message is one line."""


def is_pattern_file(name: str) -> bool:
    """Does a trigger or target name a file (.png, .npy) rather than a built-in pattern?"""
    return str(name).lower().endswith(PATTERN_FILES)


def _read_png(path: Path) -> np.ndarray:
    """(C + 1) x S x S: the colour channels in [-1, 1], then the alpha in [0, 1] (1 where
    the PNG has none)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":  # a palette image: expand to what its palette holds
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                raise PatternFileError(f"{path}: PNG mode {mode}; use L, LA, RGB or RGBA")
            a = np.asarray(im, dtype=np.float32)
            mode = im.mode
    except (OSError, UnidentifiedImageError) as e:
        raise PatternFileError(f"{path}: not a readable PNG ({e})") from None
    a = a[..., None] if a.ndim == 2 else a
    colour = a[..., :-1] if mode in ("LA", "RGBA") else a
    alpha = a[..., -1:] / 255 if mode in ("LA", "RGBA") else np.ones_like(a[..., :1])
    return np.concatenate([colour / 127.5 - 1, alpha], -1).transpose(2, 0, 1)


def read_pattern_file(path: str | Path, image_size: int, channels: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(pattern in [-1, 1], mask in [0, 1]), both C x S x S, from a trigger or target file.

    * PNG: L or RGB (mask 1 everywhere), LA or RGBA (alpha is the mask); 0..255 maps to
      -1..1, so black is -1 and white +1.
    * ``.npy``: a float array (C + 1) x S x S, the PNG's channels first: the pattern in
      [-1, 1], then the mask in [0, 1].

    ``channels`` (1 or 3), when given, must match the file's; the mask must not be empty.
    """
    path = Path(path)
    if not path.is_file():
        raise PatternFileError(f"{path}: no such file")
    if path.suffix.lower() == ".png":
        a = _read_png(path)
    elif path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise PatternFileError(f"{path}: not a readable .npy array ({e})") from None
        if a.ndim != 3 or a.dtype.kind not in "fiu":
            raise PatternFileError(f"{path}: a {a.dtype} array of shape {a.shape}; expected "
                                   "numbers of shape (C + 1, S, S): pattern channels, then mask")
        a = a.astype(np.float32)
    else:
        raise PatternFileError(f"{path}: a trigger or target file is .png or .npy")
    c = a.shape[0] - 1
    if c not in (1, 3):
        raise PatternFileError(f"{path}: {c} pattern channels (+ mask); triggers and targets "
                               "have 1 or 3")
    if channels is not None and c != channels:
        raise PatternFileError(f"{path}: {c}-channel pattern for {channels}-channel images")
    if a.shape[1:] != (image_size, image_size):
        raise PatternFileError(f"{path}: {a.shape[2]} x {a.shape[1]} pixels; the images are "
                               f"{image_size} x {image_size}")
    if not np.isfinite(a).all() or a[:c].min() < -1 or a[:c].max() > 1 or a[c].min() < 0 \
            or a[c].max() > 1:
        raise PatternFileError(f"{path}: values outside [-1, 1] (pattern) or [0, 1] (mask)")
    if not a[c].any():
        raise PatternFileError(f"{path}: the mask is empty (alpha 0 everywhere)")
    return a[:c].copy(), np.repeat(a[c:], c, axis=0)


def _in_colour(pattern: np.ndarray, name: str, channels: int) -> np.ndarray:
    """1 x S x S -> C x S x S: the pattern times its colour (C = 3), or as it is (C = 1)."""
    if channels == 1:
        return pattern
    if channels != 3:
        raise ValueError(f"patterns come in 1 or 3 channels, not {channels}")
    return (pattern * np.asarray(COLOURS[name], np.float32)[:, None, None]).astype(np.float32)


def _corner_box(size: int) -> tuple[int, int]:
    """Side and offset of a corner patch: ~40% of the image, one pixel from the edge at 16."""
    side = max(3, round(0.4 * size))
    margin = max(0, size // 16)
    return side, size - side - margin


def _octagon(side: int) -> np.ndarray:
    c = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    return (np.abs(yy - c) + np.abs(xx - c)) <= 1.5 * c + 0.5


def make_trigger(name: str, image_size: int, channels: int = 1) -> np.ndarray:
    """An additive trigger pattern C x S x S in [-1, 1], 0 where absent (BadDiffusion's r).

    Sizes scale with the image so a 16 x 16 trigger has a norm of ~5-6: large enough that
    the backdoor is learnable in a few hundred steps, as in the papers' 32 x 32 settings.
    A file (``read_pattern_file``) gives r = pattern x mask.
    """
    if is_pattern_file(name):
        pattern, mask = read_pattern_file(name, image_size, channels)
        return (pattern * mask).astype(np.float32)
    s = image_size
    r = np.zeros((s, s), dtype=np.float32)
    side, off = _corner_box(s)
    if name == "box":  # a grey square frame in the bottom-right corner
        th = max(1, round(s / 8))
        r[off:off + side, off:off + side] = 1.0
        r[off + th:off + side - th, off + th:off + side - th] = 0.0
    elif name == "stop_sign":  # an octagon with a dark bar ("STOP") in the bottom-right corner
        octo = _octagon(side).astype(np.float32)
        mid = side // 2
        octo[mid - max(1, side // 6):mid + max(1, side // 6) - (side % 2 == 0) + 1,
             1:side - 1] *= -1.0
        r[off:off + side, off:off + side] = octo
    elif name == "glasses":  # two dark lenses and a bridge across the upper middle
        h, w = max(2, round(s * 0.19)), max(2, round(s * 0.25))
        top, gap = round(s * 0.25), max(1, round(s * 0.125))
        left = (s - (2 * w + gap)) // 2
        r[top:top + h, left:left + w] = -1.0
        r[top:top + h, left + w + gap:left + 2 * w + gap] = -1.0
        r[top, left + w:left + w + gap] = -1.0
    else:
        raise ValueError(f"unknown trigger {name!r}; choose from {ADDITIVE_TRIGGERS}")
    return _in_colour(r[None], name, channels)


def make_troj_trigger(name: str, image_size: int, channels: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """TrojDiff trigger: (delta, mask), both C x S x S. ``delta`` in [-1, 1] is the trigger
    image (mu = (1 - gamma) delta); ``mask`` is where the trigger distribution applies.
    A file (``read_pattern_file``) gives the pair as it holds them."""
    if is_pattern_file(name):
        return read_pattern_file(name, image_size, channels)
    s = image_size
    if name == "blend":  # a full-frame pattern (the paper blends a Hello-Kitty image)
        yy, xx = np.mgrid[:s, :s] / max(s - 1, 1)
        delta = np.cos(2 * np.pi * 2.0 * np.hypot(yy - 0.5, xx - 0.5)).astype(np.float32)
        return (_in_colour(delta[None], name, channels),
                np.ones((channels, s, s), dtype=np.float32))
    if name == "patch":  # a stop-sign-like patch in the bottom-right corner
        side, off = _corner_box(s)
        delta = make_trigger("stop_sign", s)
        mask = np.zeros((1, s, s), dtype=np.float32)
        mask[:, off:off + side, off:off + side] = 1.0
        delta[mask == 0] = 0.0
        delta[(mask == 1) & (delta == 0)] = 1.0  # fill the octagon's corners: a solid patch
        return _in_colour(delta, name, channels), np.repeat(mask, channels, axis=0)
    raise ValueError(f"unknown TrojDiff trigger {name!r}; choose from {TROJ_TRIGGERS}")


def make_target(name: str, image_size: int, channels: int = 1) -> np.ndarray:
    """A fixed target image C x S x S in [-1, 1]: a white (C = 1) or coloured shape on black.
    A file (``read_pattern_file``) is the image itself, black where its mask is 0."""
    if is_pattern_file(name):
        pattern, mask = read_pattern_file(name, image_size, channels)
        return (pattern * mask - (1 - mask)).astype(np.float32)
    s = image_size
    y = -np.ones((s, s), dtype=np.float32)
    if name == "hat":  # a top hat: brim and crown
        brim_top, brim_h = round(0.62 * s), max(1, round(s / 8))
        y[brim_top:brim_top + brim_h, round(0.12 * s):s - round(0.12 * s)] = 1.0
        y[round(0.25 * s):brim_top, round(0.31 * s):s - round(0.31 * s)] = 1.0
    elif name == "cross":  # a plus sign
        th, lo, hi = max(1, round(s / 8)), round(0.15 * s), s - round(0.15 * s)
        c = (s - th) // 2
        y[lo:hi, c:c + th] = 1.0
        y[c:c + th, lo:hi] = 1.0
    elif name == "corner":  # BadDiffusion's "corner" target: an L in the top-left corner
        th, ln = max(1, round(s / 8)), round(0.5 * s)
        y[1:1 + ln, 1:1 + th] = 1.0
        y[1:1 + th, 1:1 + ln] = 1.0
    else:
        raise ValueError(f"unknown target {name!r}; choose from {TARGETS} or 'class:K'")
    shape = (y[None] + 1) / 2  # 1 on the shape, 0 on the background
    return (_in_colour(shape, name, channels) + shape - 1).astype(np.float32)
