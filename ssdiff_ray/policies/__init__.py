"""Bit-width policies: one small object per policy, ``choose(ctx) -> Decision``.

One policy per file; the list below is the one place policies are registered
(``quant.policy`` reads it).
"""

from __future__ import annotations

from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext
from ssdiff_ray.registry import load

POLICIES = {
    "fixed": "ssdiff_ray.policies.fixed:FixedPolicy",
    "on_demand": "ssdiff_ray.policies.on_demand:OnDemandPolicy",
    "time_adaptive": "ssdiff_ray.policies.time_adaptive:TimeAdaptivePolicy",
    "doubly_adaptive": "ssdiff_ray.policies.doubly_adaptive:DoublyAdaptivePolicy",
    "energy_optimal": "ssdiff_ray.policies.energy_optimal:EnergyOptimalPolicy",
}

__all__ = ["POLICIES", "BitPolicy", "Decision", "RoundContext", "make_policy"]


def make_policy(cfg) -> BitPolicy:
    """The policy named by ``cfg.quant.policy``, built from the run config."""
    return load(POLICIES[cfg.quant.policy]).from_config(cfg)
