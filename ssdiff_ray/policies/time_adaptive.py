"""AdaQuantFL-style time-adaptive levels: s_t = ceil(sqrt(F_0 / F_t)) * s_0.

Few bits while the loss is high (early updates are large and noisy anyway), more as it
falls. F_0 is the first round's mean training loss, F_t the latest one.
"""

from __future__ import annotations

import math

import numpy as np

from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext
from ssdiff_ray.policies.levels import bits_for_levels, levels_for_bits


class TimeAdaptivePolicy(BitPolicy):
    name = "time_adaptive"

    def __init__(self, start_bits: int, min_bits: int, max_bits: int):
        self.s0 = levels_for_bits(start_bits)
        self.min_bits, self.max_bits = min_bits, max_bits

    @classmethod
    def from_config(cls, cfg) -> TimeAdaptivePolicy:
        return cls(cfg.quant.bits, cfg.quant.min_bits, cfg.quant.max_bits)

    def levels(self, loss_history: list[float]) -> int:
        hist = [x for x in loss_history if math.isfinite(x) and x > 0]
        if len(hist) < 2:
            return self.s0
        return math.ceil(math.sqrt(hist[0] / hist[-1])) * self.s0

    def choose(self, ctx: RoundContext) -> Decision:
        s_t = self.levels(ctx.loss_history)
        bits = bits_for_levels(np.full(len(ctx.client_ids), s_t), self.min_bits, self.max_bits)
        return Decision(bits=bits)
