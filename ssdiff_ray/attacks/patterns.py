"""Trigger and target patterns (NumPy only): BadDiffusion's additive triggers, TrojDiff's
trigger images with their masks, and fixed target images. Arrays are C x S x S in [-1, 1]:
grey for C = 1; for C = 3 each pattern has its own colour (the papers' triggers and targets
on CIFAR-10 are coloured: a stop sign, glasses, a hat)."""

from __future__ import annotations

import numpy as np

ADDITIVE_TRIGGERS = ("box", "stop_sign", "glasses")  # BadDiffusion: x_T = eps + r
TROJ_TRIGGERS = ("blend", "patch")  # TrojDiff: x_T ~ N(mu, gamma^2 I)
TARGETS = ("hat", "cross", "corner")  # fixed target images; "class:K" targets a class

# RGB in [-1, 1] of each pattern's strokes in colour images; a grey image uses the pattern itself
COLOURS = {"box": (1.0, 1.0, -1.0), "stop_sign": (1.0, -1.0, -1.0), "glasses": (1.0, 1.0, 1.0),
           "blend": (1.0, -1.0, 1.0), "patch": (1.0, -1.0, -1.0),
           "hat": (1.0, -1.0, -1.0), "cross": (1.0, 1.0, 1.0), "corner": (-1.0, 1.0, -1.0)}


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
    """
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
    image (mu = (1 - gamma) delta); ``mask`` is where the trigger distribution applies."""
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
    """A fixed target image C x S x S in [-1, 1]: a white (C = 1) or coloured shape on black."""
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
