"""One self-contained HTML page per run (``ssdiff report`` -> ``RUN/report.html``) or per set
of runs (``ssdiff compare`` -> ``compare.html``): summary, curves per round (FID, loss,
energy, bytes), the per-device-class table and the sample grids over rounds.

Everything is inside the file (plots and grids as PNG data URLs, no script, no font or
style sheet from elsewhere), so it opens with no network and can be mailed or archived.
Every text that comes from a run (names, config) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from ssdiff_ray.report import _plt, load_run

CURVES = (("fid", "FID (lower is better)"), ("loss", "training loss"),
          ("energy_j", "device energy per round (J)"), ("uplink_bytes", "uplink bytes per round"))
SUMMARY = (("rounds", "rounds"), ("clients", "clients"), ("wall_s", "wall time (s)"),
           ("fid", "FID (final)"), ("fid_untrained", "FID untrained"), ("fid_floor", "FID floor (real)"),
           ("precision", "precision"), ("recall", "recall"), ("bad_sample_share", "bad sample share"),
           ("classes_present", "classes present"), ("uplink_bytes", "uplink bytes"),
           ("downlink_bytes", "downlink bytes"), ("energy_j", "device energy (J)"),
           ("stragglers", "stragglers"))
MAX_GRIDS = 12  # grids shown per run: evenly spaced over the evaluated rounds, the last always
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;color:#222}
h1{font-size:1.35rem}h2{font-size:1.1rem;margin-top:1.6rem}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}th{background:#f3f3f5}
td:first-child,th:first-child{text-align:left}.grids{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;font-size:.8rem;text-align:center}figure img{image-rendering:pixelated;
width:14rem}img.plot{max-width:100%}pre{background:#f6f6f6;padding:.6rem;overflow:auto}"""


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def _curves(runs: dict[str, pd.DataFrame]) -> bytes:
    """FID, loss, energy and uplink bytes per round, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2))
    for ax, (col, title) in zip(axes, CURVES, strict=True):
        for name, rounds in runs.items():
            if col in rounds and rounds[col].notna().any():
                ok = rounds[rounds[col].notna()]
                ax.plot(ok["round"], ok[col], marker="o" if len(ok) < 3 else
                        ("." if len(ok) < 40 else None), label=name)
        ax.set(title=title, xlabel="round")
        lo, hi = ax.get_ylim()
        if col == "fid" and lo > 0 and hi / lo > 20:  # an untrained-to-trained span
            ax.set_yscale("log")
    if len(runs) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def device_table(clients: pd.DataFrame) -> pd.DataFrame:
    """Per device class: clients, participations, bits, energy, time and drops."""
    g = clients.groupby("device_class")
    return pd.DataFrame({
        "clients": g["client_id"].nunique(), "participations": g.size(),
        "mean bits": g["bits"].mean(), "energy (J)": g["energy_j"].sum(),
        "mean compute (s)": g["compute_s"].mean(), "mean upload (s)": g["upload_s"].mean(),
        "uplink (MiB)": g["uplink_bytes"].sum() / 2**20,
        "stragglers": g["straggler"].sum(), "dropped": g["dropped"].sum(),
    }).reset_index().rename(columns={"device_class": "device class"})


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, border=0, na_rep="",
                      float_format=lambda v: f"{v:,.4g}")


def _grids(run_dir: Path) -> list[tuple[str, bytes]]:
    """(caption, PNG) of the run's sample grids: untrained, then evaluated rounds."""
    samples = run_dir / "samples"
    rounds = sorted(samples.glob("round_*.png")) if samples.is_dir() else []
    if len(rounds) > MAX_GRIDS:
        keep = np.unique(np.linspace(0, len(rounds) - 1, MAX_GRIDS).round().astype(int))
        rounds = [rounds[i] for i in keep]
    found = [samples / "untrained.png", *rounds] if (samples / "untrained.png").is_file() else rounds
    return [("untrained" if p.stem == "untrained" else f"round {int(p.stem.split('_')[1])}",
             p.read_bytes()) for p in found]


def _summary_rows(summary: dict) -> pd.DataFrame:
    def shown(k, v):
        if k.endswith("_bytes"):
            return f"{v / 2**20:,.1f} MiB"
        return f"{v:,.4g}" if isinstance(v, float) else str(v)

    rows = [(label, shown(k, summary[k])) for k, label in SUMMARY if summary.get(k) is not None]
    return pd.DataFrame(rows, columns=["", "value"])


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(body) + "</body></html>\n")


def _plot_html(png: bytes, alt: str) -> str:
    return f"<img class=plot alt='{html.escape(alt)}' src='{_data_url(png)}'>"


def _grid_html(grids: list[tuple[str, bytes]]) -> str:
    return "<div class=grids>" + "".join(
        f"<figure><img src='{_data_url(png)}' alt='{html.escape(cap)}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, png in grids) + "</div>"


def report_html(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``); returns its path."""
    run_dir = Path(run_dir)
    rounds, clients, summary = load_run(run_dir)
    body = ["<h2>Summary</h2>", _table(_summary_rows(summary)) if summary else
            "<p>No summary.json: the run has not finished.</p>",
            "<h2>Per round</h2>", _plot_html(_curves({run_dir.name: rounds}), "curves per round"),
            "<h2>Per device class</h2>", _table(device_table(clients)),
            "<h2>Samples over rounds</h2>", _grid_html(_grids(run_dir))]
    if (run_dir / "config.toml").is_file():
        body += ["<h2>Config</h2><details><summary>config.toml</summary>",
                 f"<pre>{html.escape((run_dir / 'config.toml').read_text())}</pre></details>"]
    path = Path(out) if out else run_dir / "report.html"
    path.write_text(_page(f"ssdiff run {run_dir.name}", body))
    return path


def compare_html(run_dirs: list[str | Path], table: pd.DataFrame, out: str | Path) -> Path:
    """Write the comparison of several runs: their table, overlaid curves, last grids."""
    runs = {Path(d).name: load_run(d)[0] for d in run_dirs}
    last = []
    for d in run_dirs:
        grids = [g for g in _grids(Path(d)) if g[0] != "untrained"]
        if grids:
            last.append((f"{Path(d).name}, {grids[-1][0]}", grids[-1][1]))
    body = ["<h2>Runs</h2>", _table(table),
            "<h2>Per round</h2>", _plot_html(_curves(runs), "curves per round"),
            "<h2>Last samples</h2>", _grid_html(last)]
    path = Path(out)
    path.write_text(_page("ssdiff compare: " + ", ".join(runs), body))
    return path

