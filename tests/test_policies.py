"""Bit-width policies: fixed, on-demand, time-adaptive (AdaQuantFL), doubly adaptive (DAdaQuant)."""

import math

import numpy as np
import pytest

from ssdiff_ray import codec, config
from ssdiff_ray.devices import make_population
from ssdiff_ray.energy import rate_bps
from ssdiff_ray.policies import RoundContext, make_policy
from ssdiff_ray.policies.doubly_adaptive import DoublyAdaptivePolicy
from ssdiff_ray.policies.levels import bits_for_levels
from ssdiff_ray.policies.on_demand import OnDemandPolicy
from ssdiff_ray.policies.time_adaptive import TimeAdaptivePolicy


def _ctx(n=50, deadline=math.inf, losses=(), samples=None, seed=0, num_params=1_000_000):
    pop = make_population(n, seed)
    rng = np.random.default_rng(seed)
    return RoundContext(
        round=len(losses) + 1, client_ids=np.arange(n), profiles=pop, num_params=num_params,
        block_size=256,
        num_samples=np.asarray(samples if samples is not None else rng.integers(5, 200, n)),
        local_flops=np.full(n, 1e9), channel_gain=np.full(n, 1e-10),
        bandwidth_hz=np.full(n, 20e6 / n), deadline_s=deadline, last_loss=np.full(n, np.nan),
        loss_history=list(losses))


def test_bits_for_levels_rounds_up_to_codec_widths():
    assert list(bits_for_levels(np.array([1, 3, 4, 15, 16, 255, 256, 70000]), 1, 32)) == \
        [1, 2, 3, 4, 5, 8, 16, 32]
    assert list(bits_for_levels(np.array([1, 1000]), 2, 8)) == [2, 8]


def test_fixed_policy():
    cfg = config.load(None, ["quant.bits=4"])
    d = make_policy(cfg).choose(_ctx())
    assert (d.bits == 4).all() and d.tx_power_w is None


def test_time_adaptive_levels_grow_as_loss_falls():
    p = TimeAdaptivePolicy(start_bits=2, min_bits=2, max_bits=8)
    assert p.levels([]) == 3
    assert p.levels([1.0, 1.0]) == 3                   # no progress: s_0
    assert p.levels([1.0, 0.25]) == 2 * 3               # ceil(sqrt(4)) * s_0
    assert p.levels([1.0, 0.1]) == math.ceil(math.sqrt(10)) * 3
    bits = [p.choose(_ctx(losses=h)).bits[0] for h in ([1.0], [1.0, 0.25], [1.0, 0.01])]
    assert bits == sorted(bits) and bits[0] == 2 and bits[-1] > bits[0]


def test_doubly_adaptive_time_doubling_on_plateau():
    p = DoublyAdaptivePolicy(start_bits=2, min_bits=1, max_bits=8, window=2)
    assert p.global_level([1.0, 0.9, 0.8]) == 3           # still improving
    assert p.global_level([1.0, 0.9, 0.95, 0.96]) == 7    # plateau of 2 rounds: one more bit
    assert p.global_level([1.0, 1.1, 1.2, 1.3, 1.4]) == 15


def test_doubly_adaptive_client_levels_match_static_variance_with_fewer_bits():
    samples = np.array([5, 10, 20, 40, 80, 160, 320, 640])
    ctx = _ctx(n=8, samples=samples, losses=[1.0])
    p = DoublyAdaptivePolicy(start_bits=4, min_bits=1, max_bits=16)
    bits = p.choose(ctx).bits
    w = samples / samples.sum()
    # q_i grows with w_i^(2/3): heavier clients get at least as many bits
    assert (np.diff(bits) >= 0).all() and bits[-1] > bits[0]
    # variance sum_i w_i^2 / q_i^2 is no worse than the static level's...
    q = 2.0 ** bits - 1
    assert np.sum(w ** 2 / q ** 2) <= np.sum(w ** 2 / 15 ** 2) * (1 + 1e-9)
    # ...with fewer bits in all: the static level sends 4 bits from every client
    assert bits.sum() < 4 * len(bits) and (bits[:3] < 4).all()


def test_on_demand_follows_device_class_and_link():
    ctx = _ctx(n=200)
    d = OnDemandPolicy(min_bits=1, max_bits=8).choose(ctx)
    pref = ctx.profiles["preferred_bits"].to_numpy()
    assert (d.bits == np.clip(pref, 1, 8)).all()  # no deadline: the class preference
    # a tight deadline lowers bits for exactly the clients whose upload at their preferred
    # width does not fit in what the deadline leaves after local compute
    tight = _ctx(n=200, deadline=20.0)
    tight.channel_gain = np.geomspace(1e-16, 1e-6, 200)  # from far-off weak links to strong ones
    d2 = OnDemandPolicy(min_bits=1, max_bits=8).choose(tight)
    p = tight.profiles
    budget = 20.0 - tight.local_flops / (p["flops_per_cycle"] * p["cpu_hz_max"]).to_numpy()
    rate = rate_bps(tight.bandwidth_hz, p["tx_power_w_max"].to_numpy(), tight.channel_gain)
    upload = np.array([codec.encoded_size(tight.num_params, int(b), 256) for b in d.bits]) * 8 / rate
    misses = (upload > np.maximum(budget, 0)) & (d.bits > 1)
    assert misses.any() and (~misses).any()
    assert (d2.bits[misses] < d.bits[misses]).all()       # those that miss go lower...
    assert (d2.bits[~misses] == d.bits[~misses]).all()    # ...and no one else does
    assert set(np.unique(d2.bits)) <= set(codec.SUPPORTED_BITS)


@pytest.mark.parametrize("name", ["fixed", "on_demand", "time_adaptive", "doubly_adaptive",
                                  "energy_optimal"])
def test_every_policy_returns_valid_bits(name):
    cfg = config.load(None, [f"quant.policy={name}", "quant.bits=4", "devices.deadline_s=60"])
    ctx = _ctx(n=30, deadline=60.0, losses=[1.0, 0.5])
    d = make_policy(cfg).choose(ctx)
    assert d.bits.shape == (30,) and set(np.unique(d.bits)) <= set(codec.SUPPORTED_BITS)
