"""Quality vs bits vs energy: whole federated runs, same seed and population, one per policy.

One set of runs, two tables:

* ``bits`` (issue "dynamic quantization"): FP32, fixed 8/4/2 bits with and without error
  feedback, and each adaptive policy -> FID and total uplink bytes.
* ``energy`` (issue "energy model"): FP32, fixed 8 (EF), fixed 4 (EF), energy-optimal ->
  total device energy, uplink bytes, stragglers, FID; plus the energy-optimal solver's time
  for 1,000 clients (benchmarks/solver_time.py's setting).

Every run is the main job's config plus ``COMMON`` (a round deadline so that time, and so
power and CPU frequency, matter; no untrained-model baseline). The deadline is long enough
that no device straggles at full speed, so fixed policies run exactly as without one.

    python benchmarks/policies.py                 # all runs, both tables (~1 h on 2 cores)
    python benchmarks/policies.py --table energy  # only the energy table's 4 runs
    python benchmarks/policies.py --only fixed2_ef,on_demand   # re-run some, keep the others
    python benchmarks/policies.py --quick         # tiny smoke test (CI), writes nothing

Each finished run is saved to benchmarks/results/policies_runs.json at once, so an
interrupted benchmark keeps what it measured; tables go to policies_bits.md/.json and
policies_energy.md/.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from provenance import write_json  # noqa: E402

from ssdiff_ray import api, config

RESULTS = Path(__file__).parent / "results"

COMMON = ["devices.deadline_s=900", "eval.baseline=false"]
ADAPTIVE = ["quant.min_bits=2", "quant.max_bits=8"]
RUNS = {
    "fp32": ["quant.policy=fixed", "quant.bits=32"],
    "fixed8_ef": ["quant.policy=fixed", "quant.bits=8", "quant.error_feedback=true"],
    "fixed8_noef": ["quant.policy=fixed", "quant.bits=8", "quant.error_feedback=false"],
    "fixed4_ef": ["quant.policy=fixed", "quant.bits=4", "quant.error_feedback=true"],
    "fixed4_noef": ["quant.policy=fixed", "quant.bits=4", "quant.error_feedback=false"],
    "fixed2_ef": ["quant.policy=fixed", "quant.bits=2", "quant.error_feedback=true"],
    "fixed2_noef": ["quant.policy=fixed", "quant.bits=2", "quant.error_feedback=false"],
    "on_demand": ["quant.policy=on_demand", *ADAPTIVE],
    "time_adaptive": ["quant.policy=time_adaptive", "quant.bits=2", *ADAPTIVE],
    "doubly_adaptive": ["quant.policy=doubly_adaptive", "quant.bits=2", *ADAPTIVE],
    "energy_optimal": ["quant.policy=energy_optimal", "quant.ref_bits=4", *ADAPTIVE],
}
TABLES = {
    "bits": list(RUNS),
    "energy": ["fp32", "fixed8_ef", "fixed4_ef", "energy_optimal"],
}
QUICK = ["model.preset=tiny", "rounds=2", "clients.count=6", "train.local_steps=2",
         "eval.samples=40", "eval.steps=2"]


def run_one(name: str, overrides: list[str], out_dir: str) -> dict:
    import pandas as pd

    cfg = config.load(None, [*overrides, f"out_dir={out_dir}", f"name={name}"])
    t0 = time.perf_counter()
    s = api.run(cfg, progress=False)
    clients = pd.read_parquet(Path(s["run_dir"]) / "clients.parquet")
    trained = clients[~clients["straggler"]]
    return {
        "run": name, "overrides": overrides, "fid": s["fid"], "uplink_bytes": s["uplink_bytes"],
        "energy_j": s["energy_j"], "compute_energy_j": float(clients["compute_energy_j"].sum()),
        "upload_energy_j": float(clients["upload_energy_j"].sum()),
        "stragglers": s["stragglers"], "mean_bits": float(trained["bits"].mean()),
        "classes_present": s["classes_present"], "wall_s": time.perf_counter() - t0,
    }


def markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def solver_time_1000() -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import solver_time

    row = solver_time.main(["--clients", "1000", "--repeat", "10",
                            "--out", str(RESULTS / "solver_time_1000.json")])["rows"][0]
    return {"clients": 1000, "choose_median_s": row["choose_median_s"]}


def write_table(table: str, runs: dict[str, dict]) -> None:
    rows = [dict(runs[n]) for n in TABLES[table] if n in runs]
    if "fp32" not in runs or not rows:
        return
    base = runs["fp32"]
    for r in rows:
        r["bytes_vs_fp32"] = base["uplink_bytes"] / max(r["uplink_bytes"], 1)
        r["fid_vs_fp32"] = r["fid"] / base["fid"]
        r["energy_saving_vs_fp32"] = 1 - r["energy_j"] / base["energy_j"]
        if "fixed8_ef" in runs:
            r["energy_saving_vs_fixed8"] = 1 - r["energy_j"] / runs["fixed8_ef"]["energy_j"]
    if table == "bits":
        cols = ["run", "fid", "fid_vs_fp32", "uplink_bytes", "bytes_vs_fp32", "mean_bits",
                "classes_present"]
    else:
        cols = ["run", "energy_j", "energy_saving_vs_fp32", "energy_saving_vs_fixed8",
                "compute_energy_j", "upload_energy_j", "uplink_bytes", "stragglers", "fid",
                "fid_vs_fp32"]
        cols = [c for c in cols if all(c in r for r in rows)]
    md = markdown(rows, cols)
    extra = {}
    if table == "energy":
        extra["solver_time"] = solver_time_1000()
        md += (f"\n\nenergy-optimal solver, 1,000 clients: "
               f"{extra['solver_time']['choose_median_s'] * 1e3:.1f} ms (median)")
    print(f"\n{table} table\n{md}")
    stem = RESULTS / f"policies_{table}"
    write_json(stem.with_suffix(".json"), {"common_overrides": COMMON, "runs": rows, **extra},
               COMMON)
    stem.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {stem}.json and .md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("bits", "energy", "all"), default="all")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--only", default="", help="comma-separated subset of run names")
    ap.add_argument("--quick", action="store_true", help="tiny runs (CI smoke test)")
    ap.add_argument("--keep", default="", help="keep run directories under this folder")
    args = ap.parse_args()
    names = list(RUNS) if args.table == "all" else TABLES[args.table]
    if args.only:
        unknown = set(args.only.split(",")) - set(RUNS)
        if unknown:
            ap.error(f"--only: unknown run(s) {', '.join(sorted(unknown))}")
        names = [n for n in names if n in args.only.split(",")]
    common = [*COMMON, *(QUICK if args.quick else []), *args.set]
    store = RESULTS / "policies_runs.json"
    runs = {} if args.quick or not store.exists() else json.loads(store.read_text())["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run_one(name, [*common, *RUNS[name]], args.keep or tmp)
            print(json.dumps(row), flush=True)
            runs[name] = row
            if not args.quick:
                RESULTS.mkdir(exist_ok=True)
                write_json(store, {"common_overrides": common, "runs": runs}, common)
    if args.quick:
        print(markdown(list(runs.values()), ["run", "fid", "uplink_bytes", "energy_j"]))
        return
    for table in ("bits", "energy"):
        write_table(table, runs)


if __name__ == "__main__":
    main()
