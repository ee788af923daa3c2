"""Fixed bit-width for every client and round (32 = plain FP32 FedAvg)."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext


class FixedPolicy(BitPolicy):
    name = "fixed"

    def __init__(self, bits: int):
        self.bits = bits

    @classmethod
    def from_config(cls, cfg) -> FixedPolicy:
        return cls(cfg.quant.bits)

    def choose(self, ctx: RoundContext) -> Decision:
        return Decision(bits=np.full(len(ctx.client_ids), self.bits, dtype=np.int64))
