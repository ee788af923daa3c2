"""Bit-width policies: one small object per policy, ``choose(ctx) -> Decision``."""

from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext

__all__ = ["BitPolicy", "Decision", "RoundContext", "make_policy"]


def make_policy(cfg) -> BitPolicy:
    """The policy named by ``cfg.quant.policy``, built from the run config."""
    q = cfg.quant
    if q.policy == "fixed":
        from ssdiff_ray.policies.fixed import FixedPolicy

        return FixedPolicy(q.bits)
    if q.policy == "on_demand":
        from ssdiff_ray.policies.on_demand import OnDemandPolicy

        return OnDemandPolicy(q.min_bits, q.max_bits, cfg.devices.noise_dbm_per_hz)
    if q.policy == "time_adaptive":
        from ssdiff_ray.policies.time_adaptive import TimeAdaptivePolicy

        return TimeAdaptivePolicy(q.bits, q.min_bits, q.max_bits)
    if q.policy == "doubly_adaptive":
        from ssdiff_ray.policies.doubly_adaptive import DoublyAdaptivePolicy

        return DoublyAdaptivePolicy(q.bits, q.min_bits, q.max_bits, q.convergence_window)
    if q.policy == "energy_optimal":
        from ssdiff_ray.planner import channel_config
        from ssdiff_ray.policies.energy_optimal import EnergyOptimalPolicy

        return EnergyOptimalPolicy(channel_config(cfg), min_bits=q.min_bits,
                                   max_bits=q.max_bits, ref_bits=q.ref_bits,
                                   slack=q.variance_slack)
    raise ValueError(f"unknown policy {q.policy!r}")
