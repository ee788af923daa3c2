"""Trigger estimation by probing the backdoor's decision region (ssdiff_ray.defense.probe)."""

import numpy as np
import torch

from ssdiff_ray.attacks.patterns import make_trigger
from ssdiff_ray.defense.probe import (
    boundary_direction,
    first_crossing,
    keep_significant,
    logistic_midpoint,
    near_duplicate_cluster,
)


def _cos(a, b):
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_near_duplicate_cluster_finds_repeated_target_and_nothing_in_distinct_images():
    g = torch.Generator().manual_seed(0)
    images = torch.rand((300, 1, 8, 8), generator=g) * 2 - 1  # distinct images
    assert near_duplicate_cluster(images) is None
    target = torch.rand((1, 8, 8), generator=g) * 2 - 1
    copies = [17, 40, 41, 99, 150, 151, 260, 299]
    images[copies] = target + 0.01 * torch.randn((len(copies), 1, 8, 8), generator=g)
    found = near_duplicate_cluster(images)
    assert found is not None and sorted(found["members"].tolist()) == copies
    assert torch.allclose(found["target"], target, atol=0.02)
    assert near_duplicate_cluster(images, min_size=len(copies) + 1) is None


def test_logistic_midpoint_recovers_a50_and_first_crossing():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4000, generator=g) * 6
    hits = torch.rand(4000, generator=g) < torch.sigmoid(2.0 * (a - 3.5))
    a50, slope, p = logistic_midpoint(a, hits)
    assert abs(a50 - 3.5) < 0.1 and abs(slope - 2.0) < 0.3 and p.shape == (4000,)
    a50, _, _ = logistic_midpoint(a, torch.zeros(4000))
    assert np.isnan(a50)  # no rise, no boundary
    amps = np.arange(6.0)
    rates = np.array([0.0, 0.2, 0.4, 0.8, 0.9, 0.3])  # rises, then saturates away
    assert abs(first_crossing(amps, rates) - 2.25) < 1e-9
    assert first_crossing(amps, np.zeros(6)) is None


def test_keep_significant_keeps_a_localized_pattern_and_drops_noise():
    g = torch.Generator().manual_seed(2)
    r = torch.from_numpy(make_trigger("box", 16))
    noisy = r / r.norm() + 0.04 * torch.randn(r.shape, generator=g)
    kept = keep_significant(noisy, 2.0)
    assert _cos(kept, r) > _cos(noisy, r) + 0.05
    assert bool((kept[r > 0] != 0).all())  # every trigger pixel survives
    assert torch.equal(keep_significant(noisy, 0), noisy)


def test_boundary_direction_recovers_the_normal_of_a_halfspace_region():
    """The model's backdoor region for the Bayes rule between N(0, I) and N(r, I) is the
    half-space x . r / |r| > |r| / 2; from a rough seed the estimate turns to r and its
    a_50 lands on |r| / 2."""
    r = torch.from_numpy(make_trigger("box", 16))
    unit = r / r.norm()

    def hit(x):
        return (x.flatten(1) @ unit.flatten()) > r.norm() / 2

    g = torch.Generator().manual_seed(3)
    seed = r + 1.5 * r.norm() * torch.randn(r.shape, generator=g) / 16  # cos ~ 0.5
    assert _cos(seed, r) < 0.6
    res = boundary_direction(hit, seed, g, iters=12, batch=1000)
    assert _cos(res["direction"], r) > 0.9
    assert abs(_cos(res["direction"], r) * res["a50"] - float(r.norm()) / 2) < 0.5
    assert len(res["hit_rates"]) == 12 and 0.2 < np.mean(res["hit_rates"]) < 0.8


def test_boundary_direction_ignores_an_excluded_direction():
    """Inputs that already look like the target generate it on any model: a region also
    entered along that direction still yields the trigger's normal when it is excluded."""
    r = torch.from_numpy(make_trigger("box", 16))
    y = torch.zeros_like(r)
    y[0, 2:6, 2:10] = 1.0  # the "target" direction, disjoint from r

    def hit(x):
        f = x.flatten(1)
        return (f @ (r / r.norm()).flatten() + 0.8 * f @ (y / y.norm()).flatten()) > 3.0

    g = torch.Generator().manual_seed(4)
    plain = boundary_direction(hit, r + y, g, iters=10, batch=1000)
    excl = boundary_direction(hit, r + y, g, iters=10, batch=1000, exclude=y)
    assert _cos(excl["direction"], r) > 0.9 > _cos(plain["direction"], r)
    assert abs(_cos(excl["direction"], y)) < 0.1


def test_boundary_direction_without_a_boundary_reports_nan():
    g = torch.Generator().manual_seed(5)
    res = boundary_direction(lambda x: torch.zeros(len(x), dtype=torch.bool),
                             torch.ones(1, 4, 4), g, iters=3, batch=64)
    assert np.isnan(res["a50"]) and res["hit_rates"] == []


def test_boundary_direction_probes_a_narrow_trigger_distribution_with_narrower_noise():
    """TrojDiff's triggered inputs are N(mu, gamma^2) with gamma < 1: a region that only
    such inputs reach (near mu and of low spread) captures no unit-variance input at any
    amplitude, so the probe scans smaller noise scales and keeps the first that crosses."""
    mu = 0.4 * torch.from_numpy(make_trigger("box", 16))
    unit = mu / mu.norm()

    def hit(x):
        f = x.flatten(1)
        along = f @ unit.flatten()
        rest = f - along[:, None] * unit.flatten()
        return (along > mu.norm() / 2) & (rest.square().mean(1) < 0.6 ** 2 * 1.3)

    g = torch.Generator().manual_seed(6)
    seed = mu + 0.3 * mu.norm() * torch.randn(mu.shape, generator=g) / 16
    res = boundary_direction(hit, seed, g, iters=8, batch=500)
    assert res["scale"] == 0.6  # 1.0 and 0.8 never reach the region, 0.6 does
    assert _cos(res["direction"], mu) > 0.9
    assert len(res["hit_rates"]) == 8
