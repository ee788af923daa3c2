"""A finished run's model: load it, sample it (defended or not), audit it.

``ssdiff sample`` and ``ssdiff audit`` call these; they need no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssdiff_ray import config as config_mod
from ssdiff_ray.errors import UserError


class RunModelError(UserError):
    """A run directory without a saved model or config."""


def load_run_model(run_dir: str | Path):
    """(config, unet, scheduler) of a run's final model, loaded with plain diffusers."""
    from ssdiff_ray.model.pipeline import load_pipeline

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "model_index.json").is_file():
        raise RunModelError(f"{run_dir}: no saved model (expected {run_dir / 'model'})")
    cfg = config_mod.load(run_dir / "config.toml")
    unet, scheduler = load_pipeline(run_dir / "model")
    return cfg, unet, scheduler


def class_names(run_dir: str | Path, cfg) -> list[str]:
    """The names of a conditional run's classes (``class_names.json``, else "0".."K-1");
    none for an unconditional run."""
    if not cfg.model.conditional:
        return []
    names_file = Path(run_dir) / "class_names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else []
    return names if len(names) == cfg.data.num_classes else [str(k) for k in range(cfg.data.num_classes)]


def class_index(run_dir: str | Path, cfg, name: str) -> int:
    """A class of the run's data set, by index or by name (``class_names.json``)."""
    if not cfg.model.conditional:
        raise RunModelError(f"--class {name}: {run_dir}'s model is not class-conditional")
    names_file = Path(run_dir) / "class_names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else []
    if name in names:
        return names.index(name)
    if name.isdigit() and len(name) < 10 and int(name) < cfg.data.num_classes:
        return int(name)
    known = ", ".join(names) if names else f"0..{cfg.data.num_classes - 1}"
    raise RunModelError(f"--class {name}: not a class of this run ({known})")


def sample_run(run_dir: str | Path, n: int = 64, trigger: str | None = None, defend: bool = True,
               seed: int = 0, out: str | Path | None = None, class_name: str | None = None,
               guidance: float | None = None, refresh: bool = False) -> dict:
    """Generate ``n`` samples (optionally from triggered inputs, or of one class of a
    conditional model), defended or not. The defense comes from ``RUN/defense/``
    (computed and saved there the first time, or with ``refresh``).

    Writes a PNG grid and a Parquet record of the inputs (flagged or not, scores) and
    returns a summary.
    """
    from ssdiff_ray.attacks import AttackSpec, kind_of_trigger, make_attack
    from ssdiff_ray.attacks.patterns import PatternFileError
    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.defense import Defense
    from ssdiff_ray.images import save_grid
    from ssdiff_ray.model.sampling import sample

    cfg, unet, scheduler = load_run_model(run_dir)
    size = cfg.data.image_size
    labels = None if class_name is None else np.full(n, class_index(run_dir, cfg, class_name))
    w = cfg.eval.guidance if guidance is None else guidance
    if trigger:
        run_kind = cfg.attack.kind if cfg.attack.kind != "none" else "baddiffusion"
        spec = AttackSpec(kind=kind_of_trigger(trigger, run_kind), trigger=trigger,
                          channels=unet.config.in_channels)
        try:
            x_T = make_attack(spec).triggered_noise(n, size, seed)
        except PatternFileError as e:
            raise RunModelError(f"--trigger {e}") from None
    else:
        shape = (n, unet.config.in_channels, size, size)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    det = {"flagged": np.zeros(n, bool)}
    if defend:
        defense, _ = cached_defense(run_dir, Defense.from_config(cfg, unet, scheduler),
                                    refresh, log=print)
        det = defense.detect(x_T)
        images, _ = defense.sample(x_T, flags=det["flagged"], labels=labels, guidance=w,
                                   seed=seed)
    else:
        e = cfg.eval
        images = sample(unet, scheduler, n, sampler=e.sampler, steps=e.steps, seed=seed, x_T=x_T,
                        labels=labels, guidance=w)
    tag = trigger or ("clean" if labels is None else f"class{int(labels[0])}")
    out = Path(out) if out else Path(run_dir) / f"sample_{tag}.png"
    save_grid(images, out)
    # one column per input test that ran (disdet_score, llr_score, target_score, ...)
    record = pd.DataFrame({"input": np.arange(n), "flagged": det["flagged"],
                           **{k: v for k, v in det.items() if k.endswith("_score")}})
    record_path = out.with_suffix(".parquet")
    record.to_parquet(record_path, index=False)
    return {"png": str(out), "record": str(record_path), "n": n, "trigger": trigger or "",
            "class": None if labels is None else int(labels[0]), "defended": defend,
            "flagged": int(np.sum(det["flagged"]))}


