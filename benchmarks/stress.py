"""Client-count stress: per-round orchestration time and memory against the client count.

Same measurement as ``ssdiff stress`` (driver/stress.py) on an embedded local Ray, tiny
preset at 8x8 with one local step on a batch of one, 8-bit uploads with error feedback
(a residual per client that has uploaded, bounded in RAM, spilled to disk). Writes
benchmarks/results/NAME.json (per count + fits + targets) and NAME.parquet / .png.

    python benchmarks/stress.py                           # 100..2,000 clients, 10% a round
    python benchmarks/stress.py --name stress_100k --clients 1000,10000,100000 \
        --per-round 0.01 --rounds 20 --checkpoint-every 5   # issue 41's scale
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
KiB, GiB = 1024, 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,250,500,1000,2000")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=float, default=0.1)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--name", default="stress", help="results file stem")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="ssdiff-stress-"))
    load_before = os.getloadavg()
    with ray_session():
        res = run_stress(counts, work, rounds=args.rounds, per_round=args.per_round,
                         preset=args.preset, checkpoint_every=args.checkpoint_every)
    per, fits = res["per_count"], res["fits"]
    out.mkdir(parents=True, exist_ok=True)
    for f in ("stress.parquet", "stress.png", "stress_rounds.parquet"):
        shutil.copy(work / f, out / f.replace("stress", args.name))
    shutil.rmtree(work, ignore_errors=True)
    mem = fits["total_rss_mib_vs_clients"]
    largest = per.iloc[-1]
    result = {
        "counts": counts, "rounds_per_count": args.rounds, "per_round": args.per_round,
        "preset": args.preset, "checkpoint_every": args.checkpoint_every, "cpus": os.cpu_count(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "per_count": per.to_dict("records"), "fits": fits,
        "max_overhead_ms_per_selected_client": float(per["overhead_ms_per_client"].max()),
        "rss_kib_per_client": 1024 * mem["slope"],
        "largest": {"clients": int(largest["clients"]),
                    "peak_rss_gib": float(largest["peak_rss_total_mib"]) / 1024,
                    "peak_pss_gib": float(largest["peak_pss_total_mib"]) / 1024,
                    "rss_last_over_round1": float(largest["rss_last_over_round1"]),
                    "overhead_ms_per_selected_client": float(largest["overhead_ms_per_client"]),
                    "checkpoint_over_round": float(largest["checkpoint_over_round"])},
        "targets": {"overhead_ms_per_selected_client_lt": 20, "rss_mib_per_idle_client_lt": 2,
                    "issue41": {"peak_rss_gib_le": 6, "idle_bytes_per_client_le": KiB,
                                "overhead_ms_per_selected_client_le": 5,
                                "checkpoint_over_round_le": 2}},
    }
    write_json(out / f"{args.name}.json", result, args_config(args))
    cols = ["clients", "selected", "wall_s", "compute_s", "overhead_ms_per_client",
            "peak_rss_total_mib", "peak_pss_total_mib", "rss_last_over_round1", "state_entries",
            "state_ram_bytes_mib", "state_disk_bytes_mib", "checkpoint_over_round"]
    print(per[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    split = ["plan_s", "dispatch_s", "collect_s", "finish_s", "record_s"]
    print(per[["clients", *split]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"orchestration per selected client: max {result['max_overhead_ms_per_selected_client']:.2f} ms")
    if "idle_bytes_per_client_registered" in fits:
        print(f"idle client RAM: {fits['idle_bytes_per_client_registered']:.0f} bytes registered, "
              f"{fits['idle_bytes_per_client_after_rounds']:.0f} after the rounds (less caches)")
    print(f"wrote {out / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
