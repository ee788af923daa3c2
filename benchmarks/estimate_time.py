"""How long the defense of one run takes to compute (trigger estimate, output check, audit):
what the first ``ssdiff sample`` / ``audit`` / ``serve`` on a run pays once, before
``RUN/defense/`` holds it. Times ``cached_defense(refresh=True)`` with ``--threads`` torch
threads on each run given, and the second, cached call.

    python benchmarks/estimate_time.py runs/X [runs/Y ...] --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.defense.cache import cached_defense  # noqa: E402
from ssdiff_ray.defense.defense import Defense  # noqa: E402
from ssdiff_ray.inference import load_run_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimate_time.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        cfg, unet, sched = load_run_model(run)
        t0 = time.perf_counter()
        defense, audit = cached_defense(run, Defense.from_config(cfg, unet, sched), refresh=True)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached_defense(run, Defense.from_config(cfg, unet, sched))
        rows.append({"run": str(run), "preset": cfg.model.preset,
                     "image": f"{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}",
                     "conditional": cfg.model.conditional, "threads": args.threads,
                     "estimator": defense.est.stats.get("method", ""),
                     "first_s": first, "cached_s": time.perf_counter() - t0,
                     "verdict": audit["verdict"]})
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, rows, args_config(args))


if __name__ == "__main__":
    main()
