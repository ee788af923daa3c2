"""Why the audit misses TrojDiff: its distribution shift at t = T exists but is not found.

For each saved run, the mean residual R = E[x - eps_theta(x, T)] (zero for a clean model,
whose prediction at T is its input) is measured on:

* the true TrojDiff trigger distribution x ~ N(mu, gamma^2 I) (oracle: the shift Elijah's
  inversion would look for);
* a fixed-point search from clean-looking starts, x ~ N(m, s^2 I) with m <- R, s in
  {1, 0.6} (what a model-only estimator can do without knowing mu).

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

from ssdiff_ray.attacks import AttackSpec, troj_params  # noqa: E402
from ssdiff_ray.serve import load_run_model  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-12))


@torch.no_grad()
def residual(unet, t: int, x: torch.Tensor) -> torch.Tensor:
    return (x - unet(x, torch.full((len(x),), t)).sample).mean(0)


def main(runs: list[str], n: int = 500, iters: int = 5) -> dict:
    torch.set_num_threads(1)
    out = {}
    for run in runs:
        cfg, unet, sched = load_run_model(run)
        size, t = cfg.data.image_size, int(sched.config.num_train_timesteps) - 1
        spec = AttackSpec(kind="trojdiff", trigger="blend", gamma=cfg.attack.gamma)
        mu, gamma_map = (torch.from_numpy(a) for a in troj_params(spec, size))
        g = torch.Generator().manual_seed(0)
        x = gamma_map * torch.randn((n, 1, size, size), generator=g) + mu
        r = residual(unet, t, x)
        row = {"oracle": {"cos_mu": cosine(r, mu), "norm": float(r.norm()),
                          "mu_norm": float(mu.norm())}}
        for s in (1.0, spec.gamma):
            m = torch.zeros_like(mu)
            hist = []
            for _ in range(iters):
                r = residual(unet, t, s * torch.randn((n, 1, size, size), generator=g) + m)
                hist.append({"cos_mu": cosine(r, mu), "norm": float(r.norm())})
                m = r
            row[f"fixed_point_s{s:g}"] = hist
        out[Path(run).name] = row
        print(Path(run).name, json.dumps(row["oracle"]),
              {k: v[-1] for k, v in row.items() if k != "oracle"}, flush=True)
    dest = ROOT / "benchmarks" / "results" / "trojdiff_shift.json"
    dest.write_text(json.dumps({"command": "python benchmarks/trojdiff_shift.py " + " ".join(runs),
                                "n": n, "iters": iters, "runs": out}, indent=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/trojdiff_shift.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
