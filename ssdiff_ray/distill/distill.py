"""``ssdiff distill``: K labelled images per class from a trained class-conditional run.

Per class: generate K x pool candidates (never from noise the defense flags), embed them
in the model's own feature space, keep K with the selection method. Classes are
independent, so ``map_fn`` may run them in parallel (Ray tasks: ``driver/distill.py``).
Candidates are kept in ``RUN/distill/candidates/`` under a key of everything they depend
on, so another selection method over the same pool does not sample again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ssdiff_ray.distill import DistillError, make_selection


@dataclass(frozen=True)
class DistillSpec:
    ipc: int = 10                     # images per class
    selection: str = "prototypes"     # a SELECTIONS name
    pool: int = 0                     # candidates per kept image; 0 = the method's default
    classes: tuple[int, ...] = ()     # () = every class
    defend: bool = True               # no generation from noise the defense flags
    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 2.0
    seed: int = 0
    triggered_share: float = 0.0      # red team: share of the noise that carries the run's trigger

    def pool_factor(self) -> int:
        return self.pool or make_selection(self.selection).pool_factor


def check_request(run_dir: str | Path, spec: DistillSpec, class_names: list[str]) -> None:
    """One error naming what is wrong, before any model is loaded or generation started."""
    if not class_names:
        raise DistillError(f"{run_dir}: the model is not class-conditional; distill needs one "
                           "(train with --set model.conditional=true)")
    if spec.ipc <= 0:
        raise DistillError(f"--ipc {spec.ipc}: must be a positive number of images per class")
    make_selection(spec.selection)
    bad = [c for c in spec.classes if not 0 <= c < len(class_names)]
    if bad:
        raise DistillError(f"--classes: class {bad[0]} does not exist "
                           f"(the run has {len(class_names)}: {', '.join(class_names)})")
    if not 0.0 <= spec.triggered_share <= 1.0:
        raise DistillError(f"--triggered-share {spec.triggered_share}: must lie in [0, 1]")


def parse_classes(text: str, class_names: list[str]) -> tuple[int, ...]:
    """'3,7' or names from class_names.json -> indices; unknown ones raise DistillError."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in class_names:
            out.append(class_names.index(part))
        elif part.isdigit() and int(part) < len(class_names):
            out.append(int(part))
        else:
            raise DistillError(f"--classes: {part!r} is not a class of this run "
                               f"({', '.join(class_names) or 'none: unconditional'})")
    return tuple(out)


def _triggered(cfg, n: int, size: int, seed: int) -> torch.Tensor:
    from ssdiff_ray.attacks import attack_spec, make_attack

    spec = attack_spec(cfg)
    if spec is None:
        raise DistillError("--triggered-share: the run has no attack whose trigger to use")
    return make_attack(spec).triggered_noise(n, size, seed)


def distill_class(run_dir: str, label: int, spec: DistillSpec) -> dict:
    """One class's kept images and what it took (a Ray task's body: loads the model; the
    defense must already be cached in ``RUN/defense/``)."""
    from ssdiff_ray.distill.features import model_features
    from ssdiff_ray.distill.generate import generate_class
    from ssdiff_ray.inference import load_run_model

    t0 = time.perf_counter()
    cfg, unet, scheduler = load_run_model(run_dir)
    n = spec.ipc * spec.pool_factor()
    seed = spec.seed * 100_003 + label
    cache = _candidates_path(run_dir, spec, label, n)
    if cache.is_file():
        with np.load(cache) as z:
            images, flagged, n_trig = z["images"], int(z["flagged"]), int(z["triggered"])
    else:
        defense = _defense(run_dir, cfg, unet, scheduler) if spec.defend else None
        gen = torch.Generator().manual_seed(seed)
        size = cfg.data.image_size
        x_T = torch.randn((n, unet.config.in_channels, size, size), generator=gen)
        n_trig = int(round(spec.triggered_share * n))
        if n_trig:
            rows = torch.randperm(n, generator=gen)[:n_trig]
            x_T[rows] = _triggered(cfg, n_trig, size, seed)
        images, flagged = generate_class(unet, scheduler, label, n, sampler=spec.sampler,
                                         steps=spec.steps, guidance=spec.guidance, seed=seed,
                                         defense=defense, x_T=x_T)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, images=images, flagged=flagged, triggered=n_trig)
        tmp.replace(cache)  # whole files only, also when two tasks race
    feats = model_features(unet, scheduler, images, np.full(n, label), seed=seed)
    keep = make_selection(spec.selection).select(feats, spec.ipc, np.random.default_rng(seed))
    return {"label": label, "images": images[keep], "generated": n, "flagged": flagged,
            "triggered": n_trig, "seconds": time.perf_counter() - t0}


def _candidates_path(run_dir, spec: DistillSpec, label: int, n: int) -> Path:
    """Where a class's candidates are kept: a digest of the weights and of every setting
    the generations depend on (not the selection method)."""
    from ssdiff_ray.defense.cache import model_digest

    what = {**asdict(spec), "label": label, "n": n, "model": model_digest(Path(run_dir) / "model")}
    for k in ("ipc", "selection", "pool", "classes"):
        what.pop(k)
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
    return Path(run_dir) / "distill" / "candidates" / f"{key}.npz"


def _defense(run_dir, cfg, unet, scheduler, log=None):
    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.defense import Defense

    return cached_defense(run_dir, Defense.from_config(cfg, unet, scheduler), log=log)[0]


def distill(run_dir: str | Path, spec: DistillSpec, out_dir: str | Path | None = None,
            map_fn=map, log=None) -> dict:
    """Distill ``run_dir`` into ``out_dir`` (default ``RUN/distill/<selection>-ipc<K>``);
    returns the manifest. ``map_fn(fn, labels)`` runs the classes (default: one by one)."""
    from ssdiff_ray import config as config_mod
    from ssdiff_ray.distill.distilled_set import write_set
    from ssdiff_ray.inference import class_names, load_run_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise DistillError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = config_mod.load(run_dir / "config.toml")
    names = class_names(run_dir, cfg)
    check_request(run_dir, spec, names)
    if spec.triggered_share:
        _triggered(cfg, 1, cfg.data.image_size, 0)  # no attack in the run: fail now
    t0 = time.perf_counter()
    if spec.defend:  # estimated once here, before the classes run in parallel
        _cfg, unet, scheduler = load_run_model(run_dir)
        _defense(run_dir, cfg, unet, scheduler, log)
    labels = spec.classes or tuple(range(len(names)))
    parts = list(map_fn(functools.partial(distill_class, str(run_dir), spec=spec), labels))
    images = np.concatenate([p["images"] for p in parts])
    kept = np.concatenate([np.full(len(p["images"]), p["label"]) for p in parts])
    out = Path(out_dir) if out_dir else run_dir / "distill" / f"{spec.selection}-ipc{spec.ipc}"
    from ssdiff_ray.defense.cache import model_digest

    manifest = {"source_run": str(run_dir.resolve()), "model_sha256": model_digest(
        run_dir / "model"), "class_names": names, "image_size": cfg.data.image_size,
        "channels": cfg.data.channels, **asdict(spec), "pool_factor": spec.pool_factor(),
        "generated": sum(p["generated"] for p in parts),
        "flagged": sum(p["flagged"] for p in parts),
        "triggered": sum(p["triggered"] for p in parts),
        "seconds": time.perf_counter() - t0}
    manifest = write_set(out, images, kept, manifest)
    manifest["out"] = str(out)
    return manifest
