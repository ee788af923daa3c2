"""Training-stage screening of client updates at the parameter server.

``screen_updates`` decides which of the k updates of a round enter aggregation:

* ``norm``: norm bounding (Sun et al., "Can you really backdoor FL?", 2019). Updates whose
  L2 norm exceeds a bound (absolute, or ``norm_factor`` x the weighted median norm) are
  clipped to the bound (``norm_action="clip"``, in place) or dropped (``"drop"``). Catches
  model replacement, which must scale its update up to survive averaging.
* ``krum``: multi-Krum (Blanchard et al., NeurIPS 2017). Each update's score is the sum of
  squared distances to its k - f - 2 nearest neighbours; the k - f lowest scores are kept.
* ``flame``: FLAME's filtering and clipping (Nguyen et al., USENIX Security 2022): density
  clustering on pairwise cosine distances with min cluster size k/2 + 1 (``majority_cluster``,
  HDBSCAN's mutual reachability); updates outside the majority cluster are dropped, the
  rest are clipped to the median norm. (FLAME's DP noise is left to the aggregator.)

Returns a keep mask and one reason string per update ("" when kept untouched).
"""

from __future__ import annotations

import numpy as np

METHODS = ("none", "norm", "krum", "flame")


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])


def _clip_rows(deltas: np.ndarray, norms: np.ndarray, bound: float, rows: np.ndarray) -> None:
    """Scale the given rows to norm ``bound`` in place."""
    for i in rows:
        deltas[i] *= np.float32(bound / max(norms[i], 1e-12))


def _gram(deltas: np.ndarray) -> np.ndarray:
    g = deltas.astype(np.float32, copy=False) @ deltas.T.astype(np.float32, copy=False)
    return g.astype(np.float64)


def screen_norm(
    deltas: np.ndarray,
    weights: np.ndarray,
    norm_bound: float | None = None,
    norm_factor: float = 3.0,
    norm_action: str = "clip",
) -> tuple[np.ndarray, list[str]]:
    """Norm bounding: clip (in place) or drop updates with norm above the bound."""
    norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
    bound = norm_bound if norm_bound is not None else norm_factor * _weighted_median(norms, weights)
    big = np.flatnonzero(norms > bound)
    keep = np.ones(len(deltas), dtype=bool)
    reasons = [""] * len(deltas)
    for i in big:
        reasons[i] = f"norm {norms[i]:.4g} > bound {bound:.4g}"
        if norm_action == "drop":
            keep[i] = False
            reasons[i] += " (dropped)"
        else:
            reasons[i] += " (clipped)"
    if norm_action == "clip":
        _clip_rows(deltas, norms, bound, big)
    elif norm_action != "drop":
        raise ValueError(f"norm_action {norm_action!r}; choose 'clip' or 'drop'")
    return keep, reasons


def krum_scores(deltas: np.ndarray, f: int) -> np.ndarray:
    """Krum score per update: sum of squared distances to its k - f - 2 nearest others."""
    k = len(deltas)
    g = _gram(deltas)
    sq = np.diag(g)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)
    np.fill_diagonal(d2, np.inf)
    m = max(1, k - f - 2)
    return np.sort(d2, axis=1)[:, :m].sum(axis=1)


def screen_krum(deltas: np.ndarray, f: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Multi-Krum: keep the k - f updates with the lowest Krum scores."""
    k = len(deltas)
    f = max(1, k // 5) if f is None else int(f)  # assumed number of attackers per round
    f = min(f, k - 1)
    scores = krum_scores(deltas, f)
    keep = np.zeros(k, dtype=bool)
    keep[np.argsort(scores, kind="stable")[:k - f]] = True
    cut = scores[keep].max()
    reasons = ["" if keep[i] else f"krum score {scores[i]:.4g} > kept max {cut:.4g}"
               for i in range(k)]
    return keep, reasons


def cosine_distances(deltas: np.ndarray) -> np.ndarray:
    g = _gram(deltas)
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


def screen_flame(
    deltas: np.ndarray, min_cluster_size: int | None = None, slack: float = 0.5,
    clip: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """FLAME: keep the majority cluster in cosine distance, clip it to its median norm."""
    k = len(deltas)
    keep = np.ones(k, dtype=bool)
    reasons = [""] * k
    if k < 3:
        return keep, reasons  # nothing to cluster
    dist = cosine_distances(deltas)
    keep = majority_cluster(dist, min_cluster_size or k // 2 + 1, slack)
    for i in np.flatnonzero(~keep):
        reasons[i] = f"flame: cosine outlier (median cos-dist to cluster {np.median(dist[i, keep]):.3f})"
    if clip:
        norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
        bound = float(np.median(norms[keep]))
        _clip_rows(deltas, norms, bound, np.flatnonzero(keep & (norms > bound)))
    return keep, reasons


def screen_updates(
    deltas: np.ndarray, weights: np.ndarray | None = None, method: str = "none", **params
) -> tuple[np.ndarray, list[str]]:
    """Which of the k updates (k x d float32) to aggregate, with a reason for each screened one.

    ``norm`` and ``flame`` clip rows of ``deltas`` in place (the server owns the array);
    params: norm: norm_bound, norm_factor (3.0), norm_action ("clip"|"drop");
    krum: f (assumed attackers, default k // 5); flame: min_cluster_size, slack (0.5), clip (True).
    """
    deltas = np.asarray(deltas)
    k = len(deltas)
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    if method == "none" or k == 0:
        return np.ones(k, dtype=bool), [""] * k
    if method == "norm":
        return screen_norm(deltas, w, **params)
    if method == "krum":
        return screen_krum(deltas, **params)
    if method == "flame":
        return screen_flame(deltas, **params)
    raise ValueError(f"screening method {method!r}; choose from {METHODS}")
