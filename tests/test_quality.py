"""Sample quality: the run's feature classifier and its cache, FID/KID/precision/recall in
its space and in Inception-v3's (a weights file the test writes), the failure detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.metrics.classifier import cache_key, get_classifier
from ssdiff_ray.metrics.quality import QualityEvaluator


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
    model = get_classifier(ev.train_images, ev.train_labels)
    assert model.from_cache
    assert path.stat().st_mtime_ns == mtime
    with torch.no_grad():
        x = torch.from_numpy(ev.held_images[:50])
        assert torch.equal(model.embed(x), ev.classifier.embed(x))


def test_different_data_gets_different_key(digits):
    x, y = digits
    key = cache_key(x, y)
    assert key == cache_key(x.copy(), y.copy())
    assert key != cache_key(x[..., ::-1], y)
    assert key != cache_key(x, (y + 1) % 10)


def test_small_dataset_cache_and_corrupt_file(tmp_path, digits):
    x, y = digits[0][:60], digits[1][:60]
    get_classifier(x, y, cache_dir=tmp_path)
    get_classifier(x[..., ::-1].copy(), y, cache_dir=tmp_path)  # another dataset, own file
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not list(tmp_path.glob("*.tmp"))
    (tmp_path / f"fid_classifier_{cache_key(x, y)}.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="retraining"):
        assert not get_classifier(x, y, cache_dir=tmp_path).from_cache
    assert get_classifier(x, y, cache_dir=tmp_path).from_cache  # rewritten whole


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


def test_precision_recall_tell_mode_dropping_from_garbage(ev):
    """Half the classes: precision stays high, recall falls. Noise: precision falls."""
    real = ev.evaluate(ev.held_images)
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["kid"] < 0.01 * 1e4
    half = ev.evaluate(ev.held_images[np.isin(ev.held_labels, [0, 1, 2, 3, 4])])
    assert half["precision"] > 0.8 and half["recall"] < real["recall"] - 0.2
    rng = np.random.default_rng(0)
    noise = np.clip(rng.standard_normal(ev.held_images.shape), -1, 1).astype(np.float32)
    assert ev.evaluate(noise)["precision"] < 0.1


def test_failure_detector_flags_a_planted_noise_image_and_few_real_ones(ev):
    real = ev.held_images[:100].copy()
    rng = np.random.default_rng(1)
    planted = real.copy()
    planted[37] = np.clip(rng.standard_normal(real.shape[1:]), -1, 1)  # static, not a digit
    flags = ev.detector.flags(planted)
    assert flags[37] and flags.sum() <= 2
    assert ev.evaluate(ev.held_images)["bad_sample_share"] <= 0.01  # calibrated on these
    train = ev.evaluate(ev.train_images)["bad_sample_share"]
    assert train <= 0.01


def test_unlabelled_data_still_gets_a_feature_space_and_a_failure_detector(digits):
    x, _ = digits
    q = QualityEvaluator(x[:400], np.full(400, -1))
    assert q.num_classes == 0 and q.feature_space == "classifier"
    m = q.evaluate(q.held_images)
    assert np.isfinite(m["fid"]) and "confidence" not in m and m["bad_sample_share"] <= 0.02
    noise = np.clip(np.random.default_rng(2).standard_normal((50, *x.shape[1:])), -1, 1)
    assert q.evaluate(noise.astype(np.float32))["bad_sample_share"] > 0.9


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """An Inception-v3 with random weights, saved the way the real weights file is (the
    state dict of torch-fidelity's network): the weights file is the only thing made up."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:  # build it without the download
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # He init keeps activations alive through ~50 layers
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_path_loads_a_weights_file_offline(inception_file, digits):
    x, y = digits
    idx = np.random.default_rng(0).permutation(len(x))[:80]
    q = QualityEvaluator(x[idx], y[idx], inception_weights=str(inception_file),
                         held_out_fraction=0.5)
    assert q.feature_space == "inception" and q.ref.shape[1] == 2048
    same, noise = q.fid(q.train_images), q.fid_of_noise(40)
    assert same < 1e-3 and noise > 10 * q.fid_floor()  # real vs real near 0, noise far


def test_missing_or_wrong_inception_file_falls_back_with_one_line(tmp_path, digits):
    from ssdiff_ray.metrics.inception import InceptionFeatures, InceptionWeightsError

    x, y = digits
    with pytest.raises(InceptionWeightsError, match="no such file"):
        InceptionFeatures(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(InceptionWeightsError, match="not torch-fidelity's Inception-v3"):
        InceptionFeatures(bad)
    with pytest.warns(UserWarning, match="falls back to the classifier"):
        q = QualityEvaluator(x[:300], y[:300], inception_weights=str(tmp_path / "nope.pth"))
    assert q.feature_space == "classifier"
