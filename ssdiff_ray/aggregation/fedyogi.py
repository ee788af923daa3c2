"""FedYogi (Reddi et al., 2021): v grows as Adam's but shrinks only additively,
v <- v - (1 - b2) d^2 sign(v - d^2), so a burst of small updates does not inflate the step."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.aggregation.fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
