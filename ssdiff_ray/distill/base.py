"""The selection interface: k of a class's candidate generations, from their features."""

from __future__ import annotations

import numpy as np


class Selection:
    """Picks ``k`` rows of ``features`` (the candidates of one class, N x D)."""

    #: candidates generated per kept image (``ssdiff distill --pool`` overrides)
    pool_factor: int = 5

    def select(self, features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Indices of the k kept candidates (distinct)."""
        raise NotImplementedError


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of rows of ``a`` with rows of ``b``."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T
