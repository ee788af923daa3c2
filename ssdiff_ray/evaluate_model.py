"""``ssdiff evaluate MODEL --like RUN``: score any saved diffusers model (a centralized,
pretrained, cleansed or downloaded one) in a run's quality space, with the run's sampler and
the noise seed of the run's final evaluation, so its figures compare with the run's own."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ssdiff_ray import config as config_mod
from ssdiff_ray.errors import UserError

# the figures a run's final evaluation gives, in the order they are printed
FIGURES = ("fid", "fid_floor", "kid", "precision", "recall", "bad_sample_share", "confidence",
           "class_accuracy", "classes_present")


def evaluate_model(model: str | Path, like: str | Path, out: str | Path | None = None,
                   seed: int | None = None) -> dict:
    """Sample ``model`` as run ``like``'s final evaluation does (``eval.samples``, sampler,
    steps, guidance, seed ``seed + 10000 + rounds`` unless ``seed``) and score it in that run's
    space. Writes ``out`` (default ``RUN/evaluations/<model>.json``, never overwritten) and
    the sample grid beside it; returns {"model": .., "run": the run's own figures, ...}."""
    from diffusers import DDPMScheduler

    from ssdiff_ray.evaluation import Evaluator
    from ssdiff_ray.images import save_grid
    from ssdiff_ray.model.pretrained import PretrainedError, check_fit, describe, load_unet
    from ssdiff_ray.model.unet import build_scheduler

    like = Path(like)
    if not (like / "config.toml").is_file():
        raise UserError(f"--like {like}: not a run directory (no config.toml)")
    cfg = config_mod.load(like / "config.toml")
    out = _out_path(like, Path(model), out)
    try:
        info = describe(str(model))
        check_fit(info, cfg.data.image_size, cfg.data.channels, cfg.model.conditional,
                  cfg.data.num_classes)
    except PretrainedError as e:
        raise UserError(str(e).replace("model.pretrained = ", "MODEL ", 1)) from None
    unet = load_unet(str(model)).eval()
    scheduler = (DDPMScheduler.from_config(info.scheduler) if info.scheduler
                 else build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule))
    evaluator = Evaluator(cfg)
    seed = cfg.seed + 10_000 + cfg.rounds if seed is None else seed
    metrics, grid = evaluator.evaluate(unet, scheduler, seed, with_attack=False)
    metrics["fid_floor"] = evaluator.fid_floor()
    result = {"model": str(model), "like": str(like), "seed": seed,
              "sampler": f"{cfg.eval.sampler} {cfg.eval.steps} steps", "n": metrics["n"],
              "feature_space": metrics["feature_space"],
              **{k: metrics[k] for k in FIGURES if k in metrics},
              "run": _run_figures(like), "grid": str(out.with_suffix(".png"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2, default=float))
    result["out"] = str(out)
    return result


def _out_path(like: Path, model: Path, out) -> Path:
    if out is not None:
        out = Path(out)
        if out.exists():
            raise UserError(f"--out {out}: exists (nothing is overwritten)")
        if out.suffix != ".json":
            raise UserError(f"--out {out}: name a .json file (the grid goes beside it)")
        return out
    base = like / "evaluations" / (model.resolve().name or "model")
    path, k = base.with_suffix(".json"), 2
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}.json"), k + 1
    return path


def _run_figures(like: Path) -> dict:
    """The run's own final figures (its summary.json), for the side-by-side table."""
    try:
        s = json.loads((like / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: s[k] for k in FIGURES if isinstance(s.get(k), (int, float))}


def table(result: dict) -> str:
    """The figures of the model beside those of the run, one row each."""
    run = result.get("run", {})
    rows = [(k, result[k], run.get(k, math.nan)) for k in FIGURES if k in result]
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  {'':<{width}}  {'model':>10}  {'run':>10}"]
    lines += [f"  {k:<{width}}  {_fmt(v):>10}  {_fmt(r):>10}" for k, v, r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
