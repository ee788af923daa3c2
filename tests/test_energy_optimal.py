"""The energy-optimal policy: constraints hold, and it never loses to a fixed bit-width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssdiff_ray import codec, energy
from ssdiff_ray.devices import local_steps, make_population
from ssdiff_ray.policies.base import RoundContext
from ssdiff_ray.policies.energy_optimal import EnergyOptimalPolicy, solve_power_frequency

CFG = energy.ChannelConfig()
BLOCK = 256
RTOL = 1e-9


def _context(n, seed, num_params=200_000, deadline_s=np.inf, flops_per_step=3e9, norms=False):
    pop = make_population(n, seed)
    rng = np.random.default_rng(seed + 1)
    ids = np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
    prof = pop.iloc[ids]
    gain, bw = energy.draw_round_channel(prof, rng, CFG)
    flops = flops_per_step * local_steps(prof["work_scale"].to_numpy(), 10)
    norm = np.where(rng.random(ids.size) < 0.3, np.nan, rng.uniform(0.1, 10, ids.size)) \
        if norms else None
    return RoundContext(
        round=1, client_ids=ids, profiles=prof, num_params=num_params, block_size=BLOCK,
        num_samples=rng.integers(1, 500, ids.size), local_flops=flops.astype(float),
        channel_gain=gain, bandwidth_hz=bw, deadline_s=deadline_s,
        last_loss=np.full(ids.size, np.nan), update_norm=norm,
    )


def _costs(policy, ctx, decision):
    upload = np.array([codec.encoded_size(ctx.num_params, int(b), BLOCK) for b in decision.bits])
    download = 4 * ctx.num_params if policy.download_bytes is None else policy.download_bytes
    return energy.round_costs(ctx.profiles, ctx.local_flops, upload, download,
                              decision.tx_power_w, decision.cpu_hz, ctx.channel_gain,
                              ctx.bandwidth_hz, CFG)


def _relative_variance(ctx, bits, on_time):
    """rho of the module docstring, computed independently of the policy."""
    w = np.where(on_time, ctx.num_samples, 0.0)
    w = w / w.sum()
    s = np.ones(len(bits)) if ctx.update_norm is None else np.asarray(ctx.update_norm)
    known = np.isfinite(s)
    s2 = np.where(known, s, np.median(s[known]) if known.any() else 1.0) ** 2
    v = np.array([codec.variance_bound(1.0, ctx.num_params, int(b), BLOCK) for b in bits])
    return float((w**2 * s2 * v).sum() / (w**2 * s2).sum())


def _check_decision(policy, ctx, d):
    prof = ctx.profiles
    assert d.bits.dtype == np.int64 and d.bits.shape == ctx.client_ids.shape
    assert np.isin(d.bits, policy.bits).all()
    assert (d.bits <= np.maximum(prof["max_bits"].to_numpy(), min(policy.bits))).all()
    f_lo, f_hi = prof["cpu_hz_min"].to_numpy(), prof["cpu_hz_max"].to_numpy()
    p_lo, p_hi = prof["tx_power_w_min"].to_numpy(), prof["tx_power_w_max"].to_numpy()
    assert (d.cpu_hz >= f_lo * (1 - RTOL)).all() and (d.cpu_hz <= f_hi * (1 + RTOL)).all()
    assert (d.tx_power_w >= p_lo * (1 - RTOL)).all() and (d.tx_power_w <= p_hi * (1 + RTOL)).all()
    costs = _costs(policy, ctx, d)
    on_time = policy.last_info["feasible"]
    assert not energy.stragglers(costs["total_s"][on_time], ctx.deadline_s).any()
    # clients that cannot make it get everything at full speed and the fewest bits
    late = ~on_time
    np.testing.assert_allclose(d.cpu_hz[late], f_hi[late])
    np.testing.assert_allclose(d.tx_power_w[late], p_hi[late])
    assert (d.bits[late] == min(policy.bits)).all()
    np.testing.assert_allclose(policy.last_info["energy_j"], costs["energy_j"], rtol=1e-9)
    return costs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 60),
    seed=st.integers(0, 10_000),
    num_params=st.sampled_from([5_000, 200_000, 2_000_000]),
    deadline_s=st.sampled_from([np.inf, 200.0, 60.0, 20.0, 8.0]),
    ref_bits=st.sampled_from([2, 4, 6, 8]),
    slack=st.sampled_from([0.5, 1.0, 3.0]),
    norms=st.booleans(),
)
def test_constraints_hold_and_never_worse_than_fixed(
    n, seed, num_params, deadline_s, ref_bits, slack, norms
):
    ctx = _context(n, seed, num_params, deadline_s, norms=norms)
    policy = EnergyOptimalPolicy(CFG, min_bits=1, max_bits=8, ref_bits=ref_bits, slack=slack)
    d = policy.choose(ctx)
    costs = _check_decision(policy, ctx, d)
    info = policy.last_info
    on_time = info["feasible"]
    if not on_time.any():
        return
    rho = _relative_variance(ctx, d.bits, on_time)
    assert rho == pytest.approx(info["variance_rel"], rel=1e-9)
    if info["budget_met"]:
        assert rho <= info["variance_budget_rel"] * (1 + 1e-9)
    else:  # best effort: each on-time client sends its widest on-time width
        assert slack < 1  # the default budget (slack >= 1) is always reachable
        widest = policy.solve_fixed(ctx, 8)
        on_time_at_8 = ~energy.stragglers(_costs(policy, ctx, widest)["total_s"], deadline_s)
        assert (d.bits[on_time & on_time_at_8] == widest.bits[on_time & on_time_at_8]).all()

    total = costs["energy_j"].sum()
    for b in policy.bits:
        fixed = policy.solve_fixed(ctx, b)
        fixed_costs = _costs(policy, ctx, fixed)
        meets_deadline = not energy.stragglers(fixed_costs["total_s"][on_time], deadline_s).any()
        meets_variance = _relative_variance(ctx, fixed.bits, on_time) \
            <= info["variance_budget_rel"] * (1 + 1e-9)
        if meets_deadline and meets_variance:
            assert total <= fixed_costs["energy_j"].sum() * (1 + 1e-9)


def test_explicit_budget_is_met_or_flagged():
    ctx = _context(200, 3, deadline_s=60.0)
    loose = EnergyOptimalPolicy(CFG, variance_budget=10.0)
    loose.choose(ctx)
    assert loose.last_info["budget_met"] and loose.last_info["variance_rel"] <= 10.0
    impossible = EnergyOptimalPolicy(CFG, variance_budget=1e-12)
    d = impossible.choose(ctx)
    assert not impossible.last_info["budget_met"]
    # best effort: every on-time client sends the widest width it can afford
    on_time = impossible.last_info["feasible"]
    assert (d.bits[on_time] <= 8).all() and d.bits[on_time].mean() > 6


def test_no_deadline_means_slowest_clock_and_lowest_power():
    ctx = _context(60, 1)
    policy = EnergyOptimalPolicy(CFG, ref_bits=8, max_bits=8)
    d = policy.choose(ctx)
    np.testing.assert_allclose(d.cpu_hz, ctx.profiles["cpu_hz_min"])
    np.testing.assert_allclose(d.tx_power_w, ctx.profiles["tx_power_w_min"])
    # ref_bits = max_bits with slack 1: no room to trade, every client sends 8 bits
    assert (d.bits == 8).all()
    cheap = EnergyOptimalPolicy(CFG, ref_bits=8, slack=1e9)
    assert (cheap.choose(ctx).bits == 1).all()


def test_trades_bits_between_clients_under_a_mid_budget():
    ctx = _context(400, 5, deadline_s=40.0, norms=True)
    policy = EnergyOptimalPolicy(CFG, min_bits=2, max_bits=8, ref_bits=4)
    d = policy.choose(ctx)
    _check_decision(policy, ctx, d)
    assert len(np.unique(d.bits[policy.last_info["feasible"]])) > 2


def test_impossible_deadline_gives_stragglers_at_full_speed():
    ctx = _context(40, 2, deadline_s=1e-3)
    policy = EnergyOptimalPolicy(CFG, min_bits=2)
    d = policy.choose(ctx)
    assert not policy.last_info["feasible"].any()
    assert (d.bits == 2).all()
    np.testing.assert_allclose(d.cpu_hz, ctx.profiles["cpu_hz_max"])
    assert energy.stragglers(_costs(policy, ctx, d)["total_s"], 1e-3).all()


def test_single_client_matches_brute_force_grid():
    """(f, p) from the bisection vs the best point of a dense grid on the deadline."""
    cycles, coeff, expo = 4e10, 1e-27, 2.0
    f_min, f_max, p_min, p_max = 6e8, 1.5e9, 1e-3, 0.2
    gain, bw, n0 = 1e-11, 1e6, float(energy.dbm_to_w(-174.0))
    bits, time_s = 8e6, 50.0
    sol = solve_power_frequency(cycles, coeff, expo, f_min, f_max, p_min, p_max, gain, bw, n0,
                                bits, time_s)
    assert sol["feasible"]
    assert sol["compute_s"] + sol["upload_s"] <= time_s * (1 + 1e-12)
    f = np.linspace(f_min, f_max, 200_001)
    upload_s = time_s - cycles / f
    with np.errstate(over="ignore", invalid="ignore"):  # grid points past the deadline
        p = np.clip(np.expm1(bits / (bw * upload_s) * np.log(2)) * n0 * bw / gain, p_min, None)
        grid = coeff * cycles * f**2 + p * bits / energy.rate_bps(bw, p, gain)
    ok = (upload_s > 0) & (p <= p_max)
    best = grid[ok].min()
    got = sol["compute_energy_j"] + sol["upload_energy_j"]
    assert got <= best * (1 + 1e-9)
    assert got >= best * (1 - 1e-4)
    assert f_min < sol["cpu_hz"] < f_max and p_min < sol["tx_power_w"] < p_max  # interior point


def test_solve_fixed_caps_bits_at_device_max():
    ctx = _context(50, 4, deadline_s=100.0)
    d = EnergyOptimalPolicy(CFG, max_bits=32).solve_fixed(ctx, 32)
    np.testing.assert_array_equal(d.bits, ctx.profiles["max_bits"].to_numpy())


def test_thousand_clients_get_a_feasible_decision():
    """(Its speed is benchmarks/solver_time.py's: a wall-time assert does not belong here.)"""
    ctx = _context(2000, 0, num_params=1_000_000, deadline_s=30.0)
    assert len(ctx.client_ids) == 1000
    d = EnergyOptimalPolicy(CFG, ref_bits=4).choose(ctx)
    assert d.bits.shape == (1000,) and set(np.unique(d.bits)) <= set(codec.SUPPORTED_BITS)
    assert d.tx_power_w is not None and np.isfinite(d.tx_power_w).all()

