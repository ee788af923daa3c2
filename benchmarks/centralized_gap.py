"""Federated training against centralized training at equal compute, scored in one space.

For each case and seed: one `ssdiff run` (the federated model), then `ssdiff pretrain` on the
same data, model and seed with

* ``equal``: the same total sample-steps (the sum of the clients' local steps at the same
  batch), the strongest simple baseline the federation must keep up with;
* ``sequential``: the federation's number of sequential steps (rounds x the mean local steps
  of a round) at its larger batch (batch x clients a round), the same compute again;

and `ssdiff evaluate` scores both centralized models like the federated run (its classifier
space, sampler, samples and noise seed). Writes ``results/centralized_gap.json`` (every row,
per case the mean and spread of FID and of the ratio federated / centralized) and, for the
first seed, the federated and centralized grids side by side under
``results/centralized_gap/``. Targets (issue: federated as good as centralized): digits
ratio <= 1.3, IID <= 1.15, colour <= 1.5; precision >= 0.6 on digits.

    python benchmarks/centralized_gap.py                       # 3 cases x seeds 0,1,2
    python benchmarks/centralized_gap.py --cases digits --seeds 0 --set server.ema_decay=0
    python benchmarks/centralized_gap.py --runs-dir /tmp/gap   # keep (and reuse) the models

A centralized model already in ``--runs-dir`` for the same case, seed, steps, batch and
settings is reused, so a study of federated recipes pays for the references once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from provenance import args_config, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> (config file or None, extra settings)
    "digits": (None, []),
    "iid": (None, ["data.alpha=1000"]),
    "colour": ("examples/colour-digits.toml", []),
}


def _ssdiff(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", *args], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"ssdiff {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}\n"
                         f"{r.stderr[-3000:]}")


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def compute_of(run_dir: Path) -> dict:
    """The federation's compute from its client ledger (clients that trained and were kept)."""
    cfg = json.loads((run_dir / "summary.json").read_text())
    c = pd.read_parquet(run_dir / "clients.parquet")
    c = c[~c["dropped"]]
    rounds = c.groupby("round")
    batch = int(_config_value(run_dir, "train", "batch_size"))
    return {"client_steps": int(c["local_steps"].sum()),
            "sample_steps": int((c["local_steps"] * np.minimum(c["num_samples"], batch)).sum()),
            "sequential_steps": int(round(rounds["local_steps"].mean().sum())),
            "clients_per_round": float(rounds.size().mean()), "batch": batch,
            "rounds": int(cfg["rounds"])}


def _config_value(run_dir: Path, section: str, key: str):
    import tomllib

    return tomllib.loads((run_dir / "config.toml").read_text())[section][key]


def central(runs: Path, case: str, seed: int, config: str | None, sets: list[str], steps: int,
            batch: int, like: Path, tag: str) -> dict:
    """Train (or reuse) a centralized model and score it like the federated run."""
    key = hashlib.sha256(json.dumps([config, sets, seed, steps, batch]).encode()).hexdigest()[:10]
    model = runs / "central" / f"{case}-seed{seed}-{steps}x{batch}-{key}"
    t0 = time.perf_counter()
    if not (model / "model_index.json").is_file():
        _ssdiff("pretrain", *(["--config", config] if config else []),
                *_sets([*sets, f"seed={seed}", f"train.batch_size={batch}"]),
                "--steps", str(steps), "--out", str(model))
    out = like / "evaluations" / f"central_{tag}.json"
    if not out.is_file():
        _ssdiff("evaluate", str(model), "--like", str(like), "--out", str(out))
    res = json.loads(out.read_text())
    return {"steps": steps, "batch": batch, "model": str(model), "wall_s": time.perf_counter() - t0,
            **{k: res.get(k) for k in ("fid", "precision", "recall", "bad_sample_share",
                                       "class_accuracy", "classes_present")},
            "grid": res["grid"]}


