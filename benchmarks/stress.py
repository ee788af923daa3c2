"""Client-count stress: per-round orchestration time and memory from 100 to 2,000 clients.

Same measurement as ``ssdiff stress`` (driver/stress.py) on an embedded local Ray, 10% of
clients per round, tiny preset at 8x8 with one local step on a batch of one. Writes
benchmarks/results/stress.json (per count + fits + targets) and stress.parquet / .png.

    python benchmarks/stress.py                           # 100,250,500,1000,2000
    python benchmarks/stress.py --clients 100,200 --rounds 2
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.driver.session import ray_session
from ssdiff_ray.driver.stress import run_stress

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,250,500,1000,2000")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="ssdiff-stress-"))
    load_before = os.getloadavg()
    with ray_session():
        res = run_stress(counts, work, rounds=args.rounds)
    per, fits = res["per_count"], res["fits"]
    out.mkdir(parents=True, exist_ok=True)
    for f in ("stress.parquet", "stress.png", "stress_rounds.parquet"):
        shutil.copy(work / f, out / f)
    shutil.rmtree(work, ignore_errors=True)
    mem = fits["total_rss_mib_vs_clients"]
    result = {
        "counts": counts, "rounds_per_count": args.rounds, "per_round": 0.1, "cpus": os.cpu_count(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "per_count": per.to_dict("records"), "fits": fits,
        "max_overhead_ms_per_selected_client": float(per["overhead_ms_per_client"].max()),
        "rss_kib_per_client": 1024 * mem["slope"],
        "targets": {"overhead_ms_per_selected_client_lt": 20, "rss_mib_per_idle_client_lt": 2},
    }
    write_json(out / "stress.json", result, args_config(args))
    cols = ["clients", "selected", "wall_s", "compute_s", "overhead_ms_per_client",
            "total_rss_mib", "object_store_mib"]
    print(per[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"orchestration per selected client: max {result['max_overhead_ms_per_selected_client']:.2f} ms"
          " (target < 20 ms)")
    print(f"memory: {mem['intercept']:.0f} MiB + {result['rss_kib_per_client']:.1f} KiB x clients "
          f"(R^2 {mem['r2']:.3f}; target < 2 MiB per client)")
    print(f"wrote {out / 'stress.json'}")


if __name__ == "__main__":
    main()
