"""FedAdagrad (Reddi et al., 2021): v <- v + d^2, the server step shrinks with the sum of
squared updates (no second-moment decay, no bias correction)."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.aggregation.fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    bias_correction = False

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v + d2
