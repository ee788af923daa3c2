"""The frame of the screening rules: buffer a round's updates, screen them against each
other, then FedAvg over the kept ones. A rule implements ``screen`` only."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.aggregation.base import AggregateResult, ClientUpdate, Verdict
from ssdiff_ray.aggregation.fedavg import FedAvg
from ssdiff_ray.aggregation.weighted_sum import WeightedSum


class ScreenedFedAvg(FedAvg):
    """FedAvg over the updates ``screen`` keeps. Screening compares a round's updates with
    each other, so it must see them all before aggregating (memory: one vector per client)."""

    def begin_round(self, weights: np.ndarray) -> None:
        super().begin_round(weights)
        self.buffer: list[tuple[int, np.ndarray, float]] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        self.buffer.append((update.client_id, update.delta, weight))

    def screen(self, deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(keep mask, reason per update: "" when untouched). May clip rows in place."""
        raise NotImplementedError

    def finish(self) -> AggregateResult:
        self.buffer.sort(key=lambda b: b[0])  # arrival order must not change the result
        total = WeightedSum(self.num_params, 1)
        verdicts: dict[int, Verdict] = {}
        if self.buffer:
            ids = [b[0] for b in self.buffer]
            deltas = np.stack([b[1] for b in self.buffer])
            weights = np.array([b[2] for b in self.buffer])
            keep, reasons = self.screen(deltas, weights)
            for i in np.flatnonzero(keep):
                total.add(0, deltas[i], float(weights[i]))
            verdicts = {cid: Verdict(bool(k), r or "screened")
                        for cid, k, r in zip(ids, keep, reasons) if r or not k}
        self.buffer = []
        return self.apply(total, verdicts)


def gram(deltas: np.ndarray) -> np.ndarray:
    """Inner products of the updates (float32 matmul, float64 result)."""
    g = deltas.astype(np.float32, copy=False) @ deltas.T.astype(np.float32, copy=False)
    return g.astype(np.float64)


def clip_rows(deltas: np.ndarray, norms: np.ndarray, bound: float, rows: np.ndarray) -> None:
    """Scale the given rows to norm ``bound`` in place."""
    for i in rows:
        deltas[i] *= np.float32(bound / max(norms[i], 1e-12))
