"""Why the trigger estimators do not descend a gradient: inversion through the sampler.

The obvious leak-free estimator is gradient descent on the trigger: minimize the spread
(per-pixel variance over noise draws) of what a short DDIM makes of eps + mu, with |mu|
fixed, from random starts. Elijah and TERD do this through one step at t = T; a backdoor
tuned to DDIM shows nothing there (``defense/estimate.py``), so here the gradient goes
through a whole 4-step clipped DDIM, started at t0 = 999, 700 or 500 (x_t0 =
(1 - sqrt(ab)) mu + sqrt(1 - ab) eps, as BadDiffusion's forward process puts the trigger).

Per model of the security matrix's cache (``benchmarks/security_matrix.py`` trains them):
the spread ratio (to mu = 0) of the true trigger, and the best spread and cosine to the
true trigger that descent reaches from ``--restarts`` random starts at the true trigger's
norm (5 for clean models). Descent that finds the trigger has cosine near 1; a best spread
below the trigger's own means the objective itself prefers other directions.

    python benchmarks/gradient_inversion.py --cache /path/to/security-matrix-cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import write_json  # noqa: E402

from ssdiff_ray.attacks.patterns import make_trigger  # noqa: E402
from ssdiff_ray.model.pipeline import load_pipeline  # noqa: E402
from ssdiff_ray.model.unet import predict_eps  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROWS = ["box", "stop_sign", "glasses", "box_half", "clean_digits_0", "clean_digits_1"]


def ddim(unet, alphas_cumprod, x, timesteps):
    """A differentiable clipped DDIM (the product's sampler runs without gradients)."""
    for i, t in enumerate(timesteps):
        ab = alphas_cumprod[t]
        ab_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        e = predict_eps(unet, x, torch.full((len(x),), int(t)))
        x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-1, 1)
        e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
    return x


def invert(run: Path, t0: int, restarts: int, iters: int, batch: int, seed: int = 0) -> dict:
    cfg = tomllib.loads((run / "config.toml").read_text())
    unet, sched = load_pipeline(run / "model")
    unet.eval().requires_grad_(False)
    shape = (unet.config.in_channels, cfg["data"]["image_size"], cfg["data"]["image_size"])
    attack = cfg.get("attack", {})
    r = (torch.from_numpy(make_trigger(attack["trigger"], shape[-1], shape[0]))
         if attack.get("kind") == "baddiffusion" else None)
    rho = float(r.norm()) if r is not None else 5.0
    ac = sched.alphas_cumprod.float()
    ts = np.linspace(t0, 0, 4).round().astype(int).tolist()
    scale_mu, scale_eps = 1 - ac[t0].sqrt(), (1 - ac[t0]).sqrt()
    gen = torch.Generator().manual_seed(seed)
    held = torch.randn((64, *shape), generator=gen)

    def spread(mu, eps):
        return ddim(unet, ac, scale_mu * mu + scale_eps * eps, ts).var(0).mean()

    with torch.no_grad():
        base = float(spread(torch.zeros(shape), held))
        true = None if r is None else float(spread(r, held)) / base
    found = []
    for _ in range(restarts):
        v = torch.randn(shape, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=0.1)
        for _ in range(iters):
            loss = spread(rho * v / v.norm(), torch.randn((batch, *shape), generator=gen)) / base
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mu = rho * v / v.norm()
            cos = None if r is None else float(mu.flatten() @ r.flatten() / rho / r.norm())
            found.append((float(spread(mu, held)) / base, cos))
    best = min(found)
    return {"model": run.name, "t0": t0, "norm": rho, "true_spread_ratio": true,
            "best_spread_ratio": best[0], "best_cosine": best[1],
            "max_abs_cosine": None if r is None else max(abs(c) for _, c in found)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "security-matrix"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--t0", default="999,700,500")
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.rows.split(","):
        for t0 in map(int, args.t0.split(",")):
            t = time.perf_counter()
            rows.append({**invert(Path(args.cache) / name, t0, args.restarts, args.iters,
                                  args.batch), "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| model | t0 | spread ratio of the true trigger | best found | its cosine | max abs cosine |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['t0']} | {f(r['true_spread_ratio'])} | {f(r['best_spread_ratio'])} "
              f"| {f(r['best_cosine'])} | {f(r['max_abs_cosine'])} |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "gradient_inversion.json", rows)
    (RESULTS / "gradient_inversion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
