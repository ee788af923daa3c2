"""``ssdiff serve-profile RUN``: FID against sampler and steps, and the server's time, once
per model, saved with the run (``serve_profile.parquet`` / ``.md``, grids in
``serve_profile/``) for the service's planner.

Per (sampler, steps): FID of ``n`` samples in the run's own feature space (the one its
``rounds.parquet`` reports), ``quality`` = the best row's FID / this row's FID (1 = the
best setting profiled), FLOPs per image, and the seconds the served path takes on this
machine (input tests, negation, sampling) for a batch of 1 and of ``batch`` images, fitted
as ``server_s = server_s0 + server_s_per_image * images``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssdiff_ray.model import SAMPLERS

PROFILE = "serve_profile.parquet"


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile_run(run_dir: str | Path, samplers=SAMPLERS, steps=(5, 10, 20, 50),
                n: int = 500, batch: int = 32, seed: int = 0, defended: bool = True,
                log=print) -> pd.DataFrame:
    """Measure every (sampler, steps), save the table with the run and return it.
    ``defended`` False times the plain sampler (a service run with ``--no-defense``)."""
    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.defense import Defense
    from ssdiff_ray.evaluation import Evaluator
    from ssdiff_ray.images import save_grid
    from ssdiff_ray.inference import load_run_model
    from ssdiff_ray.model.sampling import sample
    from ssdiff_ray.model.unet import sampling_flops_per_image

    run_dir = Path(run_dir)
    cfg, unet, scheduler = load_run_model(run_dir)
    unet.eval()
    quality = Evaluator(cfg).quality
    defense = None
    if defended and cfg.defense.enabled:
        defense, _ = cached_defense(run_dir, Defense.from_config(cfg, unet, scheduler), log=log)
    conditional = cfg.model.conditional
    labels = np.arange(n) % cfg.data.num_classes if conditional else None
    guided = conditional and cfg.eval.guidance != 1.0
    shape = (unet.config.in_channels, cfg.data.image_size, cfg.data.image_size)
    grids = run_dir / "serve_profile"
    grids.mkdir(exist_ok=True)
    rows = []
    for sampler in samplers:
        for k in steps:
            t0 = time.perf_counter()
            images = sample(unet, scheduler, n, sampler=sampler, steps=k, seed=seed,
                            labels=labels, guidance=cfg.eval.guidance)
            gen_s = time.perf_counter() - t0
            fid = quality.fid(images)
            save_grid(images[:64], grids / f"{sampler}{k}.png")

            def served(b, sampler=sampler, k=k):
                x = torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed + b))
                lab = None if labels is None else labels[:b]
                if defense is None:
                    return sample(unet, scheduler, b, sampler=sampler, steps=k, x_T=x,
                                  labels=lab, guidance=cfg.eval.guidance)
                return defense.sample(x, labels=lab, guidance=cfg.eval.guidance,
                                      sampler=sampler, steps=k)

            s1, sb = _timed(lambda: served(1), 3), _timed(lambda: served(batch), 1)
            per = max((sb - s1) / (batch - 1), 1e-6)
            rows.append({"sampler": sampler, "steps": k, "fid": fid, "n": n,
                         "flops_per_image": sampling_flops_per_image(unet, k, guided),
                         "server_s0": max(s1 - per, 0.0), "server_s_per_image": per,
                         "server_s_batch1": s1, f"server_s_batch{batch}": sb,
                         "generate_s_per_image": gen_s / n, "defended": defense is not None})
            log(f"  {sampler:>4} {k:>3} steps: FID {fid:8.2f}  served batch 1 {s1:.3f} s, "
                f"batch {batch} {sb:.2f} s")
    table = pd.DataFrame(rows)
    table["quality"] = table["fid"].min() / table["fid"]
    table["feature_space"] = quality.feature_space
    table["profiled_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    table.to_parquet(run_dir / PROFILE, index=False)
    (run_dir / "serve_profile.md").write_text(to_markdown(table))
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """The profile as a Markdown table (steps down, samplers across: FID)."""
    fid = table.pivot(index="steps", columns="sampler", values="fid")
    per = table.pivot(index="steps", columns="sampler", values="server_s_per_image")
    lines = ["| steps | " + " | ".join(f"FID {s} | s/img {s}" for s in fid.columns) + " |",
             "|---|" + "---|---|" * len(fid.columns)]
    for k in fid.index:
        cells = " | ".join(f"{fid.loc[k, s]:.2f} | {per.loc[k, s]:.4f}" for s in fid.columns)
        lines.append(f"| {k} | {cells} |")
    space = table["feature_space"].iloc[0]
    path = ("input tests + negation + sampling" if table["defended"].iloc[0]
            else "sampling only, no defense")
    return (f"FID ({space} space, n = {int(table['n'].iloc[0])}) and served seconds per image "
            f"({path}, this machine)\n\n" + "\n".join(lines) + "\n")


def load_profile(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's saved profile, or None."""
    path = Path(run_dir) / PROFILE
    return pd.read_parquet(path) if path.is_file() else None
