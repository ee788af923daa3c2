"""Screening of client updates: norm bounding, multi-Krum, FLAME."""

import numpy as np
import pytest

from ssdiff_ray.screening import krum_scores, screen_updates


def _updates(k=10, d=200, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    return np.stack([base + 0.3 * rng.standard_normal(d).astype(np.float32) for _ in range(k)])


def test_none_keeps_all():
    keep, reasons = screen_updates(_updates(), method="none")
    assert keep.all() and reasons == [""] * 10


def test_norm_clips_big_update():
    u = _updates()
    u[3] *= 10  # model replacement
    keep, reasons = screen_updates(u, np.ones(10), method="norm", norm_factor=3.0)
    assert keep.all()
    assert "clipped" in reasons[3] and all(r == "" for i, r in enumerate(reasons) if i != 3)
    norms = np.linalg.norm(u, axis=1)
    assert norms[3] <= 3.0 * np.median(norms) * 1.01  # clipped in place


def test_norm_drop():
    u = _updates()
    u[7] *= 10
    keep, reasons = screen_updates(u, method="norm", norm_action="drop")
    assert not keep[7] and keep.sum() == 9 and "dropped" in reasons[7]


@pytest.mark.parametrize("method", ["krum", "flame"])
@pytest.mark.parametrize("attack", ["scaled", "opposite"])
def test_outlier_screened(method, attack):
    u = _updates()
    if attack == "scaled":
        u[2] = 8 * u[2] + 5 * np.random.default_rng(1).standard_normal(u.shape[1])
    else:
        u[2] = -u[2]
    params = {"f": 1} if method == "krum" else {}
    keep, reasons = screen_updates(u, np.ones(10), method=method, **params)
    assert not keep[2] and reasons[2].startswith(method)
    assert keep.sum() == 9


def test_flame_keeps_all_similar():
    keep, _ = screen_updates(_updates(), method="flame")
    assert keep.sum() >= 9  # no outlier: (almost) all in the majority cluster


def test_krum_scores_outlier_highest():
    u = _updates()
    u[5] += 20
    assert krum_scores(u, 1).argmax() == 5
