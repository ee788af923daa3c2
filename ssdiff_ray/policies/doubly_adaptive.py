"""DAdaQuant-style doubly adaptive quantization (Hönig et al., 2022).

Time: the global level q_t doubles each time training is detected to have converged at
the current level (the mean loss has not reached a new minimum for ``window`` rounds).
Clients: with FedAvg weights w_i, levels q_i = c * w_i^(2/3) minimise the total bits
subject to sum_i w_i^2 / q_i^2 = sum_i w_i^2 / q_t^2 (the variance of a static level q_t);
that gives c = sqrt(sum_i w_i^(2/3) / sum_i w_i^2) * q_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ssdiff_ray.options import option, options_of
from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext
from ssdiff_ray.policies.levels import bits_for_levels, levels_for_bits


@dataclass
class Options:
    convergence_window: int = option(3, lo=1, hi=1000,
                                     doc="rounds a loss plateau must last (DAdaQuant)")


class DoublyAdaptivePolicy(BitPolicy):
    name = "doubly_adaptive"
    Options = Options

    def __init__(self, start_bits: int, min_bits: int, max_bits: int, window: int = 3):
        self.q0 = levels_for_bits(start_bits)
        self.min_bits, self.max_bits, self.window = min_bits, max_bits, window

    @classmethod
    def from_config(cls, cfg) -> DoublyAdaptivePolicy:
        q = cfg.quant
        return cls(q.bits, q.min_bits, q.max_bits, options_of(Options, q).convergence_window)

    def global_level(self, loss_history: list[float]) -> int:
        """Replays the doubling rule over the whole history (stateless, so resume is exact)."""
        q, best, since = self.q0, math.inf, 0
        for loss in loss_history:
            if not math.isfinite(loss):
                continue
            if loss < best:
                best, since = loss, 0
            else:
                since += 1
                if since >= self.window:
                    q, best, since = 2 * q + 1, loss, 0  # one more bit: 2^(b+1) - 1 levels
        return q

    def choose(self, ctx: RoundContext) -> Decision:
        q_t = self.global_level(ctx.loss_history)
        w = ctx.num_samples / max(ctx.num_samples.sum(), 1)
        c = math.sqrt(np.sum(w ** (2 / 3)) / np.sum(w ** 2)) * q_t
        return Decision(bits=bits_for_levels(c * w ** (2 / 3), self.min_bits, self.max_bits))
