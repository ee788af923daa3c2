"""Sampling from a finished run with the detection defense, and the model-level audit.

``ssdiff sample`` and ``ssdiff audit`` call these; they need no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssdiff_ray import config as config_mod


class RunModelError(ValueError):
    """A run directory without a saved model or config."""


def load_run_model(run_dir: str | Path):
    """(config, unet, scheduler) of a run's final model, loaded with plain diffusers."""
    from diffusers import DDPMPipeline

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "model_index.json").is_file():
        raise RunModelError(f"{run_dir}: no saved model (expected {run_dir / 'model'})")
    cfg = config_mod.load(run_dir / "config.toml")
    pipe = DDPMPipeline.from_pretrained(str(run_dir / "model"))
    return cfg, pipe.unet.eval(), pipe.scheduler


def sample_run(run_dir: str | Path, n: int = 64, trigger: str | None = None, defend: bool = True,
               seed: int = 0, out: str | Path | None = None) -> dict:
    """Generate ``n`` samples (optionally from triggered inputs), defended or not.

    Writes a PNG grid and a Parquet record of the inputs (flagged or not, scores) and
    returns a summary.
    """
    from ssdiff_ray import defense
    from ssdiff_ray.attacks import AttackSpec, triggered_noise
    from ssdiff_ray.images import save_grid
    from ssdiff_ray.model import sample
    from ssdiff_ray.security import estimate_trigger

    cfg, unet, scheduler = load_run_model(run_dir)
    size = cfg.data.image_size
    if trigger:
        kind = "trojdiff" if trigger in ("blend", "patch") else "baddiffusion"
        x_T = triggered_noise(AttackSpec(kind=kind, trigger=trigger), n, size, seed)
    else:
        x_T = torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    e = cfg.eval
    est = None
    if defend:
        if cfg.defense.estimate_trigger:
            est = estimate_trigger(cfg, unet, scheduler, seed)
        check = (defense.TargetCheck(unet, scheduler, est, seed=seed, steps=e.steps)
                 if est is not None and cfg.defense.target_check else None)
        det = defense.detect_inputs(x_T, est, cfg.defense.fpr, check)
        images, flags = defense.defended_sample(unet, scheduler, x_T, est, e.sampler, e.steps,
                                                seed, cfg.defense.fpr, check,
                                                flags=det["flagged"])
    else:
        det = {"flagged": np.zeros(n, bool), "llr_score": np.full(n, np.nan),
               "disdet_score": np.full(n, np.nan)}
        images = sample(unet, scheduler, n, sampler=e.sampler, steps=e.steps, seed=seed, x_T=x_T)
        flags = det["flagged"]
    out = Path(out) if out else Path(run_dir) / f"sample_{trigger or 'clean'}.png"
    save_grid(images, out)
    record = pd.DataFrame({"input": np.arange(n), "flagged": flags,
                           "llr_score": det["llr_score"], "disdet_score": det["disdet_score"],
                           "target_score": det.get("ufid_score", np.full(n, np.nan))})
    record_path = out.with_suffix(".parquet")
    record.to_parquet(record_path, index=False)
    return {"png": str(out), "record": str(record_path), "n": n, "trigger": trigger or "",
            "defended": defend, "flagged": int(np.sum(flags))}


def audit_run(run_dir: str | Path, seed: int = 0) -> dict:
    """Model-level backdoor verdict (``defense.audit_model``) written to ``audit.json``."""
    from ssdiff_ray import defense
    from ssdiff_ray.security import estimate_trigger

    cfg, unet, scheduler = load_run_model(run_dir)
    result = defense.audit_model(unet, scheduler, cfg.data.image_size, seed,
                                 est=estimate_trigger(cfg, unet, scheduler, seed))
    # keep the statistics (numbers, short arrays); the estimate itself is too big to print
    clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()
             if isinstance(v, (str, bool, int, float, np.number))
             or (isinstance(v, np.ndarray) and v.size < 64)}
    (Path(run_dir) / "audit.json").write_text(json.dumps(clean, indent=2, default=float))
    return clean
