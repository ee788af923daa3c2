"""Energy-optimal on-demand quantization: bits, transmit power and CPU frequency per client.

Per round, minimise the selected clients' total energy

    sum_i  coeff_i c_i f_i^e_i  +  p_i L_i(b_i) / r_i(p_i)        (+ constant download energy)

subject to, for every client, download_s + c_i/f_i + L_i(b_i)/r_i(p_i) <= deadline,
f_min <= f_i <= f_max, p_min <= p_i <= p_max, b_i in codec.SUPPORTED_BITS within
[min_bits, max_bits] and <= the device's max_bits, and the variance constraint below.
(c_i = cycles, L_i = codec payload bits, r_i = B_i log2(1 + p_i h_i / (N0 B_i)).)

Variance constraint. With FedAvg weights w_i = n_i / sum_j n_j over the clients that can meet
the deadline, independent unbiased quantizers give E||sum_i w_i (Q(x_i) - x_i)||^2 =
sum_i w_i^2 E||Q(x_i) - x_i||^2 <= sum_i w_i^2 V_i(b_i), V_i(b) = codec.variance_bound(s_i^2, ...),
s_i = the client's last update norm (the median of known norms where unknown; 1 if none known).
The policy bounds the *relative* variance

    rho(b) = sum_i w_i^2 V_i(b_i) / sum_i w_i^2 s_i^2  <=  variance_budget,

and by default variance_budget = slack * rho(ref_bits for everyone), i.e. "no worse than fixed
ref_bits", where each client's reference width is capped at its device's max_bits and at the
widest width it can still upload before the deadline (so the default budget is always reachable;
with ref_bits = max_bits and slack = 1 that leaves no room to trade bits, only f and p). If no
assignment meets an explicit budget, the minimum-variance assignment is used and
``last_info["budget_met"]`` is False.

Method (convex relaxation + KKT + bisection, vectorised over clients x bit-widths):
1. For fixed bits, energy is separable per client. Compute energy falls and upload energy
   p t_u = K t_u (2^{L/(B t_u)} - 1) (K = N0 B / h, the minimum power that finishes in t_u)
   falls as their times grow, so the deadline is tight: t_c + t_u = T. Both terms are convex in
   their times, so the split is found by bisection on the derivative of
   E_c(t_c) + E_u(T - t_c) over the t_c interval allowed by the f and p bounds.
2. For bits, a Lagrangian on the variance constraint: for multiplier lam, each client picks
   argmin_b E_i(b) + lam w_i^2 V_i(b); bisection on lam finds the smallest lam that meets the
   budget. Because the bit choice is discrete (duality gap), every uniform bit-width that meets
   the constraints is also evaluated and the cheapest feasible candidate wins, so the result is
   never worse than the best fixed bit-width.
Clients that miss the deadline even at min bits, max power and max frequency are given max
power, max frequency and min bits: they will be stragglers, and are left out of the variance
constraint (their updates are not aggregated on time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ssdiff_ray import codec
from ssdiff_ray.energy import ChannelConfig, compute_energy_model, dbm_to_w
from ssdiff_ray.options import option, options_of
from ssdiff_ray.policies.base import BitPolicy, Decision, RoundContext

_BISECTION_STEPS = 64      # float64 interval halves to adjacent floats well before this
_LAMBDA_STEPS = 60
_DEADLINE_MARGIN = 1e-9    # relative: keeps recomputed round times strictly inside the deadline


def _upload_energy_slope(t_s, a_s, k_w):
    """d/dt of K t (2^{a/t} - 1): the (negative) marginal upload energy of more upload time."""
    x = a_s / t_s
    g = np.exp2(x)
    return k_w * ((g - 1.0) - x * np.log(2.0) * g)


def solve_power_frequency(
    cycles, coeff, exponent, f_min_hz, f_max_hz, p_min_w, p_max_w,
    gain, bandwidth_hz, n0_w_per_hz, upload_bits, time_s,
) -> dict[str, np.ndarray]:
    """Energy-minimal (f, p) per entry for compute `cycles` plus an upload of `upload_bits`
    within `time_s`. Inputs broadcast together; infeasible entries get (f_max, p_max)."""
    k_w = n0_w_per_hz * bandwidth_hz / gain                  # power for SNR 1
    a_s = upload_bits / bandwidth_hz                          # upload time at 1 bit/s/Hz
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tu_fast = a_s * np.log(2.0) / np.log1p(p_max_w / k_w)  # log1p: far clients' tiny SNR
        tu_slow = a_s * np.log(2.0) / np.log1p(p_min_w / k_w)
        tc_fast, tc_slow = cycles / f_max_hz, cycles / f_min_hz
        feasible = tc_fast + tu_fast <= time_s
        slack = tc_slow + tu_slow <= time_s                   # idle at (f_min, p_min) anyway
        lo = np.where(slack, tc_slow, np.maximum(tc_fast, time_s - tu_slow))
        hi = np.where(slack, tc_slow, np.minimum(tc_slow, time_s - tu_fast))
        lo, hi = np.where(feasible, lo, tc_fast), np.where(feasible, hi, tc_fast)
        e_c_scale = coeff * cycles ** (1.0 + exponent)        # E_c(t) = scale * t^-e
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            slope = (-exponent * e_c_scale * mid ** (-exponent - 1.0)
                     - _upload_energy_slope(time_s - mid, a_s, k_w))
            rising = slope > 0
            hi = np.where(rising, mid, hi)
            lo = np.where(rising, lo, mid)
        t_c = 0.5 * (lo + hi)
        f_hz = np.where(cycles > 0, cycles / t_c, f_min_hz)
        p_w = k_w * np.expm1(a_s / (time_s - t_c) * np.log(2.0))
    f_hz = np.clip(np.where(slack, f_min_hz, f_hz), f_min_hz, f_max_hz)
    p_w = np.clip(np.where(slack, p_min_w, p_w), p_min_w, p_max_w)
    f_hz = np.where(feasible, f_hz, f_max_hz)
    p_w = np.where(feasible, p_w, p_max_w)
    upload_s = a_s * np.log(2.0) / np.log1p(p_w / k_w)
    return {
        "cpu_hz": f_hz,
        "tx_power_w": p_w,
        "compute_s": cycles / f_hz,
        "upload_s": upload_s,
        "compute_energy_j": coeff * cycles * f_hz**exponent,
        "upload_energy_j": p_w * upload_s,
        "feasible": np.broadcast_to(feasible, np.shape(f_hz)),
    }


def _largest_supported_at_most(cap: np.ndarray, bits: tuple[int, ...]) -> np.ndarray:
    """Per entry, the largest width in `bits` that is <= cap (the smallest width if none is)."""
    table = np.asarray(sorted(bits))
    idx = np.searchsorted(table, cap, side="right") - 1
    return table[np.maximum(idx, 0)]


@dataclass
class Options:
    ref_bits: int = option(6, choices=codec.SUPPORTED_BITS,
                           doc="energy_optimal: variance no worse than this fixed width")
    variance_slack: float = option(1.0, lo=0.0, lo_open=True, hi=1e6)


class EnergyOptimalPolicy(BitPolicy):
    """Joint bits / power / frequency minimising round energy under deadline and variance budget."""

    name = "energy_optimal"
    Options = Options

    def __init__(
        self,
        cfg: ChannelConfig | None = None,
        min_bits: int = 1,
        max_bits: int = 8,
        ref_bits: int = 8,
        slack: float = 1.0,
        variance_budget: float | None = None,
        download_bytes: int | None = None,
    ) -> None:
        """variance_budget: bound on the relative variance rho (module docstring); None means
        slack * rho(ref_bits). download_bytes: None means a float32 model (4 * num_params)."""
        self.cfg = cfg or ChannelConfig()
        self.bits = tuple(b for b in codec.SUPPORTED_BITS if min_bits <= b <= max_bits)
        if not self.bits:
            raise ValueError(f"no supported bit-width in [{min_bits}, {max_bits}]")
        if slack <= 0 or (variance_budget is not None and variance_budget <= 0):
            raise ValueError("slack and variance_budget must be > 0")
        self.ref_bits = ref_bits
        self.slack = slack
        self.variance_budget = variance_budget
        self.download_bytes = download_bytes
        self.last_info: dict = {}

    @classmethod
    def from_config(cls, cfg) -> EnergyOptimalPolicy:
        q, o = cfg.quant, options_of(Options, cfg.quant)
        return cls(ChannelConfig.from_config(cfg.devices), min_bits=q.min_bits,
                   max_bits=q.max_bits, ref_bits=o.ref_bits, slack=o.variance_slack)

    # ---- per-round inputs -------------------------------------------------------------------

    def _download_s(self, ctx: RoundContext) -> float:
        nbytes = self.download_bytes
        if nbytes is None:  # the planner's broadcast size, else a float32 model
            nbytes = ctx.download_bytes if ctx.download_bytes is not None else 4 * ctx.num_params
        return nbytes * 8.0 / self.cfg.downlink_rate_bps

    def _solve(self, ctx: RoundContext, upload_bits: np.ndarray) -> dict[str, np.ndarray]:
        """solve_power_frequency for ctx's clients; upload_bits is (n,) or (n, k)."""
        prof = ctx.profiles

        def per_client(values) -> np.ndarray:  # (n,) -> (n, 1) when solving a bits table
            a = np.asarray(values, dtype=float)
            return a[:, None] if upload_bits.ndim == 2 else a

        coeff, exponent = compute_energy_model(prof)
        cycles = np.asarray(ctx.local_flops, dtype=float) / prof["flops_per_cycle"].to_numpy(float)
        time_s = (ctx.deadline_s - self._download_s(ctx)) * (1.0 - _DEADLINE_MARGIN)
        return solve_power_frequency(
            per_client(cycles), per_client(coeff), per_client(exponent),
            per_client(prof["cpu_hz_min"]), per_client(prof["cpu_hz_max"]),
            per_client(prof["tx_power_w_min"]), per_client(prof["tx_power_w_max"]),
            per_client(ctx.channel_gain), per_client(ctx.bandwidth_hz),
            float(dbm_to_w(self.cfg.noise_dbm_per_hz)), upload_bits, time_s,
        )

    @staticmethod
    def _per_width(bits, fn) -> np.ndarray:
        """fn(int width) evaluated once per distinct width, mapped back onto bits' shape."""
        bits = np.asarray(bits, dtype=np.int64)
        widths, inverse = np.unique(bits, return_inverse=True)
        return np.array([float(fn(int(b))) for b in widths])[inverse].reshape(bits.shape)

    def _payload_bits(self, ctx: RoundContext, bits) -> np.ndarray:
        return self._per_width(
            bits, lambda b: 8.0 * codec.encoded_size(ctx.num_params, b, ctx.block_size))

    def _unit_variance(self, ctx: RoundContext, bits) -> np.ndarray:
        """variance_bound at unit squared norm (the bound is linear in the squared norm)."""
        return self._per_width(
            bits, lambda b: codec.variance_bound(1.0, ctx.num_params, b, ctx.block_size))

    def _device_cap(self, ctx: RoundContext) -> np.ndarray:
        return ctx.profiles["max_bits"].to_numpy(dtype=np.int64)

    # ---- public API ---------------------------------------------------------------------------

    def solve_fixed(self, ctx: RoundContext, bits) -> Decision:
        """Best (f, p) per client for a fixed bit-width (int or per-client array), each capped at
        the device's max_bits (largest supported width below it). Infeasible: (f_max, p_max).
        Sets ``last_info`` to {feasible, energy_j} of this solution."""
        want = np.broadcast_to(np.asarray(bits, dtype=np.int64), (len(ctx.client_ids),))
        b = _largest_supported_at_most(np.minimum(want, self._device_cap(ctx)),
                                       codec.SUPPORTED_BITS).astype(np.int64)
        sol = self._solve(ctx, self._payload_bits(ctx, b))
        self.last_info = {"feasible": sol["feasible"], "energy_j": self._energy(ctx, sol)}
        return Decision(bits=b, tx_power_w=sol["tx_power_w"], cpu_hz=sol["cpu_hz"])

    def choose(self, ctx: RoundContext) -> Decision:
        """Bits, power and frequency per client; details of the solve land in ``last_info``:
        energy_j (predicted, per client), feasible (False: straggler), variance_rel,
        variance_budget_rel, budget_met, lagrange_multiplier, solve_s."""
        start = time.perf_counter()
        n = len(ctx.client_ids)
        bits = np.asarray(self.bits, dtype=np.int64)
        cap = self._device_cap(ctx)
        # min_bits wins over a device max_bits below it: every client keeps >= 1 column
        allowed = (bits[None, :] <= cap[:, None]) | (np.arange(bits.size) == 0)[None, :]
        payload = np.broadcast_to(self._payload_bits(ctx, bits), (n, bits.size))
        sol = self._solve(ctx, payload)
        ok = sol["feasible"] & allowed
        energy = np.where(ok, self._energy(ctx, sol), np.inf)
        on_time = ok.any(axis=1)

        var_scale = self._variance_scale(ctx, on_time)              # w_i^2 s_i^2 (0 off-time)
        var = var_scale[:, None] * self._unit_variance(ctx, bits)[None, :]
        # reference width per client: ref_bits, capped by the device and by what fits the deadline
        widest_on_time = bits[bits.size - 1 - np.argmax(ok[:, ::-1], axis=1)]
        ref_cap = np.minimum(np.minimum(self.ref_bits, cap), widest_on_time)
        ref = _largest_supported_at_most(ref_cap, codec.SUPPORTED_BITS)
        ref_var = var_scale * self._unit_variance(ctx, ref)
        denom = max(var_scale.sum(), np.finfo(float).tiny)
        budget_rel = (self.variance_budget if self.variance_budget is not None
                      else self.slack * ref_var.sum() / denom)
        budget = budget_rel * denom * (1.0 + 1e-12)                 # float noise on equality

        pick, lam, met = self._pick_bits(energy, var, ok, budget, bits, cap)
        rows = np.arange(n)
        pick = np.where(on_time, pick, 0)                            # stragglers: min bits
        chosen_bits = bits[pick]
        f_hz = np.where(on_time, sol["cpu_hz"][rows, pick], ctx.profiles["cpu_hz_max"].to_numpy())
        p_w = np.where(on_time, sol["tx_power_w"][rows, pick],
                       ctx.profiles["tx_power_w_max"].to_numpy())
        self.last_info = {
            "energy_j": self._energy(ctx, sol)[rows, pick],
            "feasible": on_time,
            "variance_rel": float(var[rows, pick][on_time].sum() / denom),
            "variance_budget_rel": float(budget_rel),
            "budget_met": bool(met),
            "lagrange_multiplier": float(lam),
            "solve_s": time.perf_counter() - start,
        }
        return Decision(bits=chosen_bits.astype(np.int64), tx_power_w=p_w, cpu_hz=f_hz)

    # ---- helpers ------------------------------------------------------------------------------

    def _energy(self, ctx: RoundContext, sol: dict[str, np.ndarray]) -> np.ndarray:
        download_j = self.cfg.rx_power_w * self._download_s(ctx)
        return sol["compute_energy_j"] + sol["upload_energy_j"] + download_j

    @staticmethod
    def _variance_scale(ctx: RoundContext, on_time: np.ndarray) -> np.ndarray:
        """w_i^2 s_i^2 for on-time clients (FedAvg weights over them), 0 for stragglers."""
        samples = np.where(on_time, np.asarray(ctx.num_samples, dtype=float), 0.0)
        if samples.sum() <= 0:
            samples = on_time.astype(float)
        w = samples / max(samples.sum(), 1.0)
        norms = np.full(len(on_time), np.nan) if ctx.update_norm is None \
            else np.asarray(ctx.update_norm, dtype=float)
        known = np.isfinite(norms) & (norms > 0)
        norms = np.where(known, norms, np.median(norms[known]) if known.any() else 1.0)
        return w**2 * norms**2

    @staticmethod
    def _pick_bits(energy, var, ok, budget, bits, cap):
        """Cheapest per-client column assignment with sum(var) <= budget.

        Returns (column per client, multiplier of the winning candidate, budget met); the
        multiplier is inf for the minimum-variance assignment and nan for a uniform width."""
        rows = np.arange(energy.shape[0])
        big_v = np.where(ok, var, np.inf)

        def assign(lam: float) -> np.ndarray:
            with np.errstate(invalid="ignore"):
                cost = energy + lam * np.where(ok, var, 0.0)
            return np.argmin(np.where(ok, cost, np.inf), axis=1)

        def totals(pick: np.ndarray) -> tuple[float, float]:
            e = energy[rows, pick]
            return float(np.where(np.isfinite(e), e, 0.0).sum()), float(var[rows, pick].sum())

        # minimum-variance assignment (ties: cheapest), the fallback when the budget is unreachable
        min_v = big_v.min(axis=1, keepdims=True)
        pick_min_v = np.argmin(np.where(big_v <= min_v, energy, np.inf), axis=1)
        if totals(pick_min_v)[1] > budget:
            return pick_min_v, np.inf, False

        candidates = [(np.inf, pick_min_v)]
        # uniform widths (capped at each device's max): guarantees "never worse than fixed b"
        for b in bits:
            col = np.searchsorted(bits, _largest_supported_at_most(np.minimum(b, cap), bits))
            col = np.where(ok[rows, col] | ~ok.any(axis=1), col, -1)
            if (col >= 0).all():
                candidates.append((np.nan, col))
        lam_lo, lam_hi = 0.0, 0.0
        if totals(assign(0.0))[1] <= budget:
            candidates.append((0.0, assign(0.0)))
        else:
            e_span = np.ptp(np.where(ok, energy, 0.0), axis=1).max()
            lam_hi = max(e_span, 1e-300) / max(budget, 1e-300)
            while totals(assign(lam_hi))[1] > budget and lam_hi < 1e300:
                lam_lo, lam_hi = lam_hi, lam_hi * 16.0
            for _ in range(_LAMBDA_STEPS):
                lam = np.sqrt(lam_lo * lam_hi) if lam_lo > 0 else lam_hi / 16.0
                if totals(assign(lam))[1] <= budget:
                    lam_hi = lam
                else:
                    lam_lo = lam
            candidates.append((lam_hi, assign(lam_hi)))
        feasible = [(totals(p)[0], lam, p) for lam, p in candidates if totals(p)[1] <= budget]
        best = min(feasible, key=lambda c: c[0])
        return best[2], best[1], True
