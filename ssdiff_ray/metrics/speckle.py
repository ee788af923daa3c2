"""Salt-and-pepper static, told from images by how much vertical neighbours differ.

The failure detector (``bad_sample_share``) needs a feature network; this check needs none,
so a test or a benchmark can ask "is this static?" of any model's samples. Digits and
colour shapes have smooth strokes (mean neighbour difference ~0.1 in [0, 1]); static has
~0.3 and more. (The sampler issue's threshold of 0.5 flags nothing, not even static.)
"""

from __future__ import annotations

import numpy as np

SPECKLE_THRESHOLD = 0.2


def speckled(images: np.ndarray, threshold: float = SPECKLE_THRESHOLD) -> np.ndarray:
    """Per image (N x C x H x W in [-1, 1]): is the mean absolute difference of vertical
    neighbours, in [0, 1] scale, above ``threshold``?"""
    x = (np.asarray(images, np.float32) + 1) / 2
    return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)) > threshold
