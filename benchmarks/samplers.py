"""Sampler x steps on one model (the main job's): FID, precision, recall, the failure share,
the speckled share and seconds per 100 samples, in the run's feature space.

The model is a run directory's (``--run``), or the main job trained here with the defaults.
"DPM-Solver++ (before)" is the construction the project used before the fix: diffusers'
defaults from the training config (no x0 clipping, its own "leading" grid ending at t = 100).
The speckled share is the issue's measure (mean absolute difference of vertical neighbours
above 0.2 in [0, 1] scale; 0.5 as the issue wrote it flags nothing, not even static).

    python benchmarks/samplers.py                   # trains the main job (seed 0) first
    python benchmarks/samplers.py --run runs/X      # a run directory's model
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.metrics.speckle import speckled

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = [("dpm_before", 10), ("dpm", 10), ("dpm", 20), ("ddim", 10), ("ddim", 20), ("ddim", 50),
        ("ddpm", 1000)]


@torch.no_grad()
def dpm_before(unet, scheduler, n: int, steps: int, seed: int) -> np.ndarray:
    """DPM-Solver++ as built before the fix (for the table's first row)."""
    from diffusers import DPMSolverMultistepScheduler

    x = torch.randn((n, unet.config.in_channels, unet.config.sample_size,
                     unet.config.sample_size), generator=torch.Generator().manual_seed(seed))
    sched = DPMSolverMultistepScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1).numpy()


def train_main_job(runs: Path) -> Path:
    cmd = [sys.executable, "-m", "ssdiff_ray.cli", "run", "--quiet", "--set", f"out_dir={runs}",
           "--set", "name=main"]
    subprocess.run(cmd, check=True, capture_output=True)
    return runs / "main"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run directory (default: train the main job)")
    ap.add_argument("--n", type=int, default=500, help="samples per row (DDPM: --n-ddpm)")
    ap.add_argument("--n-ddpm", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "samplers.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ssdiff_ray.data import load_dataset
    from ssdiff_ray.images import save_grid
    from ssdiff_ray.inference import load_run_model
    from ssdiff_ray.metrics.quality import QualityEvaluator
    from ssdiff_ray.model.sampling import sample

    run = Path(args.run) if args.run else train_main_job(Path(tempfile.mkdtemp()))
    cfg, unet, scheduler = load_run_model(run)
    data = load_dataset(cfg.data)
    q = QualityEvaluator(data.images, data.labels, inception_weights=cfg.eval.inception_weights)
    rows = []
    for sampler, steps in GRID:
        n = args.n_ddpm if sampler == "ddpm" else args.n
        t0 = time.perf_counter()
        if sampler == "dpm_before":
            images = dpm_before(unet, scheduler, n, steps, args.seed)
        else:
            images = sample(unet, scheduler, n, sampler=sampler, steps=steps, seed=args.seed)
        secs = time.perf_counter() - t0
        m = q.evaluate(images)
        rows.append({"sampler": sampler, "steps": steps, "n": n, "fid": m["fid"],
                     "precision": m["precision"], "recall": m["recall"],
                     "bad_sample_share": m["bad_sample_share"],
                     "speckled_share": float(speckled(images).mean()),
                     "s_per_100": 100 * secs / n})
        save_grid(images[:64], Path(args.out).with_name(f"samplers_{sampler}{steps}.png"))
        r = rows[-1]
        print(f"{sampler:11s} {steps:5d}  n {n:4d}  FID {r['fid']:9.1f}  P {r['precision']:.2f}  "
              f"R {r['recall']:.2f}  bad {r['bad_sample_share']:.3f}  speckled "
              f"{r['speckled_share']:.3f}  {r['s_per_100']:.2f} s/100", flush=True)
    result = {"command": "python benchmarks/samplers.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "run": str(run),
        "feature_space": q.feature_space, "fid_floor": q.fid_floor(), "threads": args.threads,
        "torch": torch.__version__, "rows": rows,
        "note": f"DDPM rows use n = {args.n_ddpm} (FID is biased upward at small n)"}
    write_json(args.out, result, args_config(args))
    return result


if __name__ == "__main__":
    main()
