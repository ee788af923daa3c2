"""The FID classifier, its cache and the quality metric (one ~10 s training per session)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.fid import QualityEvaluator, cache_key, frechet_distance, get_classifier


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("cache")
        mp.setenv("SSDIFF_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


@pytest.fixture(scope="module")
def ev(cache, digits):
    rng_before = torch.get_rng_state()
    q = QualityEvaluator(*digits)
    # Training is seeded inside fork_rng: the caller's global torch RNG is left untouched.
    assert torch.equal(rng_before, torch.get_rng_state())
    return q


def test_classifier_accuracy_and_split(ev):
    assert len(ev.held_images) >= 300
    assert sorted(set(ev.held_labels.tolist())) == list(range(10))
    assert ev.accuracy() >= 0.95
    assert not ev.classifier.from_cache


def test_floor_far_below_noise(ev):
    floor, noise = ev.fid_floor(), ev.fid_of_noise()
    assert 0 < floor < noise / 10


def test_identical_set_has_zero_fid(ev):
    assert ev.fid(ev.train_images) == pytest.approx(0.0, abs=1e-6)


def test_fid_deterministic(cache, digits, ev):
    a = ev.fid(ev.held_images)
    assert a == ev.fid(ev.held_images)
    again = QualityEvaluator(*digits)  # loads the cached classifier
    assert again.classifier.from_cache
    assert again.fid(ev.held_images) == a


def test_cache_hit_loads_identical_weights(cache, ev):
    (path,) = cache.glob("fid_classifier_*.pt")
    mtime = path.stat().st_mtime_ns
    model = get_classifier(ev.train_images, ev.train_labels, 16)
    assert model.from_cache
    assert path.stat().st_mtime_ns == mtime
    with torch.no_grad():
        x = torch.from_numpy(ev.held_images[:50])
        assert torch.equal(model.embed(x), ev.classifier.embed(x))


def test_different_data_gets_different_key(digits):
    x, y = digits
    key = cache_key(x, y, 16)
    assert key == cache_key(x.copy(), y.copy(), 16)
    assert key != cache_key(x[..., ::-1], y, 16)
    assert key != cache_key(x, (y + 1) % 10, 16)


def test_small_dataset_cache_and_corrupt_file(tmp_path, digits):
    x, y = digits[0][:60], digits[1][:60]
    get_classifier(x, y, 16, cache_dir=tmp_path)
    get_classifier(x[..., ::-1].copy(), y, 16, cache_dir=tmp_path)  # another dataset, own file
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not list(tmp_path.glob("*.tmp"))
    (tmp_path / f"fid_classifier_{cache_key(x, y, 16)}.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="retraining"):
        assert not get_classifier(x, y, 16, cache_dir=tmp_path).from_cache
    assert get_classifier(x, y, 16, cache_dir=tmp_path).from_cache  # rewritten whole


def test_classes_present(ev):
    assert ev.evaluate(ev.held_images)["classes_present"] == 10
    zeros = ev.held_images[ev.held_labels == 0]
    r = ev.evaluate(zeros)
    assert r["classes_present"] == 1
    assert r["class_histogram"] == [len(zeros)] + [0] * 9
    assert 0.9 < r["confidence"] <= 1.0
    # Look-alike digits: a few 3s read as 5 or 9; a larger min_share ignores those strays.
    threes = ev.train_images[ev.train_labels == 3]
    assert ev.evaluate(threes, min_share=0.05)["classes_present"] == 1
    # Mode collapse shows up against a 10-class set: half the classes gone.
    half = np.isin(ev.held_labels, [0, 1, 2, 3, 4])
    assert ev.evaluate(ev.held_images[half])["classes_present"] <= 6


def test_nonfinite_images_give_inf(ev):
    bad = ev.held_images.copy()
    bad[0, 0, 0, 0] = np.nan
    assert ev.fid(bad) == float("inf")
    assert ev.evaluate(bad)["fid"] == float("inf")


def test_frechet_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 200, 8))
    a[:, 1] *= 3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    got = frechet_distance(mu1, (v * np.sqrt(w)) @ v.T, mu2, s2)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert got == pytest.approx(ref, rel=1e-8)
