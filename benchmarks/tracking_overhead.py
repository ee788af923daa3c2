"""What TensorBoard + MLflow logging costs the main job: the same `ssdiff run` with `[log]`
off and on (TensorBoard event files and a SQLite MLflow store, grids and artifacts included).

Two figures, because the machine is noisy:
- `log_share`: seconds the rounds spent in the loggers (measured in the run itself, the
  driver's `log_s`) over the rounds' wall time; the issue's target is <= 2%.
- `wall_ratio`: whole-run wall with logging over without (both runs measured here, one
  after the other), which also holds the end-of-run artifact upload.

    python benchmarks/tracking_overhead.py                 # -> results/tracking_overhead.json
    python benchmarks/tracking_overhead.py --set rounds=4 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from provenance import args_config, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(name: str, sets: list[str], runs: Path) -> dict:
    cmd = [sys.executable, "-m", "ssdiff_ray.cli", "run", "--quiet",
           *(a for s in [*sets, f"out_dir={runs}", f"name={name}"] for a in ("--set", s))]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    s = json.loads((runs / name / "summary.json").read_text())
    rounds = pd.read_parquet(runs / name / "rounds.parquet")
    return {"name": name, "wall_s": wall, "rounds_wall_s": float(rounds["wall_s"].sum()),
            "log_s": s.get("log_s"), "fid": s["fid"], "warnings": [ln for ln in r.stderr.splitlines()
                                                                   if ln.startswith("warning:")]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "tracking_overhead.json"))
    args = ap.parse_args(argv)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="ssdiff-tracking-"))
    logs = ["log.tensorboard=true", f"log.mlflow_uri='sqlite:///{runs / 'mlflow.db'}'"]
    off = run_one("log_off", args.set, runs)
    on = run_one("log_on", [*args.set, *logs], runs)
    if on["warnings"]:
        raise SystemExit(f"a logger did not run: {on['warnings']}")
    result = {
        "command": "python benchmarks/tracking_overhead.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "sets": args.set, "off": off, "on": on,
        "log_share": on["log_s"] / on["rounds_wall_s"],
        "wall_ratio": on["wall_s"] / off["wall_s"],
        "same_fid": on["fid"] == off["fid"],  # logging must not change the run
    }
    print(f"logging: {on['log_s']:.2f} s over {on['rounds_wall_s']:.0f} s of rounds = "
          f"{100 * result['log_share']:.2f}% (target <= 2%); whole run {on['wall_s']:.0f} s vs "
          f"{off['wall_s']:.0f} s without (ratio {result['wall_ratio']:.3f}); same FID: "
          f"{result['same_fid']}")
    write_json(args.out, result, args_config(args))
    return result


if __name__ == "__main__":
    main()
