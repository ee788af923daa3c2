"""Norm bounding (Sun et al., "Can you really backdoor federated learning?", 2019).

Updates whose L2 norm exceeds ``norm_factor`` x the weighted median norm are clipped to
that bound. Catches model replacement, which must scale its update up to survive averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.screened import ScreenedFedAvg, clip_rows
from ssdiff_ray.options import option, options_of


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])


@dataclass
class Options:
    norm_factor: float = option(3.0, lo=1.0, hi=1e6,
                                doc="norm_bound: bound = x weighted median norm")


class NormBound(ScreenedFedAvg):
    name = "norm_bound"
    Options = Options

    def __init__(self, num_params: int, num_slots: int, lr: float = 1.0,
                 norm_factor: float = 3.0):
        super().__init__(num_params, num_slots, lr)
        self.norm_factor = norm_factor

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> NormBound:
        return cls(num_params, num_slots, server.lr, options_of(Options, server).norm_factor)

    def screen(self, deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
        norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
        bound = self.norm_factor * weighted_median(norms, weights)
        big = np.flatnonzero(norms > bound)
        reasons = [""] * len(deltas)
        for i in big:
            reasons[i] = f"norm {norms[i]:.4g} > bound {bound:.4g} (clipped)"
        clip_rows(deltas, norms, bound, big)
        return np.ones(len(deltas), dtype=bool), reasons
