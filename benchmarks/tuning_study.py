"""Acceptance study: >= 12 trials, 2 in parallel, tiny preset, vs fixed 8-bit, confirmed on
fresh seeds.

Runs `ssdiff tune`'s study (energy, FID) with fixed 8-bit (base config, same seed)
enqueued as the reference trial, then its confirmation (``--confirm-seeds``, default 3):
the reference and every front member again on fresh seeds, with the paired verdicts of
``report.md``. Also re-runs the exported best config with `api.run` (what
`ssdiff run --config best.toml` does) to compare its objectives with the trial's.

    python benchmarks/tuning_study.py [--trials 12] [--parallel 2] [--rounds 8] [--confirm-seeds 3] --fresh

Writes benchmarks/results/tuning_study.json, tuning_study.md (the study's report.md),
tuning_study_trials.parquet, tuning_study_pareto.png and tuning_study_confirmed.png (the
study itself, with its runs, stays in runs/tune-accept/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from provenance import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def base_overrides(rounds: int, out: Path) -> list[str]:
    return ["model.preset=tiny", "model.timesteps=100", f"rounds={rounds}", "clients.count=10",
            "clients.per_round=0.5", "train.local_steps=40", "train.batch_size=16",
            "eval.samples=500", "eval.steps=10", "eval.baseline=false", "eval.grid=16",
            "quant.policy=fixed", "quant.bits=8", f'out_dir="{out}"', "seed=0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--confirm-seeds", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="delete an earlier study first")
    a = ap.parse_args()
    out = HERE.parent / "runs" / "tune-accept"
    if a.fresh and out.exists():
        shutil.rmtree(out)

    from ssdiff_ray import api, config
    from tuning.study import TuneOptions, run_study

    opts = TuneOptions(overrides=base_overrides(a.rounds, out / "runs"),
                       space=str(HERE / "tuning_space.toml"), trials=a.trials, parallel=a.parallel,
                       study="accept", out=str(out), reference=["quant.policy=fixed", "quant.bits=8"],
                       startup_trials=4, confirm_seeds=a.confirm_seeds)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = run_study(opts)
    study_s = time.perf_counter() - t0
    import pandas as pd

    df = pd.read_parquet(out / "trials.parquet")
    done = df[df["state"] == "COMPLETE"]
    ref = done[done["reference"]].iloc[0]
    dominating = done[(done["energy"] < ref["energy"]) & (done["fid"] <= ref["fid"])]
    front_nums = {f["number"] for f in res["front"]}
    front_dom = dominating[dominating["number"].isin(front_nums)]
    # Reproduce the exported best config (what `ssdiff run --config best.toml` runs).
    best = res["best"]
    cfg = config.load(best["config"], [f'out_dir="{out / "repro"}"'])
    with api.ray_session():
        t1 = time.perf_counter()
        rep = api.run(cfg, progress=False)
        repro_s = time.perf_counter() - t1
    trial = done[done["number"] == best["number"]].iloc[0]
    record = {
        "trials": int(len(df)), "complete": int(len(done)), "parallel": a.parallel,
        "rounds": a.rounds, "study_wall_s": study_s, "loadavg_start": load0,
        "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count(),
        "reference": {"number": int(ref["number"]), "energy_j": float(ref["energy"]),
                      "fid": float(ref["fid"])},
        "front": res["front"],
        "dominating_reference": [
            {"number": int(r["number"]), "policy": r.get("param.quant.policy"),
             "energy_j": float(r["energy"]), "fid": float(r["fid"]),
             "on_front": bool(r["number"] in front_nums)} for _, r in dominating.iterrows()],
        "front_dominates_reference": bool(len(front_dom)),
        "best": {"number": int(best["number"]), "policy": trial.get("param.quant.policy"),
                 "trial_energy_j": float(trial["energy"]), "trial_fid": float(trial["fid"]),
                 "repro_energy_j": rep["energy_j"], "repro_fid": rep["fid"], "repro_s": repro_s,
                 "energy_rel_diff": abs(rep["energy_j"] - trial["energy"]) / trial["energy"],
                 "fid_rel_diff": abs(rep["fid"] - trial["fid"]) / trial["fid"]},
        "command": "python benchmarks/tuning_study.py --fresh",
        "confirmed": confirmed_record(res.get("confirmed")),
    }
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(out / "trials.parquet", RESULTS / "tuning_study_trials.parquet")
    if (out / "pareto.png").exists():
        shutil.copy(out / "pareto.png", RESULTS / "tuning_study_pareto.png")
    if (out / "pareto_confirmed.png").exists():
        shutil.copy(out / "pareto_confirmed.png", RESULTS / "tuning_study_confirmed.png")
    if (out / "report.md").exists():
        shutil.copy(out / "report.md", RESULTS / "tuning_study.md")
    write_json(RESULTS / "tuning_study.json", record)
    print(json.dumps({k: record[k] for k in ("complete", "study_wall_s", "reference",
                                             "front_dominates_reference", "best", "confirmed")},
                     indent=2, default=float))


def confirmed_record(c: dict | None) -> dict | None:
    """The confirmation's figures: each member's means and intervals, its verdict, the seed
    noise against the spread between trials, and the energy saved by the best confirmed."""
    from tuning.confirm import best_confirmed

    if c is None:
        return None
    ref = next((m for m in c["members"] if m["reference"]), None)
    members = [{"number": m["number"], "reference": m["reference"], "params": m["params"],
                "seeds": m["seeds"], "verdict": m.get("verdict"),
                "per_objective": m.get("per_objective"), "objectives": m["objectives"]}
               for m in c["members"]]
    rec = {"members": members, "noise": c["noise"], "report": "results/tuning_study.md"}
    best = best_confirmed(c, ["energy", "fid"])  # what best_confirmed.toml holds
    if ref is not None and best is not None:
        e_ref = ref["objectives"]["energy"]["mean"]
        rec["best_confirmed"] = {
            "number": best["number"],
            "energy_saving": 1 - best["objectives"]["energy"]["mean"] / e_ref,
            "fid_diff": best["objectives"]["fid"].get("diff"),
            "fid_diff_interval": [best["objectives"]["fid"].get("diff_low"),
                                  best["objectives"]["fid"].get("diff_high")]}
    return rec


if __name__ == "__main__":
    main()
