"""One trial = one whole federated run (``api.run``), as a Ray task.

The task reserves no CPU (``num_cpus=0``): like the driver of ``ssdiff run`` it only
plans rounds and waits on its own pool and server actors. If it held a CPU, P trials on
a P-core machine would hold every core while their pools waited for one: a deadlock.
Each run's pools ask for fractional CPUs so that all P trials' pools fit at once.
"""

from __future__ import annotations

import math
import time
import traceback

import ray

from ssdiff_ray.config import Config
from ssdiff_ray.errors import RunStopped, UserError
from tuning.choices import OBJECTIVES, PRUNERS


class Pruned(RunStopped):
    """Stops a trial's run at a round the pruner gave up on (its tracked run: KILLED)."""


def _clean(v):
    """JSON-safe floats (NaN -> None) for Optuna user attributes."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def run_trial_local(cfg: Config, info: dict) -> dict:
    """Run the trial's federated run here; report per-round values when pruning.

    ``info``: objectives, prune (bool), storage URL, study name, trial number.
    Returns ``{"status": "ok"|"pruned"|"error", ...}`` (never raises for run errors, so
    the driver records them on the trial).
    """
    import optuna

    from ssdiff_ray.driver.run import run

    t0 = time.perf_counter()
    objectives = info["objectives"]
    trial = None
    if info.get("prune"):
        from tuning.storage import open_storage, trial_id

        storage = open_storage(info["storage"])
        study = optuna.load_study(study_name=info["study"], storage=storage,
                                  pruner=PRUNERS[info["pruner"]](cfg.rounds,
                                                                 info["pruner_startup"]))
        trial = optuna.trial.Trial(study, trial_id(storage, info["study"], info["trial_number"]))
    rows: list[dict] = []
    totals = {"energy_j": 0.0, "uplink_bytes": 0.0}

    def on_round(fed, r, row):
        totals["energy_j"] += float(row["energy_j"])
        totals["uplink_bytes"] += float(row["uplink_bytes"])
        keep = {"round": r, "energy_j": totals["energy_j"], "uplink_bytes": totals["uplink_bytes"],
                "loss": float(row["loss"])}
        for k in ("fid", "asr", "asr_defended"):
            if k in row:
                keep[k] = float(row[k])
        rows.append(keep)
        if trial is None:
            return
        key, _ = OBJECTIVES[objectives[0]]
        value = keep.get(key, math.nan)
        if value is not None and math.isfinite(value):
            trial.report(value, r)
            if trial.should_prune():
                raise Pruned(f"pruned at round {r}")

    try:
        summary = run(cfg, progress=False, on_round=on_round)
    except Pruned:
        return {"status": "pruned", "step": rows[-1]["round"] if rows else 0,
                "rounds": [{k: _clean(v) for k, v in x.items()} for x in rows],
                "run_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - recorded on the trial by the driver
        user = isinstance(e, UserError)
        msg = str(e).splitlines()[0] if user and str(e) else \
            f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        return {"status": "error", "error": msg, "run_s": time.perf_counter() - t0}
    last = rows[-1] if rows else {}
    for k in ("asr", "asr_defended"):
        summary[k] = last.get(k, math.nan)
    return {"status": "ok", "summary": {k: _clean(v) for k, v in summary.items()},
            "rounds": [{k: _clean(v) for k, v in x.items()} for x in rows],
            "run_s": time.perf_counter() - t0}


@ray.remote(num_cpus=0, max_retries=0)
def run_trial(cfg: Config, info: dict) -> dict:
    return run_trial_local(cfg, info)
