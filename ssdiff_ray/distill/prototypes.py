"""``prototypes``: k-means in feature space, keep the candidate nearest each centroid.

As D4M (Su et al., CVPR 2024) keeps prototypes of the class's latent distribution; here the
features are the diffusion model's own (``features.py``), so no real data is needed at the
cloud. k-means is scikit-learn's (k-means++ init, seeded).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from ssdiff_ray.distill.base import Selection


class Prototypes(Selection):
    def select(self, features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        if k >= len(features):
            return np.arange(len(features))
        km = KMeans(n_clusters=k, n_init=4, random_state=int(rng.integers(2**31))).fit(features)
        dist = km.transform(features)  # N x k distances to the centroids
        chosen: list[int] = []
        for c in np.argsort(np.bincount(km.labels_, minlength=k))[::-1]:  # big clusters first
            for i in np.argsort(dist[:, c]):
                if i not in chosen:  # one candidate per centroid, each used once
                    chosen.append(int(i))
                    break
        return np.array(chosen)
