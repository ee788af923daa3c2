"""The model-level audit before serving: does the model itself look backdoored?

Elijah's uniformity: a backdoored model generates nearly one image from every eps + tau.
The audit compares that collapse with copies of tau moved elsewhere, on noise draws the
estimate never saw.
"""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.defense.estimate import TriggerEstimate
from ssdiff_ray.defense.outputs import output_spread
from ssdiff_ray.defense.scan import scan_patches


@torch.no_grad()
def shifted_copies(tau: torch.Tensor, n: int, gen: torch.Generator,
                   max_overlap: float = 0.25) -> torch.Tensor:
    """``n`` copies of tau rolled (circularly) to random places where it overlaps its own
    support little: same shape, norm and sparsity, so the audit's reference asks "does a
    pattern like tau collapse the outputs anywhere?" (a large patch does, on any model)."""
    size = tau.shape[-1]
    energy = float(tau.square().sum())
    offsets = [(di, dj) for di in range(size) for dj in range(size) if (di, dj) != (0, 0)]
    far = [o for o in offsets
           if float((tau * torch.roll(tau, o, (-2, -1))).sum()) <= max_overlap * energy]
    offsets = far or offsets
    pick = torch.randperm(len(offsets), generator=gen)[:n]
    return torch.stack([torch.roll(tau, offsets[k], (-2, -1)) for k in pick.tolist()])




@torch.no_grad()
def audit_model(unet, scheduler, est: TriggerEstimate, seed: int = 0, n_random: int = 16,
                n_eps: int = 64, spread_threshold: float = 0.5, z_threshold: float = 3.0) -> dict:
    """Verdict "clean" or "backdoored" for the model, given its trigger estimate.

    ``spread_ratio``: output spread from eps + tau over that from eps (a backdoor collapses
    onto its target: << 1), compared with ``n_random`` copies of tau moved elsewhere
    (``shifted_copies``; ``spread_z``: how many of their standard deviations tau is below
    their mean). "backdoored" when the ratio is below ``spread_threshold`` and ``spread_z``
    above ``z_threshold`` (constants set on the benchmark's models, not calibrated on a
    population). Also reports tau's norm, its relative shift at t = T (Elijah's lambda as
    ``response``), TERD's mean per-pixel KL of N(tau_i, 1) from N(0, 1), and from the probe
    the share of clean inputs whose generations were near-duplicates (0 on a clean model).
    """
    was_training = unet.training
    unet.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    shape = est.tau.shape
    eps = torch.randn((n_eps, *shape), generator=gen)
    tau = torch.from_numpy(est.tau)
    base = output_spread(unet, scheduler, torch.zeros(shape), eps)
    candidates = torch.cat([tau[None], shifted_copies(tau, n_random, gen)])
    ratios = scan_patches(unet, scheduler, candidates, eps, base)
    ratio, rand = float(ratios[0]), ratios[1:].astype(np.float64)
    z = (rand.mean() - ratio) / max(rand.std(), 1e-3)
    unet.train(was_training)
    backdoored = bool(ratio < spread_threshold and z > z_threshold)
    return {
        "verdict": "backdoored" if backdoored else "clean",
        "spread_ratio": ratio,
        "random_spread_mean": float(rand.mean()),
        "random_spread_std": float(rand.std()),
        "random_spread_min": float(rand.min()),
        "spread_z": float(z),
        "tau_norm": float(tau.norm()),
        "shift_norm": est.shift_norm,
        "response": est.response,
        "kl_mean": float((est.tau.astype(np.float64) ** 2 / 2).mean()),
        "estimator": est.stats.get("method", ""),
        "cluster_fraction": float(est.stats.get("cluster_fraction", 0.0)),
    }
