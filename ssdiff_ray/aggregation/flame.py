"""FLAME's filtering and clipping (Nguyen et al., USENIX Security 2022).

Density clustering on pairwise cosine distances with minimum cluster size k/2 + 1
(``majority_cluster``, HDBSCAN's mutual reachability); updates outside the majority cluster
are dropped, the rest are clipped to their median norm. (FLAME's DP noise is left out.)
"""

from __future__ import annotations

import numpy as np

from ssdiff_ray.aggregation.screened import ScreenedFedAvg, clip_rows, gram


def cosine_distances(deltas: np.ndarray) -> np.ndarray:
    g = gram(deltas)
    n = np.sqrt(np.maximum(np.diag(g), 1e-30))
    return np.clip(1.0 - g / np.outer(n, n), 0.0, 2.0)


def majority_cluster(dist: np.ndarray, min_size: int, slack: float = 0.5) -> np.ndarray:
    """The dense majority of points under distance matrix ``dist`` (FLAME's HDBSCAN idea).

    As in HDBSCAN, points are linked by the mutual reachability distance
    max(core_i, core_j, d_ij), core_i being the distance to i's (min_size - 1)-th nearest
    neighbour. h* is the smallest linkage level at which ``min_size`` points are connected;
    the kept cluster is the component of that core at level (1 + slack) h*. Unlike
    HDBSCAN's stability-based selection it does not drop benign points at the fringe of a
    homogeneous cloud, which HDBSCAN with allow_single_cluster does for small k.
    """
    from scipy.sparse.csgraph import connected_components

    k = len(dist)
    core = np.sort(dist, axis=1)[:, min(min_size, k) - 1]
    mr = np.maximum(dist, np.maximum(core[:, None], core[None, :]))

    def components(h):
        n, lab = connected_components(mr <= h, directed=False)
        return lab, np.bincount(lab, minlength=n)

    levels = np.unique(mr)
    lo, hi = 0, len(levels) - 1  # binary search: first level with a component >= min_size
    while lo < hi:
        mid = (lo + hi) // 2
        if components(levels[mid])[1].max() >= min_size:
            hi = mid
        else:
            lo = mid + 1
    h_star = levels[lo]
    lab, sizes = components(h_star)
    seed = np.flatnonzero(lab == sizes.argmax())[0]
    lab, _ = components(h_star * (1 + slack))
    return lab == lab[seed]


class Flame(ScreenedFedAvg):
    name = "flame"

    def __init__(self, num_params: int, num_slots: int, lr: float = 1.0, slack: float = 0.5):
        super().__init__(num_params, num_slots, lr)
        self.slack = slack

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> Flame:
        return cls(num_params, num_slots, server.lr)

    def screen(self, deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
        k = len(deltas)
        keep = np.ones(k, dtype=bool)
        reasons = [""] * k
        if k < 3:
            return keep, reasons  # nothing to cluster
        dist = cosine_distances(deltas)
        keep = majority_cluster(dist, k // 2 + 1, self.slack)
        for i in np.flatnonzero(~keep):
            reasons[i] = (f"flame: cosine outlier (median cos-dist to cluster "
                          f"{np.median(dist[i, keep]):.3f})")
        norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
        bound = float(np.median(norms[keep]))
        clip_rows(deltas, norms, bound, np.flatnonzero(keep & (norms > bound)))
        return keep, reasons
