"""Fixed bit-width for every client and round (32 = plain FP32 FedAvg)."""

import numpy as np

from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext


class FixedPolicy(BitPolicy):
    name = "fixed"

    def __init__(self, bits: int):
        self.bits = bits

    def choose(self, ctx: RoundContext) -> Decision:
        return Decision(bits=np.full(len(ctx.client_ids), self.bits, dtype=np.int64))
