"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the updates, applied with a
server learning rate. Updates stream into the sum as they arrive."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.aggregation.base import AggregateResult, Aggregator, ClientUpdate
from ssdiff_ray.aggregation.weighted_sum import WeightedSum


class FedAvg(Aggregator):
    name = "fedavg"

    def __init__(self, num_params: int, num_slots: int, lr: float = 1.0):
        self.num_params, self.num_slots, self.lr = num_params, num_slots, lr
        self.weights: np.ndarray | None = None
        self.sum: WeightedSum | None = None

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> FedAvg:
        return cls(num_params, num_slots, server.lr)

    def begin_round(self, weights: np.ndarray) -> None:
        self.weights = weights
        self.sum = WeightedSum(self.num_params, self.num_slots)

    def add(self, update: ClientUpdate, weight: float) -> None:
        self.sum.add(update.slot, update.delta, weight)

    def step(self, mean_delta: np.ndarray) -> np.ndarray:
        """w <- w + lr * mean."""
        return (self.weights + self.lr * mean_delta).astype(np.float32)

    def finish(self) -> AggregateResult:
        return self.apply(self.sum)

    def apply(self, total: WeightedSum, verdicts=None) -> AggregateResult:
        """The step from a finished weighted sum (shared by the screened rules)."""
        mean = total.mean()
        if mean is None:
            return AggregateResult(self.weights, 0, 0.0, verdicts or {})
        return AggregateResult(self.step(mean), total.count, float(np.linalg.norm(mean)),
                               verdicts or {})
