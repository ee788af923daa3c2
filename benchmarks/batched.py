"""Client-steps per second of batched (vmapped) vs sequential local training, one pool.

The same clients (digits shards, batch 32, the default small model unless overridden) are
trained by ``LocalTrainer`` one after another and by ``BatchedTrainer`` all at once, for
10, 50 and 100 clients per pool, on CPU (1 torch thread, as a pool runs) or CUDA.

    python benchmarks/batched.py                      # CPU
    python benchmarks/batched.py --device cuda        # a GPU machine
    python benchmarks/batched.py --quick              # tiny model, small counts (CI)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.batched import BatchedTrainer
from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.data.split import dirichlet_split
from ssdiff_ray.model.unet import build_scheduler, build_unet, get_flat
from ssdiff_ray.train import LocalTrainer

OUT = Path(__file__).parent / "results" / "batched.json"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(preset: str, device: str, clients: int, steps: int, batch: int, repeats: int) -> dict:
    images, labels = load_digits(16)
    split = dirichlet_split(labels, clients, 0.5, 0, 8)
    shards = [images[s] for s in split]
    unet = build_unet(preset, 16).to(device)
    ac = build_scheduler(1000).alphas_cumprod
    start = get_flat(unet)
    seeds = list(range(clients))
    seq, bat = LocalTrainer(unet, ac, 1e-3), BatchedTrainer(unet, ac, 1e-3, max_clients=clients)
    seq.train(start, shards[0], 1, batch, 0)  # warm-up (allocators, kernels)
    bat.train(start, shards[:2], 1, batch, seeds[:2])
    best = {}
    for name, fn in [("sequential", lambda: [seq.train(start, x, steps, batch, s)
                                             for x, s in zip(shards, seeds)]),
                     ("batched", lambda: bat.train(start, shards, steps, batch, seeds))]:
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return {"clients": clients, "steps": steps, "sequential_s": best["sequential"],
            "batched_s": best["batched"],
            "sequential_client_steps_per_s": clients * steps / best["sequential"],
            "batched_client_steps_per_s": clients * steps / best["batched"],
            "speedup": best["sequential"] / best["batched"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 and 8 clients (CI)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.quick:
        args.preset, args.clients, args.steps, args.repeats = "tiny", [4, 8], 1, 1
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.clients:
        r = measure(args.preset, args.device, n, args.steps, args.batch, args.repeats)
        rows.append(r)
        print(f"{n:4d} clients x {r['steps']} steps: sequential {r['sequential_client_steps_per_s']:8.1f} "
              f"client-steps/s, batched {r['batched_client_steps_per_s']:8.1f} ({r['speedup']:.2f}x)",
              flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{args.threads} threads"
    write_json(args.out, {"device": dev, "preset": args.preset, "batch": args.batch,
                          "load_avg": os.getloadavg(), "results": rows}, args_config(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
