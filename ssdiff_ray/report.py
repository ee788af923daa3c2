"""Plots and summaries of finished runs: ``ssdiff report`` and ``ssdiff compare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ssdiff_ray.errors import UserError


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    run_dir = Path(run_dir)
    if not (run_dir / "rounds.parquet").is_file() or not (run_dir / "clients.parquet").is_file():
        raise UserError(f"{run_dir}: not a run directory (no rounds.parquet / clients.parquet)")
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    return (pd.read_parquet(run_dir / "rounds.parquet"),
            pd.read_parquet(run_dir / "clients.parquet"), summary)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(run_dir: str | Path) -> dict:
    """Draw ``report.png`` (energy by class, bits, latency, FID per round); return totals."""
    plt = _plt()
    run_dir = Path(run_dir)
    rounds, clients, summary = load_run(run_dir)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    energy = clients.pivot_table(index="round", columns="device_class", values="energy_j",
                                 aggfunc="sum").fillna(0.0)
    bottom = np.zeros(len(energy))
    for cls in energy.columns:
        ax[0, 0].bar(energy.index, energy[cls], bottom=bottom, label=cls)
        bottom += energy[cls].to_numpy()
    ax[0, 0].set(title="device energy per round", xlabel="round", ylabel="J")
    ax[0, 0].legend(fontsize=7)
    bits = clients.pivot_table(index="round", columns="device_class", values="bits",
                               aggfunc="mean")
    for cls in bits.columns:
        ax[0, 1].plot(bits.index, bits[cls], marker=".", label=cls)
    ax[0, 1].set(title="mean bits per round", xlabel="round", ylabel="bits", yscale="log", )
    ax[0, 1].legend(fontsize=7)
    ax[1, 0].plot(rounds["round"], rounds["latency_s"], marker=".")
    ax[1, 0].set(title="simulated round latency", xlabel="round", ylabel="s")
    if "fid" in rounds and rounds["fid"].notna().any():
        ev = rounds[rounds["fid"].notna()]
        ax[1, 1].plot(ev["round"], ev["fid"], marker="o")
    ax[1, 1].set(title="FID", xlabel="round", ylabel="FID (lower is better)")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)
    totals = {
        "rounds": int(rounds["round"].max()),
        "energy_j": float(rounds["energy_j"].sum()),
        "uplink_bytes": int(rounds["uplink_bytes"].sum()),
        "mean_bits": float(clients["bits"].mean()),
        "stragglers": int(clients["straggler"].sum()),
        "dropped": int(clients["dropped"].sum()),
        "latency_s": float(rounds["latency_s"].sum()),
        "final_fid": float(rounds["fid"].dropna().iloc[-1]) if rounds["fid"].notna().any()
        else float("nan"),
        "energy_by_class_j": clients.groupby("device_class")["energy_j"].sum().round(3).to_dict(),
    }
    if summary.get("fid_untrained") is not None:
        totals["fid_untrained"] = summary["fid_untrained"]
    return totals


def compare(run_dirs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Overlay runs: final FID against total device energy, and FID over cumulative energy."""
    plt = _plt()
    rows = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    for d in run_dirs:
        rounds, clients, _ = load_run(d)
        name = Path(d).name
        cum = rounds["energy_j"].cumsum()
        ev = rounds["fid"].notna()
        fid = float(rounds.loc[ev, "fid"].iloc[-1]) if ev.any() else float("nan")
        rows.append({"run": name, "energy_j": float(cum.iloc[-1]), "fid": fid,
                     "uplink_bytes": int(rounds["uplink_bytes"].sum()),
                     "mean_bits": float(clients["bits"].mean()),
                     "stragglers": int(clients["straggler"].sum())})
        ax[0].scatter(cum.iloc[-1], fid, s=40)
        ax[0].annotate(name, (cum.iloc[-1], fid), fontsize=7)
        if ev.any():
            ax[1].plot(cum[ev], rounds.loc[ev, "fid"], marker="o", label=name)
    ax[0].set(title="final FID vs total device energy", xlabel="energy (J)", ylabel="FID")
    ax[1].set(title="FID over cumulative energy", xlabel="energy (J)", ylabel="FID")
    if len(run_dirs) <= 12:
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return pd.DataFrame(rows)
