"""``random``: the first k generations of the class, no selection (the plain baseline)."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.distill.base import Selection


class RandomPick(Selection):
    pool_factor = 1  # nothing to choose from: generate exactly k

    def select(self, features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        return np.arange(min(k, len(features)))
