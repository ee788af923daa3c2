"""FedAvgM (Hsu et al., 2019): FedAvg with server momentum, v <- beta v + mean; w <- w + lr v."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.fedavg import FedAvg
from ssdiff_ray.options import option, options_of


@dataclass
class Options:
    momentum: float = option(0.9, lo=0.0, hi=0.999, doc="fedavgm: server momentum")


class FedAvgM(FedAvg):
    name = "fedavgm"
    Options = Options

    def __init__(self, num_params: int, num_slots: int, lr: float = 1.0, momentum: float = 0.9):
        super().__init__(num_params, num_slots, lr)
        self.momentum = momentum
        self.velocity: np.ndarray | None = None

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> FedAvgM:
        return cls(num_params, num_slots, server.lr, options_of(Options, server).momentum)

    def step(self, mean_delta: np.ndarray) -> np.ndarray:
        if self.velocity is None:
            self.velocity = np.zeros_like(mean_delta)
        self.velocity = self.momentum * self.velocity + mean_delta
        return super().step(self.velocity)

    def state_dict(self) -> dict:
        return {"velocity": self.velocity}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = state.get("velocity")
