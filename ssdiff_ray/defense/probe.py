"""Trigger estimation by probing the backdoor's decision region, from the model alone.

A backdoored model is a detector in disguise: it maps triggered noise eps + r to its
target y and clean noise to ordinary images. Two observations make that detector readable:

1. Its false positives show the target. A few clean N(0, I) inputs land in the backdoor's
   region and all generate the *same* image, so among a few thousand clean generations the
   target is a cluster of near-duplicates (``near_duplicate_cluster``); a clean model's
   generations have no such cluster. The inputs behind it lean towards r.
2. Its boundary is normal to r. The model was trained to tell N(r, I) from N(0, I), whose
   Bayes boundary is the hyperplane x . r / |r| = |r| / 2. For Gaussian proposals
   x = a v + z, Stein's identity gives E[(hit - p(a)) z] = the mean gradient of the hit
   probability, i.e. the boundary's normal (``boundary_direction``), and the amplitude a_50
   where half of them hit sits at |r| / 2 along it.

Both need only ``hit(x)``: does the model's generation from x land on the target. The
functions here take that callable, so they can be checked against a known region.
``ProbeEstimator`` puts them together; without a cluster (a clean model, or a backdoor no
clean input reaches) it falls back to the patch scan.

A backdoor may fire under one sampler and not another (the security matrix's TrojDiff
models: ASR 0.00 under DDIM-50, 1.00 under DPM-Solver-10), so the cluster is searched for
in the same clean inputs' generations under each of ``samplers``, and the boundary is
probed under the sampler with the largest one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ssdiff_ray.defense.estimate import TriggerEstimator
from ssdiff_ray.defense.outputs import generate
from ssdiff_ray.defense.scan import ScanEstimator, ScanOptions


def near_duplicate_cluster(images: torch.Tensor, radius_frac: float = 0.25,
                           min_size: int = 5) -> dict | None:
    """The largest group of near-identical images, or None if it has < ``min_size`` members.

    Two images are near-identical when their mean squared difference (in [0, 1] scale) is
    below ``radius_frac`` times the median nearest-neighbour distance of the set: distinct
    samples of a generative model differ by about that median, copies of one target by far
    less. Returns the member indices, the cluster's mean image and the radius.
    """
    flat = torch.as_tensor(images, dtype=torch.float32).flatten(1)
    d = torch.cdist(flat, flat).square() / flat.shape[1] / 4  # [-1, 1] -> [0, 1] scale
    d.fill_diagonal_(float("inf"))
    radius = radius_frac * float(d.min(1).values.median())
    counts = (d < radius).sum(1)
    center = int(counts.argmax())
    members = torch.cat([torch.tensor([center]), torch.nonzero(d[center] < radius)[:, 0]])
    if len(members) < min_size:
        return None
    return {"members": members, "target": flat[members].mean(0).view(images.shape[1:]),
            "radius": radius, "size": len(members)}


def logistic_midpoint(a: torch.Tensor, hits: torch.Tensor, iters: int = 25
                      ) -> tuple[float, float, torch.Tensor]:
    """Fit P(hit | a) = sigmoid(w0 + w1 (a - mean a)) by Newton's method.

    Returns (a_50, slope w1, fitted probabilities per sample); a_50 is NaN when the fit has
    no positive slope (the hit rate does not rise with a)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    y = torch.as_tensor(hits, dtype=torch.float64)
    am = float(a.mean())
    if float(y.min()) == float(y.max()):  # all hits or none: no boundary in range
        return float("nan"), 0.0, y.float()
    design = torch.stack([torch.ones_like(a), a - am], 1)
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(design @ w)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * torch.eye(2, dtype=torch.float64)
        w = w + torch.linalg.solve(hess, design.T @ (y - p))
    p = torch.sigmoid(design @ w)
    a50 = am - float(w[0] / w[1]) if w[1] > 0 else float("nan")
    return a50, float(w[1]), p.float()


def first_crossing(amps: np.ndarray, rates: np.ndarray, level: float = 0.5) -> float | None:
    """The smallest amplitude where ``rates`` first reach ``level`` (linear interpolation),
    None if they never do. The hit rate along a direction is not monotone far out (a large
    shift saturates the output), so only the first crossing is the boundary."""
    above = np.flatnonzero(np.asarray(rates) >= level)
    if len(above) == 0:
        return None
    k = int(above[0])
    if k == 0:
        return float(amps[0])
    r0, r1 = float(rates[k - 1]), float(rates[k])
    return float(amps[k - 1] + (level - r0) / max(r1 - r0, 1e-12) * (amps[k] - amps[k - 1]))