def one(runs: Path, case: str, seed: int, fed_sets: list[str], central_sets: list[str],
        references: list[str]) -> dict:
    config, case_sets = CASES[case]
    name = f"{case}-seed{seed}"
    run_dir = runs / name
    if run_dir.exists():
        raise SystemExit(f"centralized_gap: {run_dir} exists; pass an empty --runs-dir "
                         "(centralized models in it are reused)")
    t0 = time.perf_counter()
    _ssdiff("run", "--quiet", *(["--config", config] if config else []),
            *_sets([*case_sets, *fed_sets, f"seed={seed}", f"out_dir={runs}", f"name={name}"]))
    fed_wall = time.perf_counter() - t0
    s = json.loads((run_dir / "summary.json").read_text())
    comp = compute_of(run_dir)
    row = {"case": case, "seed": seed, **comp,
           "federated": {"fid": s["fid"], "wall_s": fed_wall, "run_dir": str(run_dir),
                         **{k: s.get(k) for k in ("precision", "recall", "bad_sample_share",
                                                  "class_accuracy", "classes_present",
                                                  "fid_floor", "fid_untrained")},
                         "grid": str(run_dir / "samples" / f"round_{comp['rounds']:04d}.png")}}
    sets = [*case_sets, *central_sets]
    if "equal" in references:
        row["equal"] = central(runs, case, seed, config, sets, comp["client_steps"],
                               comp["batch"], run_dir, "equal")
    if "sequential" in references:
        row["sequential"] = central(runs, case, seed, config, sets, comp["sequential_steps"],
                                    round(comp["batch"] * comp["clients_per_round"]), run_dir,
                                    "sequential")
    for ref in references:
        row[f"ratio_{ref}"] = row["federated"]["fid"] / row[ref]["fid"]
    return row


def side_by_side(row: dict, references: list[str], out: Path) -> None:
    """The federated grid and each centralized one in one PNG, left to right."""
    from PIL import Image

    images = [Image.open(row[k]["grid"]) for k in ["federated", *references]]
    gap = 8
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new(images[0].mode, (w, max(im.height for im in images)), 255)
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(rows: list[dict], references: list[str]) -> dict:
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        out[case] = {"federated_fid": _spread([r["federated"]["fid"] for r in rs]),
                     "federated_precision": _spread([r["federated"]["precision"] for r in rs]),
                     **{f"{ref}_fid": _spread([r[ref]["fid"] for r in rs]) for ref in references},
                     **{f"ratio_{ref}": _spread([r[f"ratio_{ref}"] for r in rs])
                        for ref in references}}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="settings of the federated runs")
    ap.add_argument("--central-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="settings of the centralized references (e.g. train.lr)")
    ap.add_argument("--references", default="equal,sequential")
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "centralized_gap.json"))
    args = ap.parse_args(argv)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="ssdiff-gap-")).resolve()
    cases, refs = args.cases.split(","), args.references.split(",")
    if unknown := [c for c in cases if c not in CASES] + [r for r in refs
                                                          if r not in ("equal", "sequential")]:
        raise SystemExit(f"centralized_gap: unknown case or reference {unknown}")
    seeds = [int(s) for s in args.seeds.split(",")]
    grids = Path(args.out).with_suffix("")
    rows = []
    for case in cases:
        for seed in seeds:
            rows.append(r := one(runs, case, seed, args.set, args.central_set, refs))
            print(f"{case} seed {seed}: federated FID {r['federated']['fid']:.1f} (precision "
                  f"{r['federated']['precision']:.2f}) | " + " | ".join(
                      f"{ref} {r[ref]['steps']} x {r[ref]['batch']}: FID {r[ref]['fid']:.1f} "
                      f"(precision {r[ref]['precision']:.2f}), ratio {r[f'ratio_{ref}']:.2f}"
                      for ref in refs), flush=True)
            if seed == seeds[0]:
                side_by_side(r, refs, grids / f"{case}.png")
    result = {"cases": summarize(rows, refs), "rows": rows, "sets": args.set,
              "central_sets": args.central_set, "references": refs,
              "grids": {c: str((grids / f"{c}.png").relative_to(ROOT)) if grids.is_relative_to(ROOT)
                        else str(grids / f"{c}.png") for c in cases}}
    for case, s in result["cases"].items():
        print(f"{case}: " + ", ".join(f"{k} {v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                                      for k, v in s.items()))
    write_json(args.out, result, args_config(args))
    return result


if __name__ == "__main__":
    main()
