"""Energy-optimal policy: wall time of ``choose`` for 100, 1,000 and 10,000 clients in a round.

Setting: the seeded default population, the "small" UNet preset (1.06 M parameters, 3.66e8
training FLOPs per sample-step at 16x16), batch 32, 10 nominal local steps scaled by device
class, 200 kHz of uplink per client (20 MHz / 100), a 30 s deadline, ref_bits 4.
Also reports the predicted round
energy against the best fixed bit-width that meets the same deadline and variance budget.

    python benchmarks/solver_time.py [--clients 100 1000 10000] [--repeat R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from statistics import median

import numpy as np
from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray import codec, energy
from ssdiff_ray.devices import local_steps, make_population
from ssdiff_ray.policies.base import RoundContext
from ssdiff_ray.policies.energy_optimal import EnergyOptimalPolicy

RESULTS = Path(__file__).resolve().parent / "results" / "solver_time.json"
NUM_PARAMS = 1_062_497            # the "small" preset (ssdiff_ray.model) at 16x16
FLOPS_PER_SAMPLE_STEP = 3.66e8    # energy.train_flops_per_step of that UNet, batch 1
BATCH, NOMINAL_STEPS, BLOCK = 32, 10, 256
BANDWIDTH_PER_CLIENT_HZ = 200e3


def _context(n: int, deadline_s: float, cfg: energy.ChannelConfig, seed: int = 0) -> RoundContext:
    pop = make_population(n, seed, cell_m=cfg.cell_m)
    rng = np.random.default_rng(seed + 1)
    gain, _ = energy.draw_round_channel(pop, rng, cfg)
    # a fixed 200 kHz share per client (20 MHz for 100), so sizes differ only in client count
    bw = np.full(n, BANDWIDTH_PER_CLIENT_HZ)
    steps = local_steps(pop["work_scale"].to_numpy(), NOMINAL_STEPS)
    return RoundContext(
        round=1, client_ids=np.arange(n), profiles=pop, num_params=NUM_PARAMS, block_size=BLOCK,
        num_samples=rng.integers(20, 400, n), local_flops=FLOPS_PER_SAMPLE_STEP * BATCH * steps,
        channel_gain=gain, bandwidth_hz=bw, deadline_s=deadline_s,
        last_loss=np.full(n, np.nan), update_norm=rng.uniform(0.5, 2.0, n),
    )


def _round_energy_j(policy, ctx, decision, cfg) -> tuple[float, np.ndarray]:
    upload = np.array([codec.encoded_size(NUM_PARAMS, int(b), BLOCK) for b in decision.bits])
    costs = energy.round_costs(ctx.profiles, ctx.local_flops, upload, 4 * NUM_PARAMS,
                               decision.tx_power_w, decision.cpu_hz, ctx.channel_gain,
                               ctx.bandwidth_hz, cfg)
    return float(costs["energy_j"].sum()), costs["total_s"]


def _best_fixed(policy, ctx, cfg, on_time, budget_rel) -> dict:
    """Cheapest uniform width meeting the deadline (for on-time clients) and the budget."""
    w = np.where(on_time, ctx.num_samples, 0.0) / ctx.num_samples[on_time].sum()
    s2 = (w * ctx.update_norm) ** 2
    best = {"bits": None, "energy_j": None}
    for b in policy.bits:
        d = policy.solve_fixed(ctx, b)
        e_j, total_s = _round_energy_j(policy, ctx, d, cfg)
        v = np.array([codec.variance_bound(1.0, NUM_PARAMS, int(x), BLOCK) for x in d.bits])
        meets = (not energy.stragglers(total_s[on_time], ctx.deadline_s).any()
                 and (s2 * v).sum() / s2.sum() <= budget_rel * (1 + 1e-9))
        if meets and (best["energy_j"] is None or e_j < best["energy_j"]):
            best = {"bits": int(b), "energy_j": e_j}
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=30.0)
    ap.add_argument("--ref-bits", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="3 repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 3

    cfg = energy.ChannelConfig()
    rows = []
    for n in args.clients:
        ctx = _context(n, args.deadline_s, cfg)
        policy = EnergyOptimalPolicy(cfg, min_bits=1, max_bits=8, ref_bits=args.ref_bits)
        decision = policy.choose(ctx)                                  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            decision = policy.choose(ctx)
            times.append(time.perf_counter() - t0)
        info = policy.last_info
        energy_j, _ = _round_energy_j(policy, ctx, decision, cfg)
        fixed = _best_fixed(policy, ctx, cfg, info["feasible"], info["variance_budget_rel"])
        row = {
            "clients": n,
            "choose_median_s": median(times),
            "choose_min_s": min(times),
            "stragglers": int((~info["feasible"]).sum()),
            "bits_histogram": {int(b): int(c) for b, c in zip(*np.unique(decision.bits,
                                                                         return_counts=True))},
            "variance_rel": info["variance_rel"],
            "variance_budget_rel": info["variance_budget_rel"],
            "energy_j": energy_j,
            "best_fixed_bits": fixed["bits"],              # None: no uniform width qualifies
            "best_fixed_energy_j": fixed["energy_j"],
        }
        ref = policy.solve_fixed(ctx, args.ref_bits)
        ref_j, ref_total_s = _round_energy_j(policy, ctx, ref, cfg)
        row["fixed_ref_energy_j"] = ref_j
        row["fixed_ref_stragglers"] = int(energy.stragglers(ref_total_s, args.deadline_s).sum())
        rows.append(row)
        saving = (f"; fixed {args.ref_bits}b: {ref_j:.0f} J, {row['fixed_ref_stragglers']} "
                  "stragglers" if fixed["energy_j"] is None
                  else f"; saves {1 - energy_j / fixed['energy_j']:.1%} vs best fixed "
                  f"{fixed['bits']}b")
        print(f"{n:>6} clients: choose {row['choose_median_s'] * 1e3:8.2f} ms (median of "
              f"{args.repeat}), {row['stragglers']} stragglers, {energy_j:.0f} J{saving}")

    result = {
        "benchmark": "solver_time",
        "setting": {"num_params": NUM_PARAMS, "flops_per_sample_step": FLOPS_PER_SAMPLE_STEP,
                    "batch": BATCH, "nominal_steps": NOMINAL_STEPS, "block_size": BLOCK,
                    "deadline_s": args.deadline_s, "ref_bits": args.ref_bits,
                    "bandwidth_per_client_hz": BANDWIDTH_PER_CLIENT_HZ, "repeat": args.repeat},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "cpus": os.cpu_count()},
        "rows": rows,
    }
    write_json(args.out, result, args_config(args))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