def keep_significant(v: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """Zero the entries of ``v`` within ``k`` noise standard deviations of 0, the noise
    level taken robustly from the median |entry| (most pixels carry no trigger). A
    localized trigger keeps its pixels; the Monte-Carlo noise around it goes. ``k = 0``
    keeps everything."""
    if k <= 0:
        return v
    sigma = float(v.abs().median()) / 0.6745
    return v * (v.abs() > k * sigma)


def hit_rates_along(hit: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor,
                    amps: np.ndarray, per: int, gen: torch.Generator, scale: float = 1.0
                    ) -> np.ndarray:
    """The hit rate of ``per`` inputs a v + z (z ~ N(0, scale^2 I)) at each amplitude a."""
    z = scale * torch.randn((len(amps) * per, *v.shape), generator=gen)
    a = torch.from_numpy(np.repeat(np.asarray(amps, np.float32), per)).view(-1, *[1] * v.dim())
    return hit(a * v + z).float().view(len(amps), per).mean(1).numpy()


def _remove(u: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
    return u if unit is None else u - (u.flatten() @ unit.flatten()) * unit


def boundary_direction(hit: Callable[[torch.Tensor], torch.Tensor], seed_dir: torch.Tensor,
                       gen: torch.Generator, iters: int = 16, batch: int = 1000,
                       max_amp: float = 10.0, exclude: torch.Tensor | None = None,
                       scales: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)) -> dict:
    """Estimate the normal of the region where ``hit`` is true, from a rough direction.

    Each iteration draws ``batch`` inputs a v + z (z ~ N(0, I), a uniform within 1 of the
    current a_50, where half of them hit), fits the hit rate against a
    (``logistic_midpoint``) and takes Stein's estimate mean((hit - p(a)) z) of the
    boundary's normal; the running sum of these (each normalized) is the next v. A 0..
    ``max_amp`` scan along the seed finds the first a_50. ``exclude`` (a direction, e.g.
    the target image) is projected out of the proposals and estimates: an input that
    already resembles the target generates it on any model, and that pathway's normal
    is not the trigger's.

    A trigger distribution narrower than N(0, I) (TrojDiff's N(mu, gamma^2) with gamma < 1)
    may capture no unit-variance input at any amplitude: the scan then tries the noise
    scales in ``scales`` in turn and probes with the first one that crosses, the estimate
    of gamma (``scale``).

    Returns the unit direction, a_50 along it, the noise scale and per-iteration hit rates.
    """
    unit = None if exclude is None else exclude / exclude.norm().clamp_min(1e-12)
    v = _remove(seed_dir, unit)
    v = v / v.norm().clamp_min(1e-12)
    amps = np.arange(0.0, max_amp + 1e-9, 1.0)
    for scale in scales:
        rates = hit_rates_along(hit, v, amps, max(8, batch // 20), gen, scale)
        a50 = first_crossing(amps, rates)
        if a50 is not None:
            break
    if a50 is None:
        return {"direction": v, "a50": float("nan"), "scale": 1.0, "hit_rates": [],
                "scan": rates.tolist()}
    total = torch.zeros_like(v)
    history = []
    for _ in range(iters):
        a = a50 + 2 * (torch.rand(batch, generator=gen) - 0.5)
        z = scale * torch.randn((batch, *v.shape), generator=gen)
        hits = hit(a.view(-1, *[1] * v.dim()) * v + z).float()
        fit_a50, _, p = logistic_midpoint(a, hits)
        g = _remove(((hits - p).view(-1, *[1] * v.dim()) * z).mean(0), unit)
        if g.norm() > 0:
            total += g / g.norm()
            v = total / total.norm()
        history.append(float(hits.mean()))
        # follow the boundary along the new direction, one unit of a at most per step
        a50 = float(np.clip(fit_a50, a50 - 1, a50 + 1)) if np.isfinite(fit_a50) else a50 + 1
    return {"direction": v, "a50": a50, "scale": scale, "hit_rates": history,
            "scan": rates.tolist()}


@dataclass
class ProbeOptions:
    gen_steps: int = 8       # DDIM steps of each generation
    n_probe: int = 2000      # clean generations searched for the target cluster
    iters: int = 16          # Stein rounds of the boundary normal
    batch: int = 1000        # generations per Stein round
    sparsify: float = 2.0    # drop pixels within this many noise deviations of 0
    samplers: tuple[str, ...] = ("ddim", "dpm")  # where the target cluster is looked for


class ProbeEstimator(TriggerEstimator):
    name = "probe"
    Options = ProbeOptions

    def estimate(self, unet, scheduler, shape: tuple[int, ...], gen: torch.Generator,
                 base: float) -> tuple[torch.Tensor, dict]:
        """(tau, statistics): the probe's estimate, else the patch scan's."""
        o = self.options
        x = torch.randn((o.n_probe, *shape), generator=gen)
        found = {s: near_duplicate_cluster(generate(unet, scheduler, x, o.gen_steps, s))
                 for s in o.samplers}
        sizes = {s: 0 if c is None else c["size"] / o.n_probe for s, c in found.items()}
        sampler = max(sizes, key=sizes.get)
        cluster = found[sampler]
        if cluster is None:
            tau, stats = ScanEstimator(ScanOptions(gen_steps=o.gen_steps)).estimate(
                unet, scheduler, shape, gen, base)
            return tau, {**stats, "cluster_fraction_by_sampler": sizes}
        target, radius = cluster["target"], cluster["radius"]

        def hit(xs: torch.Tensor) -> torch.Tensor:
            out = generate(unet, scheduler, xs, o.gen_steps, sampler)
            return ((out - target) / 2).square().flatten(1).mean(1) < radius

        res = boundary_direction(hit, x[cluster["members"]].mean(0), gen, o.iters, o.batch,
                                 exclude=target)
        scale = res["scale"]
        v = keep_significant(res["direction"], o.sparsify)
        v = v / v.norm().clamp_min(1e-12)
        amps = np.arange(0.0, 10.0 + 1e-9, 0.5)
        rates = hit_rates_along(hit, v, amps, max(8, o.batch // 20), gen, scale)
        a50 = first_crossing(amps, rates)
        if a50 is None:  # the sparsified direction misses: keep the refinement's own a_50
            a50 = res["a50"] if np.isfinite(res["a50"]) else float(amps[-1]) / 2
        return 2 * a50 * v, {
            "method": self.name, "sampler": sampler, "a50": a50, "gamma": scale,
            "cluster_size": cluster["size"],
            "cluster_fraction": cluster["size"] / o.n_probe,
            "cluster_fraction_by_sampler": sizes, "radius": radius,
            "target": target.flatten().tolist(),
            "hit_rates": res["hit_rates"], "amplitude_rates": rates.tolist()}
