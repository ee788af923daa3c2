"""``minimax``: representativeness and diversity at selection time (after Minimax diffusion,
Gu et al., CVPR 2024).

Minimax fine-tunes the diffusion model so each generation is similar to the real samples it
is least similar to (representativeness) and unlike the most similar earlier generation
(diversity). Fine-tuning per class does not fit a CPU budget and the cloud holds no real
data, so the same two terms act here on a candidate pool that stands for the class's
distribution: greedily keep the candidate that maximises

    mean similarity to its ``neighbours`` nearest candidates      (dense: representative)
  - ``weight`` x max similarity to the candidates already kept   (diverse)
"""

from __future__ import annotations

import numpy as np

from ssdiff_ray.distill.base import Selection, cosine_matrix


class Minimax(Selection):
    def __init__(self, weight: float = 1.0, neighbours: int = 10):
        self.weight, self.neighbours = weight, neighbours

    def select(self, features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        n = len(features)
        if k >= n:
            return np.arange(n)
        sim = cosine_matrix(features, features)
        m = min(self.neighbours, n - 1)
        near = np.sort(sim, axis=1)[:, -(m + 1):-1]  # the row's own 1.0 left out
        representative = near.mean(axis=1)
        closest_kept = np.full(n, -np.inf)
        chosen: list[int] = []
        for _ in range(k):
            score = representative - self.weight * np.maximum(closest_kept, 0.0)
            score[chosen] = -np.inf
            i = int(np.argmax(score))
            chosen.append(i)
            closest_kept = np.maximum(closest_kept, sim[i])
        return np.array(chosen)
