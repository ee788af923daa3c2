"""The weighted sum every rule averages with, against a NumPy reference; clipping."""

import numpy as np

from ssdiff_ray.aggregation.base import clip_to_norm
from ssdiff_ray.aggregation.weighted_sum import WeightedSum, axpy


def test_weighted_mean_matches_numpy_and_is_order_independent():
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(12, 1000)).astype(np.float32)
    weights = rng.integers(1, 200, size=12).astype(float)
    slots = np.arange(12) % 3
    ref = (deltas * weights[:, None]).sum(0) / weights.sum()

    a = WeightedSum(1000, 3)
    for d, w, s in zip(deltas, weights, slots):
        a.add(int(s), d, w)
    np.testing.assert_allclose(a.mean(), ref, rtol=1e-6, atol=1e-7)

    # pools answering in another order give the bit-identical result
    b = WeightedSum(1000, 3)
    for s in [2, 0, 1]:
        for d, w, s2 in zip(deltas, weights, slots):
            if s2 == s:
                b.add(int(s), d, w)
    assert np.array_equal(a.mean(), b.mean())


def test_empty_round_gives_none():
    assert WeightedSum(10, 2).mean() is None


def test_clip_to_norm():
    d = np.full(4, 3.0, np.float32)  # norm 6
    c, clipped = clip_to_norm(d, 3.0)
    assert clipped and abs(np.linalg.norm(c) - 3.0) < 1e-5
    c, clipped = clip_to_norm(d, 0.0)
    assert not clipped and c is d


def test_axpy_fused_and_numpy_paths_agree_bit_for_bit():
    # the fused kernel must round exactly like numpy's multiply-then-add, so a run's
    # aggregate (and its resume test) does not depend on which path ran
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_001).astype(np.float32)
    acc = rng.standard_normal(10_001)
    fused, ref = acc.copy(), acc.copy()
    axpy(fused, x, 0.37)
    np.add(ref, x.astype(np.float64) * 0.37, out=ref)
    assert np.array_equal(fused, ref)
    strided = acc.copy()
    axpy(strided, np.repeat(x, 2)[::2], 0.37)  # a non-contiguous input gives the same sum
    assert np.array_equal(strided, ref)
