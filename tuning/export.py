"""Study results: trials and Pareto front as Parquet, ready-to-run TOML configs, PNG plots."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd


def knee(front: list) -> object:
    """The front trial nearest the ideal point after min-max scaling each objective."""
    vals = np.array([t.values for t in front], dtype=float)
    span = np.ptp(vals, axis=0)
    span[span == 0] = 1.0
    scaled = (vals - vals.min(axis=0)) / span
    return front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def trials_frame(study, objectives: list[str]) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name,
               "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete}
        for i, o in enumerate(objectives):
            row[o] = t.values[i] if t.values else math.nan
        for k in ("fid", "energy_j", "uplink_bytes", "asr", "asr_defended", "trial_s", "run_s",
                  "wall_s", "stragglers", "run_dir", "error"):
            v = t.user_attrs.get(k)
            row[k] = (math.nan if k not in ("run_dir", "error") else "") if v is None else v
        row["reference"] = bool(t.user_attrs.get("reference", False))
        row["retry_of"] = t.user_attrs.get("retry_of", -1)
        row["feasible"] = all(c <= 0 for c in t.constraints.values())
        for k, v in t.params.items():
            row[f"param.{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in [c for c in df.columns if c.startswith("param.")]:
        if df[c].map(type).nunique() > 1:   # mixed types (e.g. bool/int): keep as text
            df[c] = df[c].astype(str)
    return df


def runnable_config(text: str, name: str) -> str:
    """The trial's resolved config, writing its run to ``runs/<name>`` when re-run."""
    from ssdiff_ray import config as config_mod

    raw = tomllib.loads(text)
    raw["out_dir"], raw["name"] = "runs", name
    return config_mod.to_toml(config_mod.from_dict(raw))


def export(study, setup) -> dict:
    """Write the results under ``setup.out``; returns paths and the best/front summary."""
    objectives = setup.opts.objectives
    out = setup.out
    df = trials_frame(study, objectives)
    df.to_parquet(out / "trials.parquet")
    try:
        front = study.best_trials if len(objectives) > 1 else [study.best_trial]
    except ValueError:  # no complete (feasible) trial
        front = []
    front = sorted(front, key=lambda t: t.values)
    cfg_dir = out / "configs"
    cfg_dir.mkdir(exist_ok=True)
    configs = []
    for t in front:
        text = t.user_attrs.get("config")
        if text:
            p = cfg_dir / f"trial_{t.number:04d}.toml"
            p.write_text(runnable_config(text, f"{setup.opts.study}-trial-{t.number:04d}"))
            configs.append(str(p))
    pareto = df[df["number"].isin([t.number for t in front])]
    pareto.to_parquet(out / "pareto.parquet")
    result = {"trials": int(len(df)), "complete": int((df["state"] == "COMPLETE").sum()) if len(df) else 0,
              "pruned": int((df["state"] == "PRUNED").sum()) if len(df) else 0,
              "failed": int((df["state"] == "FAIL").sum()) if len(df) else 0,
              "front": [{"number": t.number, **dict(zip(objectives, t.values)), "params": t.params}
                        for t in front],
              "configs": configs, "trials_parquet": str(out / "trials.parquet"),
              "pareto_parquet": str(out / "pareto.parquet")}
    if front:
        best = knee(front) if len(objectives) > 1 else front[0]
        text = best.user_attrs.get("config")
        if text:
            (out / "best.toml").write_text(runnable_config(text, f"{setup.opts.study}-best"))
            result["best"] = {"number": best.number, **dict(zip(objectives, best.values)),
                              "config": str(out / "best.toml")}
    result["plots"] = plots(study, df, objectives, front, out)
    return result


def plots(study, df: pd.DataFrame, objectives: list[str], front: list, out: Path) -> list[str]:
    """Pareto front (first two objectives) and parameter importances, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = df[df["state"] == "COMPLETE"] if len(df) else df
    if len(objectives) >= 2 and len(done):
        x, y = objectives[0], objectives[1]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(done[x], done[y], c="0.7", label="trials")
        nums = {t.number for t in front}
        f = done[done["number"].isin(nums)].sort_values(x)
        ax.plot(f[x], f[y], "o-", c="tab:red", label="Pareto front")
        pol = "param.quant.policy"
        for _, r in f.iterrows():
            label = f"#{r['number']}" + (f" {r[pol]}" if pol in f and isinstance(r[pol], str) else "")
            ax.annotate(label, (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = done[done["reference"]]
        if len(ref):
            ax.scatter(ref[x], ref[y], marker="*", s=160, c="tab:blue", label="reference", zorder=3)
        ax.set_xlabel(x + (" (J)" if x == "energy" else ""))
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
        ax.set_title(f"study {study.study_name}: {len(done)} complete trials")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "pareto.png"))
    imps = {}
    if len(done) >= 3:
        import optuna

        for i, o in enumerate(objectives):
            try:
                imps[o] = optuna.importance.get_param_importances(
                    study, target=(lambda t, i=i: t.values[i]) if len(objectives) > 1 else None)
            except (ValueError, RuntimeError):  # too few trials or a constant objective
                continue
    if imps:
        fig, axes = plt.subplots(1, len(imps), figsize=(5 * len(imps), 4), squeeze=False)
        for ax, (o, imp) in zip(axes[0], imps.items()):
            names = list(imp)[::-1]
            ax.barh(names, [imp[n] for n in names])
            ax.set_title(f"importance for {o}")
            ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "importances.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "importances.png"))
        pd.DataFrame(imps).to_parquet(out / "importances.parquet")
    return written
