"""Where a round's time goes: local training, encode, decode, aggregation, evaluation.

Runs one federated run (the main job's config unless overridden) on an embedded local Ray
and splits each round from its ledger. Training and encoding run in the pools in
parallel, so their per-round figure is the busiest pool's share (sum / pools); decode and
aggregation run on the parameter server, overlapped with training.

    python benchmarks/round_split.py                      # main job, 5 rounds
    python benchmarks/round_split.py --set model.preset=tiny --rounds 3 --quick
"""

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from provenance import write_json  # noqa: E402

from ssdiff_ray import api, config

OUT = Path(__file__).parent / "results" / "round_split.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (CI)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sets = list(args.set)
    if args.quick:
        sets += ["model.preset=tiny", "clients.count=6", "train.local_steps=2",
                 "eval.samples=20", "eval.steps=2", "eval.baseline=false"]
        args.rounds = 2
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(None, [*sets, f"rounds={args.rounds}", f"out_dir={tmp}",
                                 "eval.every=1"])
        summary = api.run(cfg, progress=False)
        rounds = pd.read_parquet(Path(summary["run_dir"]) / "rounds.parquet")
    pools = summary["pools"]
    table = pd.DataFrame({
        "round": rounds["round"],
        "wall_s": rounds["wall_s"],
        "local_training_s": rounds["train_s"] / pools,
        "encode_s": rounds["encode_s"] / pools,
        "decode_s": rounds["decode_s"],
        "aggregation_s": rounds["aggregate_s"],
        "evaluation_s": rounds["eval_s"],
    })
    table["other_s"] = (table["wall_s"] - table["local_training_s"] - table["encode_s"]).clip(0)
    print(f"{summary['clients']} clients, {pools} pools, {summary['num_params']} parameters")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    mean = table.drop(columns="round").iloc[1:].mean() if len(table) > 1 else table.mean()
    print("warm-round mean:", ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    write_json(args.out, {
        "config_overrides": sets, "rounds": table.to_dict("records"),
        "warm_mean": mean.to_dict(), "pools": pools, "num_params": summary["num_params"],
    }, sets)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
