"""Adaptive server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization"): the
round's mean update is a pseudo-gradient that a server-side Adam, Yogi or Adagrad applies,
so every coordinate moves by about ``server.lr`` whatever the scale of its updates.
``fedadam``, ``fedyogi`` and ``fedadagrad`` differ only in ``second_moment``. As Flower's
FedAdam/FedYogi, the steps are bias-corrected (the first rounds are not shrunk by m = 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.fedavg import FedAvg
from ssdiff_ray.options import option, options_of


@dataclass
class Options:
    beta1: float = option(0.9, lo=0.0, hi=0.999,
                          doc="fedadam/fedyogi/fedadagrad: decay of the server's first moment")
    beta2: float = option(0.99, lo=0.0, hi=0.9999,
                          doc="fedadam/fedyogi: decay of the server's second moment")
    tau: float = option(1e-3, lo=0.0, lo_open=True, hi=1.0,
                        doc="fedadam/fedyogi/fedadagrad: adaptivity, added to sqrt(v)")


class FedOpt(FedAvg):
    """w <- w + lr * m_hat / (sqrt(v_hat) + tau), m and v moments of the mean update."""

    Options = Options
    bias_correction = True

    def __init__(self, num_params: int, num_slots: int, lr: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(num_params, num_slots, lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.t = 0

    @classmethod
    def check_config(cls, server) -> str | None:
        """A config error to stop with before Ray starts (None: fine)."""
        if server.lr > 0.5:
            return (f"server.lr = {server.lr}: {cls.name} moves every weight by about server.lr "
                    "a round; use a step such as 0.01")
        return None

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> FedOpt:
        o = options_of(Options, server)
        return cls(num_params, num_slots, server.lr, o.beta1, o.beta2, o.tau)

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, mean_delta: np.ndarray) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(mean_delta), np.zeros_like(mean_delta)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * mean_delta
        self.v = self.second_moment(self.v, mean_delta * mean_delta)
        lr = self.lr
        if self.bias_correction:
            lr *= np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        return (self.weights + lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.t = state.get("m"), state.get("v"), int(state.get("t", 0))
