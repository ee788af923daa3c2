"""Trial overhead of `ssdiff tune`: a trial's time minus the same run's time via `api.run`.

A small study (tiny preset, parallel 1, so runs do not share the CPUs) runs K trials;
each trial's exported config is then run again with `api.run` on the same local Ray (what
`ssdiff run --config` does, without Ray's start-up). Overhead = driver-side trial time
(ask -> tell: Ray task dispatch, worker start, storage writes) - the plain run's time.

    python benchmarks/tuning_overhead.py [--trials 3] [--rounds 3]

Writes benchmarks/results/tuning_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import tomllib
from pathlib import Path

from provenance import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import optuna

    from ssdiff_ray import api, config
    from tuning.export import runnable_config
    from tuning.study import TuneOptions, run_study

    out = HERE.parent / "runs" / "tune-overhead"
    shutil.rmtree(out, ignore_errors=True)
    base = ["model.preset=tiny", "model.timesteps=100", f"rounds={a.rounds}", "clients.count=10",
            "train.local_steps=4", "train.batch_size=16", "eval.samples=100", "eval.steps=10",
            "eval.baseline=false", "eval.grid=16"]
    opts = TuneOptions(overrides=base, space=str(HERE / "tuning_space.toml"), trials=a.trials,
                       parallel=1, study="overhead", out=str(out), sampler="random",
                       confirm_seeds=0)  # the search's per-trial overhead only
    load0 = os.getloadavg()
    with api.ray_session():
        run_study(opts, progress=False)   # joins this Ray (ray_session yields without starting one)
        study = optuna.load_study(study_name="overhead", storage=f"sqlite:///{out / 'study.db'}")
        rows = []
        for t in study.get_trials():
            if t.state.name != "COMPLETE":
                continue
            text = runnable_config(t.user_attrs["config"], f"plain-{t.number}")
            raw = tomllib.loads(text)
            raw["out_dir"] = str(out / "plain")
            cfg = config.from_dict(raw)
            t0 = time.perf_counter()
            api.run(cfg, progress=False)
            plain_s = time.perf_counter() - t0
            trial_s = t.user_attrs["trial_s"]
            rows.append({"number": t.number, "policy": t.params.get("quant.policy"),
                         "trial_s": trial_s, "run_in_task_s": t.user_attrs["run_s"],
                         "plain_run_s": plain_s, "overhead_s": trial_s - plain_s,
                         "overhead_frac": (trial_s - plain_s) / plain_s,
                         "dispatch_s": trial_s - t.user_attrs["run_s"]})
    rec = {"trials": rows, "rounds": a.rounds, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "cpu_count": os.cpu_count(),
           "mean_overhead_frac": sum(r["overhead_frac"] for r in rows) / max(1, len(rows)),
           "command": "python benchmarks/tuning_overhead.py"}
    write_json(HERE / "results" / "tuning_overhead.json", rec)
    for r in rows:
        print(f"trial {r['number']} ({r['policy']}): trial {r['trial_s']:.1f} s, plain run "
              f"{r['plain_run_s']:.1f} s, overhead {r['overhead_s']:+.1f} s "
              f"({100 * r['overhead_frac']:+.1f}%),"
              f" dispatch+storage {r['dispatch_s']:.2f} s")
    print(f"mean overhead {100 * rec['mean_overhead_frac']:+.1f}% (load {load0[0]:.1f} -> "
          f"{rec['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
