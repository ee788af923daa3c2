"""Confirmation runs: the study measures its own noise.

A trial's objectives come from one seed, and the front is chosen on those very values, so
the front's figures are biased towards lucky seeds (in-sample). After the search, the
reference trial and every front member are run again on ``--confirm-seeds N`` fresh seeds
(the config's ``seed`` drives the data split, client sampling and model init; the seeds are
the same for every member, so differences are paired). The confirmation runs are trials of
a second Optuna study, ``<study>:confirm``, in the same storage: the search's sampler never
sees them, and ``--resume`` finds what is already done.

``summarize`` turns them into each member's mean and 95% t-interval per objective and a
verdict against the reference from the paired differences: ``better``/``worse`` where the
interval of the difference excludes 0, ``tie`` where it does not.
"""

from __future__ import annotations

import math

import numpy as np

CONFIRM_OF = "confirm_of"      # user attr: the search trial a confirmation run repeats
CONFIRM_SEED = "confirm_seed"  # user attr: its seed
SEED_STEP = 1000               # fresh seed k = base seed + SEED_STEP * (k + 1)


def study_name(name: str) -> str:
    return f"{name}:confirm"


def open_confirm_study(setup, storage):
    import optuna

    return optuna.create_study(storage=storage, study_name=study_name(setup.opts.study),
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               directions=["minimize"] * len(setup.opts.objectives),
                               load_if_exists=True)


def members(study) -> list:
    """The trials to confirm: the reference (first complete one) and the front."""
    from optuna.trial import TrialState

    try:
        front = list(study.best_trials)
    except ValueError:
        front = []
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ref = [t for t in done if t.user_attrs.get("reference")][:1]
    ref_numbers = {t.number for t in ref}
    return ref + sorted((t for t in front if t.number not in ref_numbers), key=lambda t: t.number)


def enqueue(confirm, setup, study) -> int:
    """Queue every (member, seed) run not yet done or queued; returns how many are queued."""
    from optuna.trial import TrialState

    have = {(t.user_attrs.get(CONFIRM_OF), t.user_attrs.get(CONFIRM_SEED))
            for t in confirm.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
    seeds = [setup.base.seed + SEED_STEP * (k + 1) for k in range(setup.opts.confirm_seeds)]
    queued = 0
    for t in members(study):
        for s in seeds:
            if (t.number, s) not in have:
                confirm.enqueue_trial(t.params, user_attrs={CONFIRM_OF: t.number, CONFIRM_SEED: s})
                queued += 1
    return queued


def interval(x) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean (NaN bounds for fewer than 2)."""
    from scipy import stats

    x = np.asarray([v for v in x if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


def verdict(per_objective: dict[str, str]) -> str:
    """'dominates', 'worse', 'trade-off' or 'ties' from the per-objective verdicts."""
    v = set(per_objective.values())
    if "better" in v:
        return "trade-off" if "worse" in v else "dominates"
    return "worse" if "worse" in v else "ties"


def summarize(study, confirm, objectives: list[str]) -> dict:
    """Per member: values by seed, mean and interval per objective, the verdict against
    the reference; plus the seed noise of each objective against the trials' spread."""
    from optuna.trial import TrialState

    runs: dict[int, dict[int, list[float]]] = {}
    for t in confirm.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        runs.setdefault(t.user_attrs[CONFIRM_OF], {})[t.user_attrs[CONFIRM_SEED]] = list(t.values)
    rows, ref_row = [], None
    for t in members(study):
        by_seed = runs.get(t.number, {})
        row = {"number": t.number, "reference": bool(t.user_attrs.get("reference")),
               "params": t.params, "search": dict(zip(objectives, t.values)),
               "seeds": sorted(by_seed), "objectives": {}}
        for i, o in enumerate(objectives):
            vals = [by_seed[s][i] for s in sorted(by_seed)]
            mean, lo, hi = interval(vals)
            row["objectives"][o] = {"values": vals, "mean": mean, "low": lo, "high": hi}
        rows.append(row)
        if row["reference"]:
            ref_row = (row, by_seed)
    if ref_row is not None:
        ref, ref_seeds = ref_row
        for row in rows:
            if row is ref:
                continue
            mine = runs.get(row["number"], {})
            shared = sorted(set(mine) & set(ref_seeds))
            per = {}
            for i, o in enumerate(objectives):
                d_mean, d_lo, d_hi = interval([mine[s][i] - ref_seeds[s][i] for s in shared])
                row["objectives"][o].update(diff=d_mean, diff_low=d_lo, diff_high=d_hi)
                per[o] = ("better" if d_hi < 0 else "worse" if d_lo > 0 else "tie")
            row["per_objective"], row["verdict"] = per, verdict(per)
    return {"members": rows, "noise": noise(study, rows, objectives)}


def noise(study, rows: list[dict], objectives: list[str]) -> dict:
    """Per objective: the seed SD of the reference (else the members' mean seed SD) and the
    spread (max - min) of the search's complete trials, in the objective's units."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out = {}
    for i, o in enumerate(objectives):
        sds = [float(np.std(r["objectives"][o]["values"], ddof=1)) for r in rows
               if len(r["objectives"][o]["values"]) >= 2]
        ref = [r for r in rows if r["reference"] and len(r["objectives"][o]["values"]) >= 2]
        sd = (float(np.std(ref[0]["objectives"][o]["values"], ddof=1)) if ref
              else float(np.mean(sds)) if sds else math.nan)
        vals = [t.values[i] for t in done if t.values and math.isfinite(t.values[i])]
        spread = float(max(vals) - min(vals)) if vals else math.nan
        out[o] = {"seed_sd": sd, "trial_spread": spread,
                  "spread_over_noise": spread / sd if sd and math.isfinite(sd) else math.nan}
    return out


def best_confirmed(summary: dict, objectives: list[str]):
    """The member to deploy: among those that dominate the reference (all members when
    there is no reference verdict), the best mean on the first objective."""
    rows = [r for r in summary["members"] if not r["reference"]]
    winners = [r for r in rows if r.get("verdict") == "dominates"] or \
        ([] if any("verdict" in r for r in rows) else rows)
    if not winners:
        return None
    return min(winners, key=lambda r: r["objectives"][objectives[0]]["mean"])
