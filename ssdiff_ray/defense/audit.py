"""The model-level audit before serving: does the model itself look backdoored?

Elijah's uniformity: a backdoored model generates nearly one image from every eps + tau.
The audit compares that collapse with copies of tau moved elsewhere, on noise draws the
estimate never saw. The verdict is an ``AuditRule``: one statistic against a threshold,
both chosen on a population of models of known status (``calibrate_rule``;
``benchmarks/security_matrix.py`` trains the population and writes ``audit_rule.json``
with the rule's leave-one-out error rates).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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




RULE_FILE = Path(__file__).with_name("audit_rule.json")
STATISTICS = ("spread_ratio", "spread_z", "random_gap", "cluster_fraction")  # rule candidates


@dataclass
class AuditRule:
    """ "backdoored" when ``statistic`` is below ``threshold`` (``below``) or above it."""

    statistic: str
    threshold: float
    below: bool
    population: dict = field(default_factory=dict)  # what it was calibrated on, and how well

    @classmethod
    def load(cls, path: str | Path = RULE_FILE) -> AuditRule:
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: str | Path = RULE_FILE) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def __str__(self) -> str:
        return f"{self.statistic} {'<' if self.below else '>'} {self.threshold:.4g}"

    def verdict(self, stats: dict) -> str:
        v = float(stats[self.statistic])
        return "backdoored" if (v < self.threshold if self.below else v > self.threshold) \
            else "clean"


def calibrate_rule(stats: list[dict], backdoored: list[bool],
                   statistics: tuple[str, ...] = STATISTICS) -> AuditRule:
    """The statistic and threshold that best separate models of known status: highest
    balanced accuracy, ties to the widest gap between the classes; the threshold sits
    midway between the two values it falls between."""
    y = np.asarray(backdoored, bool)
    if y.all() or not y.any():
        raise ValueError("calibrate_rule needs backdoored and clean models")
    best = None
    for name in statistics:
        v = np.asarray([float(s[name]) for s in stats])
        cuts = np.unique(v)
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            thr = (lo + hi) / 2
            for below in (True, False):
                hit = v < thr if below else v > thr
                acc = (hit[y].mean() + (~hit[~y]).mean()) / 2
                key = (acc, (hi - lo) / (np.ptp(v) + 1e-12))
                if best is None or key > best[0]:
                    best = (key, AuditRule(name, float(thr), below))
    return best[1]


def leave_one_out(stats: list[dict], backdoored: list[bool],
                  statistics: tuple[str, ...] = STATISTICS) -> list[str]:
    """Each model's verdict from a rule calibrated on all the others: out-of-sample rates."""
    return [calibrate_rule(stats[:i] + stats[i + 1:], backdoored[:i] + backdoored[i + 1:],
                           statistics).verdict(stats[i]) for i in range(len(stats))]


@torch.no_grad()
def audit_model(unet, scheduler, est: TriggerEstimate, seed: int = 0, n_random: int = 16,
                n_eps: int = 64, rule: AuditRule | None = None) -> dict:
    """Verdict "clean" or "backdoored" for the model, given its trigger estimate.

    ``spread_ratio``: output spread from eps + tau over that from eps (a backdoor collapses
    onto its target: << 1), compared with ``n_random`` copies of tau moved elsewhere
    (``shifted_copies``; ``spread_z``: how many of their standard deviations tau is below
    their mean; ``random_gap``: their mean minus tau's ratio). The verdict is ``rule``'s
    (default: the calibrated ``audit_rule.json``). Also reports tau's norm, its relative
    shift at t = T (Elijah's lambda as ``response``), TERD's mean per-pixel KL of
    N(tau_i, 1) from N(0, 1), and from the probe the share of clean inputs whose
    generations were near-duplicates (0 on a clean model).
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
    stats = {
        "spread_ratio": ratio,
        "random_gap": float(rand.mean() - ratio),
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
    rule = rule or AuditRule.load()
    return {"verdict": rule.verdict(stats), **stats, "rule": str(rule)}
