"""Federated fine-tuning of a pretrained model with LoRA, against full fine-tuning and
training from scratch, on a domain shift: a base model pretrained centrally on digits 0-4
(`ssdiff pretrain`) is fine-tuned federatedly on digits 5-9, which it never saw.

Every row is one `ssdiff run` (a fresh process and embedded Ray) with the same seed, rounds
and client selection; only the mode, the rank, the aggregation or the uplink bits change.
Columns: target-domain FID (the run's own classifier space, trained on digits 5-9), uplink
bytes per client per round and their share of the full model's FP32 bytes, device energy and
round latency (the energy model), and the run's wall time.

    python benchmarks/lora.py                   # -> results/lora.json, results/lora.md
    python benchmarks/lora.py --ranks 8 --aggregations naive,ffa,exact --seeds 1 \
        --no-scratch --no-quant --runs-dir RUNS --out results/lora_seed1.json   # more seeds
    python benchmarks/lora.py --ranks 8 --aggregations exact --no-scratch --no-quant \
        --set lora.target_modules=to_q,to_k,to_v,to_out.0,conv1,conv2 --tag "+conv" \
        --runs-dir RUNS --out results/lora_conv.json      # adapters on the convolutions too
    python benchmarks/lora.py --ranks 8 --aggregations exact --seeds 0,1 --no-scratch \
        --no-quant --set train.lr=1e-2 --tag " lr 1e-2" --runs-dir RUNS --out results/lora_lr.json

RUNS may hold an earlier `base/` (the pretrained model), which is then reused. The final
sample grid of every row is copied to results/<out>_grids/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policies import markdown  # noqa: E402
from provenance import args_config, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ssdiff(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", *args], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"ssdiff {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def run_row(label: str, sets: list[str], common: list[str], runs: Path, grids: Path) -> dict:
    name = label.replace(" ", "_").replace(",", "")
    t0 = time.perf_counter()
    ssdiff("run", "--quiet", *(a for s in [*common, *sets, f"out_dir={runs}", f"name={name}"]
                               for a in ("--set", s)))
    wall = time.perf_counter() - t0
    run = runs / name
    s = json.loads((run / "summary.json").read_text())
    clients = pd.read_parquet(run / "clients.parquet")
    rounds = pd.read_parquet(run / "rounds.parquet")
    sent = clients[~clients["dropped"]]
    grids.mkdir(parents=True, exist_ok=True)  # the final sample grid, to look at
    shutil.copy(sorted((run / "samples").glob("round_*.png"))[-1], grids / f"{name}.png")
    if (run / "samples" / "untrained.png").is_file():
        shutil.copy(run / "samples" / "untrained.png", grids / f"base_{name}.png")
    return {"row": label, "fid": s["fid"], "fid_untrained": s.get("fid_untrained"),
            "uplink_bytes_per_client_round": float(sent["uplink_bytes"].mean()),
            "uplink_params": s["num_params"],
            "energy_j": float(rounds["energy_j"].sum()),
            "latency_s": float(rounds["latency_s"].mean()),
            "downlink_bytes": float(rounds["downlink_bytes"].sum()),
            "bad_sample_share": s.get("bad_sample_share"), "wall_s": wall,
            "run_dir": str(run)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small_attn")
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--aggregations", default="naive,ffa,exact")
    ap.add_argument("--quant-aggregation", default="exact",
                    help="aggregation of the rank-8 row with 4-bit uploads")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra settings for every run")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch row")
    ap.add_argument("--no-quant", action="store_true", help="skip the 4-bit row")
    ap.add_argument("--tag", default="", help="appended to the LoRA rows' labels")
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "lora.json"))
    args = ap.parse_args(argv)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="ssdiff-lora-"))
    base = runs / "base"
    t0 = time.perf_counter()
    if not (base / "model_index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        ssdiff("pretrain", "--steps", str(args.pretrain_steps), "--out", str(base),
               "--set", f"model.preset={args.preset}", "--set", "data.classes=0-4")
    pretrain_s = time.perf_counter() - t0
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        common = [f"seed={seed}", f"rounds={args.rounds}", "data.classes=5-9",
                  f"model.preset={args.preset}", "clients.count=20", "clients.per_round=0.2",
                  "eval.baseline=false", *args.set]
        tuned = [*common, f"model.pretrained={base}"]
        plan = [] if args.no_scratch else [("scratch", ["train.mode=full"], common)]
        plan.append((f"full fine-tune{args.tag}", [], tuned))
        for r in (int(x) for x in args.ranks.split(",")):
            for agg in args.aggregations.split(","):
                plan.append((f"lora r{r} {agg}{args.tag}",
                             ["train.mode=lora", f"lora.rank={r}", f"lora.alpha={r}",
                              f"lora.aggregation={agg}"], tuned))
        if not args.no_quant:
            plan.append((f"lora r8 {args.quant_aggregation} 4-bit{args.tag}",
                         ["train.mode=lora", "lora.rank=8", "lora.alpha=8",
                          f"lora.aggregation={args.quant_aggregation}", "quant.bits=4"], tuned))
        for label, sets, com in plan:
            full_ft = label.startswith("full fine-tune")
            extra = ["eval.baseline=true"] if full_ft else []
            row = run_row(f"{label} s{seed}", [*sets, *extra], com, runs,
                          Path(args.out).with_suffix("").with_name(Path(args.out).stem + "_grids"))
            row.update(seed=seed, row=label)
            if full_ft:  # its "untrained" model is the base: the base row
                rows.append({"row": "base (before fine-tuning)", "seed": seed,
                             "fid": row["fid_untrained"], "uplink_bytes_per_client_round": 0.0})
            rows.append(row)
            print(f"{label:<26} seed {seed}  FID {row['fid']:8.2f}  uplink "
                  f"{row['uplink_bytes_per_client_round']:10.0f} B  ({row['wall_s']:.0f} s)",
                  flush=True)
    table = pd.DataFrame(rows)
    is_ft = table["row"].str.startswith("full fine-tune")
    full_bytes = 4 * float(table.loc[is_ft, "uplink_params"].iloc[0])
    table["uplink_share_of_full_fp32"] = table["uplink_bytes_per_client_round"] / full_bytes
    ft = table[is_ft].set_index("seed")["fid"]
    table["fid_vs_full_ft"] = table["fid"] / table["seed"].map(ft)
    res = {"preset": args.preset, "pretrain_steps": args.pretrain_steps, "rounds": args.rounds,
           "pretrain_s": pretrain_s, "runs_dir": str(runs), "rows": table.to_dict("records")}
    out = Path(args.out)
    write_json(out, res, args_config(args))
    cols = ["row", "seed", "fid", "fid_vs_full_ft", "uplink_bytes_per_client_round",
            "uplink_share_of_full_fp32", "energy_j", "latency_s"]
    md = markdown(table[cols].to_dict("records"), cols)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
