"""The defense of one run, computed once and kept in ``RUN/defense/``.

Estimating the trigger and calibrating the output check take minutes; ``ssdiff sample``,
``ssdiff audit`` and ``ssdiff serve`` all load them from here. The cache holds the trigger
estimate (``estimate.npz``), the target check's target image and null scores
(``check.npz``) and the audit verdict (``audit.json``), with a key (``key.json``): the
model file's digest and the defense settings. A model or settings change makes the key
differ and the defense is computed again; so does ``refresh``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ssdiff_ray.defense.defense import Defense
from ssdiff_ray.defense.estimate import TriggerEstimate

VERSION = 2  # 2: the probe searches under several samplers


def model_digest(model_dir: str | Path) -> str:
    """sha256 of the pipeline's UNet weights (any weights file under ``unet/``)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir, "unet").glob("*.safetensors")) or sorted(
        Path(model_dir, "unet").glob("*.bin"))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(run_dir: str | Path, defense: Defense) -> dict:
    """What the cached state depends on: the weights and every setting of the chain."""
    return {"version": VERSION, "model": model_digest(Path(run_dir) / "model"),
            "estimator": defense.estimator.name, "options": repr(defense.estimator.options),
            "estimate": defense.use_estimate, "target_check": defense.use_target_check,
            "steps": defense.steps, "seed": defense.seed, "shape": list(defense.shape)}


def _plain(v):
    """JSON-safe copy of the estimator's statistics (numpy scalars and arrays included)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "tolist"):  # a torch tensor
        return v.tolist()
    return v


def save(run_dir: str | Path, defense: Defense, audit: dict) -> Path:
    """Write the prepared ``defense`` and its ``audit`` under ``RUN/defense/``."""
    out = Path(run_dir) / "defense"
    out.mkdir(exist_ok=True)
    est = defense.est
    if est is not None:
        np.savez(out / "estimate.npz", tau=est.tau, mu=est.mu)
        (out / "estimate.json").write_text(json.dumps(_plain({
            "gamma": est.gamma, "shift_norm": est.shift_norm, "response": est.response,
            "stats": est.stats}), indent=1))
    if defense.check is not None:
        np.savez(out / "check.npz", target=defense.check.target.numpy(),
                 null=defense.check.null, spread=defense.check.spread)
    (out / "audit.json").write_text(json.dumps(_plain(audit), indent=2))
    # the key last: a directory without it (an interrupted save) is never trusted
    (out / "key.json").write_text(json.dumps(cache_key(run_dir, defense), indent=1))
    return out


def load(run_dir: str | Path, defense: Defense) -> dict | None:
    """Fill ``defense`` from the cache and return the audit (judged by the current rule), or
    None when the cache is missing or was made for other weights or settings."""
    import torch

    from ssdiff_ray.defense.input_tests import TargetCheck, standard_tests

    d = Path(run_dir) / "defense"
    try:
        key = json.loads((d / "key.json").read_text())
    except (OSError, ValueError):
        return None
    if key != cache_key(run_dir, defense):
        return None
    est = None
    if (d / "estimate.npz").is_file():
        arrays, meta = np.load(d / "estimate.npz"), json.loads((d / "estimate.json").read_text())
        est = TriggerEstimate(tau=arrays["tau"], mu=arrays["mu"], gamma=meta["gamma"],
                              shift_norm=meta["shift_norm"], response=meta["response"],
                              stats=meta["stats"])
    check = None
    if (d / "check.npz").is_file():
        c = np.load(d / "check.npz")
        check = TargetCheck.from_state(defense.unet, defense.scheduler, torch.from_numpy(c["target"]),
                                       c["null"], float(c["spread"]), steps=defense.steps,
                                       seed=defense.seed,
                                       sampler=est.stats.get("sampler", "ddim") if est else "ddim")
    defense.est, defense.check = est, check
    defense.tests = standard_tests(defense.shape, est, check)
    defense._ready = True
    return rejudge(json.loads((d / "audit.json").read_text()))


def rejudge(audit: dict) -> dict | None:
    """The cached audit's statistics under the current ``AuditRule``: a recalibrated rule
    applies to models audited before it (the statistics do not depend on the rule)."""
    from ssdiff_ray.defense.audit import AuditRule

    rule = AuditRule.load()
    if rule.statistic not in audit:  # saved before the statistic existed: recompute
        return None
    return {**audit, "verdict": rule.verdict(audit), "rule": str(rule)}


def cached_defense(run_dir: str | Path, defense: Defense, refresh: bool = False,
                   log=None) -> tuple[Defense, dict]:
    """(the prepared ``defense``, its audit): from ``RUN/defense/`` when it was made for
    these weights and settings, else computed now (trigger estimate, target check, audit)
    and saved there. ``refresh`` always recomputes."""
    audit = None if refresh else load(run_dir, defense)
    if audit is None:
        if log:
            log(f"estimating the trigger of {run_dir} (once; saved in {Path(run_dir) / 'defense'})")
        defense.prepare()
        audit = defense.audit()
        save(run_dir, defense, audit)
    return defense, audit
