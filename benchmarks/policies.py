"""Quality vs bits vs energy: whole federated runs, same seed, one per policy setting.

Two tables from one script:

    # issue "dynamic quantization": FP32, fixed 8/4/2 with and without error feedback,
    # and each adaptive policy -> FID and total uplink bytes
    python benchmarks/policies.py --table bits

    # issue "energy model": FP32, fixed 8, fixed 4, energy-optimal -> energy, bytes,
    # stragglers, FID (same population, a round deadline so time matters)
    python benchmarks/policies.py --table energy

Every run uses the main job's config (``--set`` adds overrides to all runs; ``--quick``
shrinks everything for CI). Results go to benchmarks/results/policies_<table>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ssdiff_ray import api, config

RESULTS = Path(__file__).parent / "results"

BITS_TABLE = {
    "fp32": ["quant.policy=fixed", "quant.bits=32"],
    "fixed8_ef": ["quant.policy=fixed", "quant.bits=8", "quant.error_feedback=true"],
    "fixed8_noef": ["quant.policy=fixed", "quant.bits=8", "quant.error_feedback=false"],
    "fixed4_ef": ["quant.policy=fixed", "quant.bits=4", "quant.error_feedback=true"],
    "fixed4_noef": ["quant.policy=fixed", "quant.bits=4", "quant.error_feedback=false"],
    "fixed2_ef": ["quant.policy=fixed", "quant.bits=2", "quant.error_feedback=true"],
    "fixed2_noef": ["quant.policy=fixed", "quant.bits=2", "quant.error_feedback=false"],
    "on_demand": ["quant.policy=on_demand", "quant.min_bits=2", "quant.max_bits=8"],
    "time_adaptive": ["quant.policy=time_adaptive", "quant.bits=2", "quant.min_bits=2",
                      "quant.max_bits=8"],
    "doubly_adaptive": ["quant.policy=doubly_adaptive", "quant.bits=2", "quant.min_bits=2",
                        "quant.max_bits=8"],
    "energy_optimal": ["quant.policy=energy_optimal", "quant.min_bits=2", "quant.max_bits=8",
                       "quant.ref_bits=4"],
}

# A deadline makes time (and so power/frequency) matter; the same for every run.
ENERGY_COMMON = ["devices.deadline_s=120"]
ENERGY_TABLE = {
    "fp32": ["quant.policy=fixed", "quant.bits=32"],
    "fixed8": ["quant.policy=fixed", "quant.bits=8"],
    "fixed4": ["quant.policy=fixed", "quant.bits=4"],
    "energy_optimal": ["quant.policy=energy_optimal", "quant.min_bits=2", "quant.max_bits=8",
                       "quant.ref_bits=4"],
}

QUICK = ["model.preset=tiny", "rounds=2", "clients.count=6", "train.local_steps=2",
         "eval.samples=40", "eval.steps=2", "eval.baseline=false"]


def run_one(name: str, overrides: list[str], out_dir: str) -> dict:
    cfg = config.load(None, [*overrides, f"out_dir={out_dir}", f"name={name}"])
    t0 = time.perf_counter()
    s = api.run(cfg, progress=False)
    import pandas as pd

    clients = pd.read_parquet(Path(s["run_dir"]) / "clients.parquet")
    return {
        "run": name, "fid": s["fid"], "uplink_bytes": s["uplink_bytes"],
        "energy_j": s["energy_j"], "stragglers": s["stragglers"],
        "mean_bits": float(clients.loc[~clients["straggler"], "bits"].mean()),
        "classes_present": s["classes_present"], "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("bits", "energy"), default="bits")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--only", default="", help="comma-separated subset of run names")
    ap.add_argument("--quick", action="store_true", help="tiny runs (CI smoke test)")
    ap.add_argument("--keep", default="", help="keep run directories under this folder")
    args = ap.parse_args()
    table = BITS_TABLE if args.table == "bits" else ENERGY_TABLE
    common = ([] if args.table == "bits" else ENERGY_COMMON) + (QUICK if args.quick else [])
    names = [n for n in table if not args.only or n in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or tmp
        for name in names:
            row = run_one(name, [*common, *args.set, *table[name]], out_dir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["run"] == "fp32"), rows[0])
    for r in rows:
        r["bytes_vs_fp32"] = base["uplink_bytes"] / max(r["uplink_bytes"], 1)
        r["fid_vs_fp32"] = r["fid"] / base["fid"]
        r["energy_vs_fp32"] = r["energy_j"] / base["energy_j"]
    cols = ["run", "fid", "fid_vs_fp32", "uplink_bytes", "bytes_vs_fp32", "mean_bits",
            "energy_j", "energy_vs_fp32", "stragglers", "classes_present", "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    md = "\n".join(lines)
    print(md)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"policies_{args.table}"
        stem.with_suffix(".json").write_text(json.dumps(
            {"common_overrides": [*common, *args.set], "runs": rows}, indent=2))
        stem.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
