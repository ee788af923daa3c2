"""Multi-Krum (Blanchard et al., NeurIPS 2017).

Each update's score is the sum of squared distances to its k - f - 2 nearest neighbours;
the k - f lowest scores are kept, f being the assumed number of attackers per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.screened import ScreenedFedAvg, gram
from ssdiff_ray.options import option, options_of


def krum_scores(deltas: np.ndarray, f: int) -> np.ndarray:
    """Krum score per update: sum of squared distances to its k - f - 2 nearest others."""
    k = len(deltas)
    g = gram(deltas)
    sq = np.diag(g)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)
    np.fill_diagonal(d2, np.inf)
    m = max(1, k - f - 2)
    return np.sort(d2, axis=1)[:, :m].sum(axis=1)


@dataclass
class Options:
    krum_f: int = option(0, lo=0, hi=1_000_000, doc="multi_krum: assumed attackers per round "
                         "(0 = a fifth of the round's updates)")


class MultiKrum(ScreenedFedAvg):
    name = "multi_krum"
    Options = Options

    def __init__(self, num_params: int, num_slots: int, lr: float = 1.0, f: int = 0):
        super().__init__(num_params, num_slots, lr)
        self.f = f  # 0: k // 5 of the round's k updates

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> MultiKrum:
        return cls(num_params, num_slots, server.lr, options_of(Options, server).krum_f)

    def screen(self, deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
        k = len(deltas)
        f = min(self.f or max(1, k // 5), k - 1)
        scores = krum_scores(deltas, f)
        keep = np.zeros(k, dtype=bool)
        keep[np.argsort(scores, kind="stable")[:k - f]] = True
        cut = scores[keep].max()
        reasons = ["" if keep[i] else f"krum score {scores[i]:.4g} > kept max {cut:.4g}"
                   for i in range(k)]
        return keep, reasons
