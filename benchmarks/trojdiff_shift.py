"""Why the audit misses TrojDiff: its distribution shift at t = T exists but is not found.

For each saved run, the mean residual R = E[x - eps_theta(x, T)] (zero for a clean model,
whose prediction at T is its input) is measured on:

* the true TrojDiff trigger distribution x ~ N(mu, gamma^2 I) (oracle: the shift Elijah's
  inversion would look for);
* a fixed-point search from clean-looking starts, x ~ N(m, s^2 I) with m <- R, s in
  {1, 0.6} (what a model-only estimator can do without knowing mu).

It also records how the backdoor depends on the sampler: the attack success rate of
triggered inputs and whether clean generations hold a near-duplicate cluster (what the probe
estimator looks for), with a short DDIM run whose x0 is clipped to [-1, 1] (the probe's and
DDIM's way), the same run unclipped, and the product's samplers (DPM-Solver++, unclipped;
DDIM, clipped as the scheduler config says).

Cosine with mu and |R| per case go to ``results/trojdiff_shift.json``.

    python benchmarks/security.py --train-only --scenarios trojdiff,clean --runs-dir R
    python benchmarks/trojdiff_shift.py R/trojdiff R/clean
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import write_json  # noqa: E402

from ssdiff_ray.attacks import AttackSpec  # noqa: E402
from ssdiff_ray.attacks.base import target_images  # noqa: E402
from ssdiff_ray.attacks.metrics import attack_metrics  # noqa: E402
from ssdiff_ray.attacks.trojdiff import troj_params  # noqa: E402
from ssdiff_ray.data import load_dataset  # noqa: E402
from ssdiff_ray.defense.outputs import generate  # noqa: E402
from ssdiff_ray.defense.probe import near_duplicate_cluster  # noqa: E402
from ssdiff_ray.inference import load_run_model  # noqa: E402
from ssdiff_ray.model.sampling import sample  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-12))


@torch.no_grad()
def residual(unet, t: int, x: torch.Tensor) -> torch.Tensor:
    return (x - unet(x, torch.full((len(x),), t)).sample).mean(0)


@torch.no_grad()
def ddim_unclipped(unet, sched, x: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM with x0 left unclipped (diffusers' DDIMScheduler, clip_sample off)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False)
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def by_sampler(cfg, unet, sched, spec: AttackSpec, x_trig: torch.Tensor, x_clean: torch.Tensor
               ) -> dict:
    """ASR of triggered inputs and the near-duplicate cluster among clean generations, per
    sampler."""
    data = load_dataset(cfg.data)
    target = torch.from_numpy(target_images(spec, data.images, data.labels))  # image or class
    samplers = {
        "ddim8_clipped": lambda x: generate(unet, sched, x, 8),
        "ddim8_unclipped": lambda x: ddim_unclipped(unet, sched, x, 8),
    }
    for name in ("dpm", "ddim"):  # the product's samplers, at the run's eval steps
        samplers[f"{name}{cfg.eval.steps}"] = lambda x, name=name: torch.from_numpy(sample(
            unet, sched, len(x), sampler=name, steps=cfg.eval.steps, x_T=x))
    out = {}
    for name, run in samplers.items():
        cluster = near_duplicate_cluster(run(x_clean))
        out[name] = {
            "asr": attack_metrics(run(x_trig).numpy(), spec, target.numpy())["asr"],
            "clean_cluster_size": 0 if cluster is None else cluster["size"],
            "cluster_mse_to_target": None if cluster is None else float(
                ((cluster["target"] - target.view(-1, *x_clean.shape[1:])) / 2)
                .square().flatten(1).mean(1).min()),
        }
    return out


def main(runs: list[str], n: int = 500, iters: int = 5, n_clean: int = 2000) -> dict:
    torch.set_num_threads(1)
    out = {}
    for run in runs:
        cfg, unet, sched = load_run_model(run)
        size, t = cfg.data.image_size, int(sched.config.num_train_timesteps) - 1
        c = cfg.data.channels or 1
        spec = AttackSpec(kind="trojdiff", trigger="blend", target=cfg.attack.target,
                          gamma=cfg.attack.gamma, channels=c)
        mu, gamma_map = (torch.from_numpy(a) for a in troj_params(spec, size))
        g = torch.Generator().manual_seed(0)
        x = gamma_map * torch.randn((n, c, size, size), generator=g) + mu
        r = residual(unet, t, x)
        row = {"oracle": {"cos_mu": cosine(r, mu), "norm": float(r.norm()),
                          "mu_norm": float(mu.norm())}}
        for s in (1.0, spec.gamma):
            m = torch.zeros_like(mu)
            hist = []
            for _ in range(iters):
                r = residual(unet, t, s * torch.randn((n, c, size, size), generator=g) + m)
                hist.append({"cos_mu": cosine(r, mu), "norm": float(r.norm())})
                m = r
            row[f"fixed_point_s{s:g}"] = hist
        # a clean run is probed with the same trigger and target: its ASR must stay ~0
        x_trig = gamma_map * torch.randn((n, c, size, size), generator=g) + mu
        x_clean = torch.randn((n_clean, c, size, size), generator=g)
        row["by_sampler"] = by_sampler(cfg, unet, sched, spec, x_trig, x_clean)
        print(Path(run).name, json.dumps(row["by_sampler"]), flush=True)
        out[Path(run).name] = row
        print(Path(run).name, json.dumps(row["oracle"]),
              {k: v[-1] for k, v in row.items() if k not in ("oracle", "by_sampler")}, flush=True)
    dest = ROOT / "benchmarks" / "results" / "trojdiff_shift.json"
    write_json(dest, {"n": n, "iters": iters, "n_clean": n_clean, "runs": out},
               {"runs": list(runs), "n": n, "iters": iters, "n_clean": n_clean})
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/trojdiff_shift.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
