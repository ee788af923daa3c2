"""Aggregation rules: FedAvg, FedAvgM, norm bounding, multi-Krum, FLAME, each through the
``Aggregator`` interface (add, finish) as the parameter server calls it."""

import numpy as np
import pytest

from ssdiff_ray import config
from ssdiff_ray.aggregation import AGGREGATORS, make_aggregator
from ssdiff_ray.aggregation.base import Aggregator, ClientUpdate
from ssdiff_ray.aggregation.fedavg import FedAvg
from ssdiff_ray.aggregation.fedavgm import FedAvgM
from ssdiff_ray.aggregation.flame import Flame
from ssdiff_ray.aggregation.multi_krum import MultiKrum, krum_scores
from ssdiff_ray.aggregation.norm_bound import NormBound

ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


def _updates(k=10, d=200, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    return np.stack([base + 0.3 * rng.standard_normal(d).astype(np.float32) for _ in range(k)])


def _round(agg, deltas, weights=None, w0=None, order=None):
    d = deltas.shape[1]
    agg.begin_round(np.zeros(d, np.float32) if w0 is None else w0)
    weights = np.ones(len(deltas)) if weights is None else weights
    for i in (range(len(deltas)) if order is None else order):
        agg.add(ClientUpdate(i, i % 3, deltas[i].copy()), float(weights[i]))
    return agg.finish()


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_every_registered_rule_is_constructible_from_config(name):
    lr = ["server.lr=0.01"] if name in ADAPTIVE else []   # their lr is a per-weight step
    cfg = config.load(None, [f"server.aggregator={name}", *lr])
    agg = make_aggregator(cfg.server, 200, 3)
    assert isinstance(agg, Aggregator) and agg.name == name
    res = _round(agg, _updates())
    assert res.weights.shape == (200,) and res.aggregated >= 8


def test_fedavg_is_the_weighted_mean_applied_with_the_server_lr_in_any_order():
    u = _updates()
    w = np.arange(1, 11, dtype=float)
    w0 = np.full(200, 0.5, np.float32)
    a = _round(FedAvg(200, 3, lr=0.5), u, w, w0)
    ref = w0 + 0.5 * (u * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(a.weights, ref, rtol=1e-5, atol=1e-6)
    assert a.aggregated == 10 and a.verdicts == {}
    assert abs(a.update_norm - np.linalg.norm((u * w[:, None]).sum(0) / w.sum())) < 1e-4
    b = _round(FedAvg(200, 3, lr=0.5), u, w, w0, order=[9, 3, 0, 6, 1, 4, 7, 2, 5, 8])
    assert np.array_equal(a.weights, b.weights)  # arrival order never changes the result


def test_fedavg_with_no_update_keeps_the_weights():
    agg = FedAvg(5, 1)
    w0 = np.ones(5, np.float32)
    agg.begin_round(w0)
    res = agg.finish()
    assert res.aggregated == 0 and res.weights is w0


def test_fedavgm_momentum_and_its_state():
    agg = FedAvgM(3, 1, lr=0.5, momentum=0.9)
    d = np.ones((1, 3), np.float32)
    w = _round(agg, d, w0=np.zeros(3, np.float32)).weights
    np.testing.assert_allclose(w, 0.5)
    restored = FedAvgM(3, 1, lr=0.5, momentum=0.9)
    restored.load_state_dict(agg.state_dict())
    w = _round(restored, d, w0=w).weights  # v = 0.9 + 1
    np.testing.assert_allclose(w, 0.5 + 0.5 * 1.9)


def test_norm_bound_clips_the_big_update_and_keeps_it():
    u = _updates()
    u[3] *= 10  # model replacement
    res = _round(NormBound(200, 3, norm_factor=3.0), u)
    assert res.aggregated == 10 and set(res.verdicts) == {3}
    assert res.verdicts[3].kept and "clipped" in res.verdicts[3].reason
    norms = np.linalg.norm(_updates(), axis=1)
    clipped_mean = res.weights * 10 - np.delete(_updates(), 3, 0).sum(0)
    assert np.linalg.norm(clipped_mean) <= 3.0 * np.median(norms) * 1.05


@pytest.mark.parametrize("rule", [MultiKrum(200, 3, f=1), Flame(200, 3)])
@pytest.mark.parametrize("attack", ["scaled", "opposite"])
def test_outlier_is_dropped_with_its_reason(rule, attack):
    u = _updates()
    if attack == "scaled":
        u[2] = 8 * u[2] + 5 * np.random.default_rng(1).standard_normal(u.shape[1])
    else:
        u[2] = -u[2]
    res = _round(rule, u)
    assert set(res.verdicts) == {2} and not res.verdicts[2].kept
    assert res.verdicts[2].reason.startswith(rule.name.split("_")[-1])
    assert res.aggregated == 9
    clean = _round(FedAvg(200, 3), np.delete(u, 2, 0))
    if rule.name == "multi_krum":  # Krum keeps the others untouched (FLAME clips them)
        np.testing.assert_allclose(res.weights, clean.weights, rtol=1e-5, atol=1e-6)


def test_flame_keeps_all_similar_updates():
    res = _round(Flame(200, 3), _updates())
    assert res.aggregated >= 9


def test_krum_scores_outlier_highest():
    u = _updates()
    u[5] += 20
    assert krum_scores(u, 1).argmax() == 5


def _adaptive(name, lr=0.01):
    return make_aggregator(config.load(None, [f"server.aggregator={name}", f"server.lr={lr}"]
                                       ).server, 2, 3)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_server_rules_move_small_and_large_coordinates_alike(name):
    # one layer's updates 100x smaller than another's: FedAvg moves it 100x less, a server
    # Adam/Yogi/Adagrad about server.lr each (what they are for)
    deltas = np.array([[1e-2, 1.0]] * 4, np.float32)
    w = np.zeros(2, np.float32)
    agg, steps = _adaptive(name), []
    for _ in range(5):
        new = _round(agg, deltas, w0=w).weights
        steps.append(new - w)
        w = new
    first = steps[0]
    assert 0.3 < first[0] / first[1] <= 1 and 0 < first[1] <= 0.0101   # tau: small moves less
    plain = _round(FedAvg(2, 3, lr=1.0), deltas).weights
    assert plain[0] / plain[1] == pytest.approx(0.01)
    if name == "fedadagrad":   # v sums d^2: under the same update its step stays well below lr
        assert steps[-1][1] < 0.5 * 0.01
    else:                      # bias-corrected: the same update keeps the same step
        assert steps[-1][1] == pytest.approx(steps[0][1], rel=0.02)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_server_state_survives_a_checkpoint(name):
    rng = np.random.default_rng(1)
    rounds = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(4)]
    a, w = _adaptive(name), np.zeros(2, np.float32)
    for d in rounds[:3]:
        w = _round(a, d, w0=w).weights
    b = _adaptive(name)
    b.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v)
                       for k, v in a.state_dict().items()})
    assert np.array_equal(_round(a, rounds[3], w0=w).weights, _round(b, rounds[3], w0=w).weights)
    fresh = _round(_adaptive(name), rounds[3], w0=w).weights   # the state mattered
    assert not np.allclose(fresh, _round(b, rounds[3], w0=w).weights)


def test_adaptive_rule_with_a_fedavg_sized_lr_stops_before_ray():
    with pytest.raises(config.ConfigError, match="server.lr = 1.0: fedadam moves every weight"):
        config.load(None, ["server.aggregator=fedadam"])
