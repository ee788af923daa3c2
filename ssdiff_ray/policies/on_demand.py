"""On-demand quantization: each device asks for the bit-width it can afford.

A device's class sets its preferred and maximum bit-width (profile columns
``preferred_bits`` and ``max_bits``: weak, battery-bound classes ask for fewer bits); its
link then lowers that until the upload fits in the time the deadline leaves after local
compute, at full transmit power. Without a deadline the class preference alone decides.
"""

from __future__ import annotations

import numpy as np

from ssdiff_ray import codec
from ssdiff_ray.energy import rate_bps
from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext


class OnDemandPolicy(BitPolicy):
    name = "on_demand"

    def __init__(self, min_bits: int, max_bits: int, noise_dbm_per_hz: float = -174.0):
        self.min_bits, self.max_bits = min_bits, max_bits
        self.noise_dbm_per_hz = noise_dbm_per_hz

    @classmethod
    def from_config(cls, cfg) -> OnDemandPolicy:
        return cls(cfg.quant.min_bits, cfg.quant.max_bits, cfg.devices.noise_dbm_per_hz)

    def choose(self, ctx: RoundContext) -> Decision:
        p = ctx.profiles
        cap = np.minimum(p["max_bits"].to_numpy(np.int64), self.max_bits)
        bits = np.clip(p["preferred_bits"].to_numpy(np.int64), self.min_bits, cap)
        bits = np.maximum(bits, self.min_bits)
        if np.isfinite(ctx.deadline_s):
            compute_s = ctx.local_flops / (p["flops_per_cycle"].to_numpy() * p["cpu_hz_max"].to_numpy())
            upload_budget_s = np.maximum(ctx.deadline_s - compute_s, 0.0)
            r = rate_bps(ctx.bandwidth_hz, p["tx_power_w_max"].to_numpy(), ctx.channel_gain,
                         self.noise_dbm_per_hz)
            for b in sorted({int(b) for b in codec.SUPPORTED_BITS if b >= self.min_bits},
                            reverse=True):
                upload_s = codec.encoded_size(ctx.num_params, b, ctx.block_size) * 8 / r
                too_slow = (bits == b) & (upload_s > upload_budget_s) & (b > self.min_bits)
                lower = [x for x in codec.SUPPORTED_BITS if self.min_bits <= x < b]
                if lower and too_slow.any():
                    bits[too_slow] = max(lower)
        return Decision(bits=bits.astype(np.int64))
