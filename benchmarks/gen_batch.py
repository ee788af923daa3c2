"""Generation speed against the batch size: what ``sampling.CPU_PIXELS_PER_BATCH`` is set from.

Times ``sample`` (DDIM, 8 steps, the defense's generations) of ``--n`` images with each
batch size, in turns (every size once per repeat, so machine noise hits all alike), on
an untrained UNet of each preset (speed does not depend on the weights). Reports the
median seconds and each size's speed relative to 500, the old default.

    python benchmarks/gen_batch.py [--threads 2] [--n 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.model.sampling import sample  # noqa: E402
from ssdiff_ray.model.unet import build_scheduler, build_unet  # noqa: E402

SIZES = (16, 32, 64, 128, 250, 500)
MODELS = (("small", 16, 1), ("small", 32, 3))  # the main job's; the colour example's shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gen_batch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sched = build_scheduler()
    rows = []
    for preset, size, channels in MODELS:
        unet = build_unet(preset, size, channels)
        x_T = torch.randn(args.n, channels, size, size)
        times = {b: [] for b in SIZES}
        for _ in range(args.repeat):
            for b in SIZES:
                t0 = time.perf_counter()
                sample(unet, sched, args.n, sampler="ddim", steps=8, x_T=x_T, batch_size=b)
                times[b].append(time.perf_counter() - t0)
        for b in SIZES:
            row = {"preset": preset, "image": f"{channels}x{size}x{size}", "batch": b,
                   "n": args.n, "threads": args.threads, "median_s": median(times[b]),
                   "all_s": times[b], "speed_vs_500": median(times[500]) / median(times[b])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "rows": rows},
               args_config(args))


if __name__ == "__main__":
    main()
