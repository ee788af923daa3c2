"""The study's report: ``report.md`` (confirmed front with intervals, the verdict against the
reference, the seed noise), ``pareto_confirmed.png`` (means with 95% interval bars) and
``best_confirmed.toml``, the configuration to deploy, ready for ``ssdiff run --config``."""

from __future__ import annotations

import math
from pathlib import Path

from tuning.confirm import best_confirmed
from tuning.export import runnable_config

UNITS = {"energy": "J", "bytes": "B"}


def _fmt(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _cell(o: dict) -> str:
    if not o["values"]:
        return "-"
    if not math.isfinite(o["low"]):
        return f"{_fmt(o['mean'])} (n={len(o['values'])})"
    return f"{_fmt(o['mean'])} [{_fmt(o['low'])}, {_fmt(o['high'])}]"


def _diff(o: dict) -> str:
    if "diff" not in o or not math.isfinite(o["diff"]):
        return ""
    if not math.isfinite(o["diff_low"]):
        return f" (diff {_fmt(o['diff'])})"
    return f" (diff {_fmt(o['diff'])} [{_fmt(o['diff_low'])}, {_fmt(o['diff_high'])}])"


def write_report(study, summary: dict, setup, out: Path) -> dict:
    """Write report.md, the plot and the best confirmed config; returns their paths."""
    objectives, n = setup.opts.objectives, setup.opts.confirm_seeds
    best = best_confirmed(summary, objectives)
    lines = [f"# Study {setup.opts.study}", "",
             f"Objectives (all minimised): {', '.join(objectives)}. Every member of the front "
             f"and the reference were run again on {n} fresh seeds (base seed + "
             f"1000, 2000, ...): the figures below are the mean and 95% t-interval over those "
             "seeds, not the search's own (selected, so optimistic) values.", "",
             "| trial | " + " | ".join(f"{o} ({UNITS[o]})" if o in UNITS else o for o in objectives)
             + " | verdict vs reference | search values |",
             "|---" * (len(objectives) + 3) + "|"]
    for r in summary["members"]:
        cells = [_cell(r["objectives"][o]) + _diff(r["objectives"][o]) for o in objectives]
        v = "reference" if r["reference"] else r.get("verdict", "-")
        if "per_objective" in r:
            v += " (" + ", ".join(f"{o} {w}" for o, w in r["per_objective"].items()) + ")"
        search = ", ".join(f"{o} {_fmt(x)}" for o, x in r["search"].items())
        lines.append(f"| #{r['number']} | " + " | ".join(cells) + f" | {v} | {search} |")
    lines += ["", "A verdict compares the paired differences (member - reference, same seeds): "
              "`better` or `worse` where their 95% interval excludes 0, `tie` where it does "
              "not; `dominates` = better on one objective and worse on none.", "",
              "## Noise", "", "| objective | seed SD | spread between trials | spread / noise |",
              "|---|---|---|---|"]
    for o, z in summary["noise"].items():
        lines.append(f"| {o} | {_fmt(z['seed_sd'])} | {_fmt(z['trial_spread'])} | "
                     f"{_fmt(z['spread_over_noise'])} |")
    lines += ["", "Where the spread between trials is not well above the seed noise, the "
              "search could not tell its trials apart on that objective.", ""]
    files = {"report": str(out / "report.md")}
    if best is not None:
        trial = study.trials[best["number"]]
        text = trial.user_attrs.get("config")
        if text:
            p = out / "best_confirmed.toml"
            p.write_text(runnable_config(text, f"{setup.opts.study}-best-confirmed"))
            files["best_confirmed"] = str(p)
            lines += ["## To deploy", "", f"Trial #{best['number']} "
                      f"({', '.join(f'{k} = {v!r}' for k, v in best['params'].items())}): "
                      f"`ssdiff run --config {p.name}`.", ""]
    else:
        lines += ["## To deploy", "", "No member beats the reference beyond noise on a "
                  "confirmed objective without losing on another: keep the reference.", ""]
    (out / "report.md").write_text("\n".join(lines))
    if len(objectives) >= 2:
        files["plot"] = _plot(summary, objectives, out / "pareto_confirmed.png")
    return files


def _plot(summary: dict, objectives: list[str], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[:2]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in summary["members"]:
        ox, oy = r["objectives"][x], r["objectives"][y]
        if not ox["values"]:
            continue
        err = [[max(0.0, o["mean"] - o["low"]) if math.isfinite(o["low"]) else 0.0 for o in (ox, oy)],
               [max(0.0, o["high"] - o["mean"]) if math.isfinite(o["high"]) else 0.0 for o in (ox, oy)]]
        ax.errorbar(ox["mean"], oy["mean"], xerr=[[err[0][0]], [err[1][0]]],
                    yerr=[[err[0][1]], [err[1][1]]], fmt="*" if r["reference"] else "o",
                    ms=12 if r["reference"] else 6, capsize=3,
                    c="tab:blue" if r["reference"] else "tab:red")
        ax.annotate(f"#{r['number']}" + (" ref" if r["reference"] else ""),
                    (ox["mean"], oy["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x + (f" ({UNITS[x]})" if x in UNITS else ""))
    ax.set_ylabel(y + (f" ({UNITS[y]})" if y in UNITS else ""))
    ax.set_title("confirmed on fresh seeds: mean and 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