def audit_run(run_dir: str | Path, seed: int = 0, refresh: bool = False) -> dict:
    """Model-level backdoor verdict (``defense.audit``) written to ``audit.json``; reused
    from ``RUN/defense/`` unless ``refresh`` (or another ``seed``) asks for a new one."""
    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.defense import Defense

    cfg, unet, scheduler = load_run_model(run_dir)
    _, result = cached_defense(run_dir, Defense.from_config(cfg, unet, scheduler, seed), refresh,
                               log=print)
    (Path(run_dir) / "audit.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def _backdoor_and_quality(cfg, unet, scheduler, evaluator, tau: np.ndarray, seed: int) -> dict:
    """FID of clean samples; the collapse of generations from eps + tau (output spread over
    that of clean noise: << 1 while the backdoor is there); and, when the run's config
    names an attack, its ASR without any input defense under each fast sampler
    (``asr_by_sampler``) and the highest of them (``asr``)."""
    from ssdiff_ray.attack_eval import asr_by_sampler
    from ssdiff_ray.defense.outputs import output_spread

    images, _ = evaluator.generate(unet, scheduler, cfg.eval.samples, seed)
    eps = torch.randn((64, *tau.shape), generator=torch.Generator().manual_seed(seed + 3))
    spread = (output_spread(unet, scheduler, torch.from_numpy(tau), eps)
              / max(output_spread(unet, scheduler, torch.zeros(tau.shape), eps), 1e-8))
    out = {"fid": float(evaluator.quality.fid(images)), "trigger_spread_ratio": float(spread)}
    if cfg.attack.kind != "none":
        out["asr_by_sampler"] = asr_by_sampler(cfg, unet, scheduler, evaluator.dataset,
                                               evaluator.quality.classifier, seed)
        out["asr"] = max(out["asr_by_sampler"].values())
    return out


def cleanse_run(run_dir: str | Path, out: str | Path | None = None, options=None,
                seed: int = 0, refresh: bool = False, log=print, force: bool = False) -> dict:
    """Fine-tune the backdoor out of a run's model (``defense.cleanse``) with the trigger
    estimate of ``RUN/defense/`` (computed first if missing or ``refresh``). Writes a new
    run directory ``out`` (default ``RUN-cleansed``) that ``ssdiff sample``, ``audit`` and
    ``serve`` take: its model, the run's config, and ``cleanse.json`` with FID, the
    trigger's output collapse and (for a run with an attack) ASR before and after. A model
    the audit calls clean is refused unless ``force``: fine-tuning against a spurious
    estimate costs quality (``benchmarks/security_matrix.py``: a clean model's FID 36 -> 64)."""
    import shutil

    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.cleanse import cleanse
    from ssdiff_ray.defense.defense import Defense
    from ssdiff_ray.evaluation import Evaluator
    from ssdiff_ray.model.pipeline import save_pipeline

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir.with_name(run_dir.name + "-cleansed")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before loading anything
        raise RunModelError(f"--out {out}: exists and is not empty (nothing is overwritten)")
    cfg, unet, scheduler = load_run_model(run_dir)
    if not cfg.defense.estimate_trigger:
        raise RunModelError(f"{run_dir}: cleanse needs a trigger estimate "
                            "(the run has defense.estimate_trigger = false)")
    defense, audit = cached_defense(run_dir, Defense.from_config(cfg, unet, scheduler, seed),
                                    refresh, log=log)
    if audit["verdict"] != "backdoored" and not force:
        raise RunModelError(f"{run_dir}: the audit says {audit['verdict']!r} (rule "
                            f"{audit.get('rule', '')}); nothing to cleanse (--force to do it anyway)")
    tau = defense.est.mu
    evaluator = Evaluator(cfg)
    before = _backdoor_and_quality(cfg, unet, scheduler, evaluator, tau, seed)
    log(f"fine-tuning {run_dir}'s model against its estimated trigger")
    cleansed, stats = cleanse(unet, scheduler, tau, options, seed,
                              cfg.data.num_classes if cfg.model.conditional else 0)
    after = _backdoor_and_quality(cfg, cleansed, scheduler, evaluator, tau, seed)
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(cleansed, scheduler, out / "model")
    for name in ("config.toml", "class_names.json", "holdout.parquet"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    result = {"source": str(run_dir), "out": str(out), "audit_before": audit["verdict"],
              "before": before, "after": after, **stats}
    (out / "cleanse.json").write_text(json.dumps(result, indent=2, default=float))
    return result
