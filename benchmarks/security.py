"""Issue 5: backdoor attacks on federated training and the sampling-time defense, one table.

Trains (or reuses) one federated model per scenario with the same seed -- BadDiffusion
(box trigger, hat target), TrojDiff (blend trigger), no attacker, and BadDiffusion against
training-stage screening alone (norm / krum / flame) -- then, offline on each saved model:

* ASR without defense on ``n`` triggered inputs (the config's eval sampler: DDIM 50 steps);
* the defense: trigger estimated from the model alone, input detection (DisDet + TERD LLR +
  UFID, thresholds from N(0, I) draws only), negation, then ASR with the defense;
* detection TPR / FPR / AUROC on ``n`` clean N(0, I) and ``n`` triggered inputs;
* clean FID of ``n`` samples without and with the defense (same initial noise);
* the model-level audit verdict.

Screening rows get no sampling defense (screening alone). Prints the table and writes
``benchmarks/results/security.json`` and ``security.md`` (``--quick``: a tiny model, a
few rounds, small n; written as ``security_quick.*`` unless ``--out`` says otherwise).

    python benchmarks/security.py            # full table (~2.5 h on 2 CPU cores)
    python benchmarks/security.py --quick    # smoke test (a couple of minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import write_json  # noqa: E402

from ssdiff_ray import config as config_mod  # noqa: E402
from ssdiff_ray.attacks import AttackSpec, attack_spec, make_attack  # noqa: E402
from ssdiff_ray.attacks.metrics import attack_metrics  # noqa: E402
from ssdiff_ray.attacks.patterns import make_target, make_trigger  # noqa: E402
from ssdiff_ray.attacks.trojdiff import troj_params  # noqa: E402
from ssdiff_ray.defense.audit import audit_model  # noqa: E402
from ssdiff_ray.defense.estimate import estimate_trigger  # noqa: E402
from ssdiff_ray.defense.input_tests import (  # noqa: E402
    TargetCheck,
    UfidCheck,
    detect_inputs,
    detection_metrics,
    standard_tests,
)
from ssdiff_ray.defense.negation import defended_sample  # noqa: E402
from ssdiff_ray.defense.probe import ProbeEstimator, ProbeOptions  # noqa: E402
from ssdiff_ray.defense.scan import ScanEstimator, ScanOptions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# scenario -> (overrides, sampling defense?)
ATTACK = {
    "baddiffusion": ["attack.kind=baddiffusion", "attack.trigger=box", "attack.target=hat"],
    "trojdiff": ["attack.kind=trojdiff", "attack.trigger=blend", "attack.target=hat"],
    "clean": ["attack.kind=none"],
}
SCENARIOS = {
    # the poison rate 0.1 first: the attack does not take there, so the rate is raised
    "baddiffusion@p0.1": (ATTACK["baddiffusion"], False),
    "baddiffusion": (ATTACK["baddiffusion"], True),
    "trojdiff": (ATTACK["trojdiff"], True),
    "clean": (ATTACK["clean"], True),
    "baddiffusion+norm": ([*ATTACK["baddiffusion"], "server.aggregator=norm_bound"], False),
    "baddiffusion+krum": ([*ATTACK["baddiffusion"], "server.aggregator=multi_krum"], False),
    "baddiffusion+flame": ([*ATTACK["baddiffusion"], "server.aggregator=flame"], False),
}
# The federated setting: 10 clients, all selected every round, so 10% malicious is one client
# in every round; no server EMA (it would average the backdoor away over rounds).
FEDERATED = ["clients.count=10", "clients.per_round=1.0", "rounds=20", "train.local_steps=40",
             "server.ema_decay=0"]
QUICK = ["model.preset=tiny", "model.timesteps=100", "clients.count=10", "clients.per_round=0.2",
         "train.local_steps=4", "train.batch_size=16", "rounds=3"]


def scenario(name: str) -> tuple[list[str], bool]:
    """(overrides, sampling defense?) of a scenario; NAME@pX sets poison rate X, NAME@pXxS also
    the model-replacement scale S."""
    over, defended = SCENARIOS[name]
    if "@p" in name:
        rate, _, scale = name.split("@p", 1)[1].partition("x")
        over = [*over, f"attack.poison_rate={float(rate)}"]
        if scale:
            over.append(f"attack.scale={float(scale)}")
    return over, defended


def train_overrides(args, name: str) -> list[str]:
    over, _ = scenario(name)
    base = [f"seed={args.seed}", f"clients.pools={args.pools}", "ray.torch_threads=1",
            "eval.samples=10", "attack.eval_samples=10", "eval.baseline=false", "eval.grid=0",
            "defense.enabled=false", "defense.estimate_trigger=false",
            f"attack.malicious_fraction={args.malicious_fraction}",
            f"attack.poison_rate={args.poison_rate}", f"attack.scale={args.scale}",
            f"out_dir={args.runs_dir}", f"name={name}"]
    return [*base, *(QUICK if args.quick else FEDERATED), *over]


def train(args, names: list[str]) -> None:
    """Train every scenario whose model is not saved yet (``--pools`` Ray CPUs, one pool actor
    and one torch thread each)."""
    todo = [n for n in names if not (Path(args.runs_dir) / n / "model" / "model_index.json").is_file()]
    if not todo:
        return

    from ssdiff_ray import api

    with api.ray_session(num_cpus=args.pools):
        for name in todo:
            t = time.perf_counter()
            cfg = config_mod.load(None, train_overrides(args, name))
            api.run(cfg, progress=False)
            print(f"trained {name} in {time.perf_counter() - t:.0f} s", flush=True)


def trigger_direction(spec: AttackSpec, size: int) -> np.ndarray:
    """The true mean shift of triggered inputs (r, or TrojDiff's mu): diagnostics only."""
    if spec.kind == "baddiffusion":
        return make_trigger(spec.trigger, size, spec.channels)
    return troj_params(spec, size)[0]


def make_estimator(args):
    """The estimator ``--estimator`` names, with the sizes of ``args.est_kw``."""
    kw = {k: v for k, v in args.est_kw.items() if k != "method"}
    if args.estimator == "probe":
        return ProbeEstimator(ProbeOptions(**kw))
    return ScanEstimator(ScanOptions(**kw))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def evaluate(args, name: str, evaluator) -> dict:
    from ssdiff_ray.inference import load_run_model
    from ssdiff_ray.model.sampling import sample

    _, defended = scenario(name)
    cfg, unet, sched = load_run_model(Path(args.runs_dir) / name)
    size, e, n, fpr = cfg.data.image_size, cfg.eval, args.n, args.fpr
    kind, channels = cfg.attack.kind, cfg.data.channels or 1
    # the clean model is probed with the BadDiffusion trigger (its ASR must stay ~0)
    spec = (AttackSpec(kind=kind, trigger=attack_spec(cfg).trigger, target=cfg.attack.target,
                       poison_rate=cfg.attack.poison_rate, gamma=cfg.attack.gamma,
                       channels=channels)
            if kind != "none" else AttackSpec(trigger="box", target="hat", channels=channels))
    tgt = make_target(spec.target, size, channels)[None]
    seed = args.seed + 1000  # test inputs: never the calibration draws of the detector
    x_trig = make_attack(spec).triggered_noise(n, size, seed)
    x_clean = torch.randn((n, channels, size, size),
                          generator=torch.Generator().manual_seed(seed + 1))
    screening = cfg.server.aggregator if cfg.server.aggregator not in ("fedavg", "fedavgm") else "none"
    row: dict = {"scenario": name, "attack": kind, "screening": screening,
                 "poison_rate": cfg.attack.poison_rate,
                 "malicious_fraction": cfg.attack.malicious_fraction, "scale": cfg.attack.scale,
                 "sampling_defense": defended, "n": n, "fpr_target": fpr}
    t0 = time.perf_counter()
    attacked = sample(unet, sched, n, sampler=e.sampler, steps=e.steps, seed=seed, x_T=x_trig)
    m = attack_metrics(attacked, spec, tgt)
    clean_imgs = sample(unet, sched, n, sampler=e.sampler, steps=e.steps, seed=seed, x_T=x_clean)
    row.update(asr=m["asr"], attack_mse=m["mse"], fid=float(evaluator.fid(clean_imgs)),
               # a backdoor also takes over a few clean inputs: their samples are the target
               clean_target_rate=attack_metrics(clean_imgs, spec, tgt)["asr"])
    row["t_undefended_s"] = time.perf_counter() - t0
    if not defended:
        return row
    t0 = time.perf_counter()
    est = estimate_trigger(unet, sched, (channels, size, size), seed=args.seed,
                           estimator=make_estimator(args))
    row["t_estimate_s"] = time.perf_counter() - t0
    row.update(tau_norm=est.tau_norm, cos_tau_trigger=cosine(est.tau, trigger_direction(spec, size)),
               est_spread_ratio=est.stats["spread_ratio"], estimator_used=est.stats["method"],
               probe_cluster_fraction=est.stats.get("cluster_fraction", 0.0))
    t0 = time.perf_counter()
    ufid = None  # the output check: UFID's consistency or the estimated target's
    if args.check == "ufid":
        ufid = UfidCheck(unet, sched, (channels, size, size), n_null=args.ufid_null,
                         seed=args.seed, steps=e.steps, n_perturb=args.ufid_perturb)
    elif args.check == "target":
        ufid = TargetCheck(unet, sched, est, n_null=args.ufid_null, seed=args.seed,
                           steps=e.steps)
    tests = standard_tests((channels, size, size), est, ufid)
    det_t = detect_inputs(x_trig, tests, fpr)
    det_c = detect_inputs(x_clean, tests, fpr)
    row["t_detect_s"] = time.perf_counter() - t0
    dm = detection_metrics(det_c["score"], det_t["score"], flags_clean=det_c["flagged"],
                                   flags_triggered=det_t["flagged"])
    row.update(detect_tpr=dm["tpr"], detect_fpr=dm["fpr"], detect_auroc=dm["auroc"])
    for part, name in (("disdet", "disdet"), ("llr", "llr"), (args.check, f"check_{args.check}")):
        thr = f"{part}_threshold"
        if thr in det_t:
            row[f"tpr_{name}"] = float(np.mean(det_t[f"{part}_score"] > det_t[thr]))
            row[f"fpr_{name}"] = float(np.mean(det_c[f"{part}_score"] > det_c[thr]))
    t0 = time.perf_counter()
    d_trig, _ = defended_sample(unet, sched, x_trig, tests, e.sampler, e.steps, seed, fpr,
                                flags=det_t["flagged"])
    d_clean, _ = defended_sample(unet, sched, x_clean, tests, e.sampler, e.steps, seed, fpr,
                                 flags=det_c["flagged"])
    row["t_negate_s"] = time.perf_counter() - t0
    row["asr_defended"] = attack_metrics(d_trig, spec, tgt)["asr"]
    row["fid_defended"] = float(evaluator.fid(d_clean))
    row["clean_target_rate_defended"] = attack_metrics(d_clean, spec, tgt)["asr"]
    row["fid_rel_change"] = row["fid_defended"] / row["fid"] - 1
    t0 = time.perf_counter()
    audit = audit_model(unet, sched, est, seed=args.seed)
    row["t_audit_s"] = time.perf_counter() - t0
    row.update(audit=audit["verdict"], audit_spread_ratio=audit["spread_ratio"],
               audit_spread_z=audit["spread_z"])
    return row


TARGETS = {"asr_min_undefended": 0.9, "asr_max_defended": 0.02, "tpr_min": 0.98,
           "fpr_max": 0.02, "fid_rel_max": 0.05}


def checks(row: dict) -> dict:
    """Which of the issue's targets a row meets (None where the target does not apply)."""
    attacked = row["attack"] != "none"
    out = {"asr_ge_0.9": row["asr"] >= TARGETS["asr_min_undefended"] if attacked else None}
    if attacked and row["screening"] != "none":  # the screen is what should stop the attack
        out = {"screened_asr_le_0.02": row["asr"] <= TARGETS["asr_max_defended"]}
    if row["sampling_defense"]:
        out.update({
            "asr_def_le_0.02": row["asr_defended"] <= TARGETS["asr_max_defended"],
            "tpr_ge_0.98": row["detect_tpr"] >= TARGETS["tpr_min"] if attacked else None,
            "fpr_le_0.02": row["detect_fpr"] <= TARGETS["fpr_max"],
            "fid_within_5pct": abs(row["fid_rel_change"]) <= TARGETS["fid_rel_max"],
            "audit_ok": row["audit"] == ("backdoored" if attacked else "clean"),
        })
    return out


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


COLS = [("scenario", "scenario"), ("poison_rate", "poison"), ("scale", "scale"),
        ("screening", "screening"), ("sampling_defense", "defense"),
        ("asr", "ASR"), ("asr_defended", "ASR def."), ("detect_tpr", "TPR"),
        ("detect_fpr", "FPR"), ("detect_auroc", "AUROC"), ("fid", "FID"),
        ("fid_defended", "FID def."), ("fid_rel_change", "dFID"),
        ("clean_target_rate", "clean->target"), ("clean_target_rate_defended", "def."),
        ("audit", "audit"),
        ("cos_tau_trigger", "cos(tau,r)")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLS) + " | targets met |"
    sep = "|" + "---|" * (len(COLS) + 1)
    lines = [head, sep]
    for r in rows:
        ok = [k for k, v in r["checks"].items() if v is True]
        bad = [k for k, v in r["checks"].items() if v is False]
        met = ", ".join(ok) + ("; NOT: " + ", ".join(bad) if bad else "")
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in COLS) + f" | {met} |")
    return "\n".join(lines)


def write(stem: Path, result: dict, header: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(f"{header}\n\n{table(result['rows'])}\n")


def combine(files: list[str], stem: Path) -> dict:
    """One table from several results files (each row keeps its own command)."""
    rows: dict = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            r["checks"] = checks(r)
            rows[r["scenario"]] = r
    order = list(SCENARIOS)
    result = {"combined_from": files,
              "rows": sorted(rows.values(), key=lambda r: order.index(r["scenario"]))}
    write(stem, result, "# Security benchmark\n\nRows combined from " + ", ".join(
        f"`{f}`" for f in files) + "; each row's command is in the JSON (`command`).")
    print(table(result["rows"]))
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few rounds, small n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=None, help="clean and triggered inputs (1000)")
    ap.add_argument("--poison-rate", type=float, default=0.5,
                    help="attacked scenarios without @pX in their name (0.1 leaves ASR 0)")
    ap.add_argument("--scale", type=float, default=10.0,
                    help="model replacement factor of malicious updates (10 = clients per round)")
    ap.add_argument("--pools", type=int, default=2, help="pool actors (and Ray CPUs) in training")
    ap.add_argument("--malicious-fraction", type=float, default=0.1)
    ap.add_argument("--fpr", type=float, default=None,
                    help="detector's nominal FPR (default: the product's, defense.fpr)")
    ap.add_argument("--estimator", choices=("probe", "scan"), default="probe",
                    help="trigger estimator (ssdiff_ray.defense)")
    ap.add_argument("--check", choices=("target", "ufid", "none"), default="target",
                    help="output check beside DisDet and the LLR: generation vs the estimated "
                         "target (TargetCheck), UFID's consistency, or none")
    ap.add_argument("--ufid-null", type=int, default=None,
                    help="N(0, I) draws for the output check's null")
    ap.add_argument("--ufid-perturb", type=int, default=2, help="UFID generations per input")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--runs-dir", default=None, help="where trained models are saved/reused")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep other scenarios' rows from the existing results file")
    ap.add_argument("--out", default=None, help="results stem (default results/security[_quick])")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="no evaluation: write the table of these results files' rows (later "
                         "files win per scenario), e.g. of runs split over processes")
    args = ap.parse_args(argv)
    if args.fpr is None:
        args.fpr = config_mod.DefenseConfig().fpr
    if args.combine:
        return combine(args.combine, Path(args.out) if args.out else RESULTS / "security")
    torch.set_num_threads(1)
    args.n = args.n or (60 if args.quick else 1000)
    args.ufid_null = args.ufid_null or (40 if args.quick else 500)
    args.runs_dir = args.runs_dir or str(ROOT / "runs" / ("security_quick" if args.quick
                                                          else "security"))
    args.est_kw = {"method": args.estimator, **({"gen_steps": 2} if args.quick else {})}
    if args.estimator == "probe" and args.quick:
        args.est_kw.update({"n_probe": 300, "iters": 3, "batch": 200})
    stem = Path(args.out) if args.out else RESULTS / ("security_quick" if args.quick else "security")
    names = [s for s in args.scenarios.split(",") if s]
    t0 = time.perf_counter()
    train(args, names)
    t_train = time.perf_counter() - t0
    if args.train_only:
        return {}

    from ssdiff_ray.data import load_dataset
    from ssdiff_ray.metrics.quality import QualityEvaluator

    cfg0 = config_mod.load(Path(args.runs_dir) / names[0] / "config.toml")
    data = load_dataset(cfg0.data)
    evaluator = QualityEvaluator(data.images, data.labels)
    command = "python benchmarks/security.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # --merge keeps the rows of scenarios not evaluated now from the existing results
    kept = {}
    if args.merge and stem.with_suffix(".json").is_file():
        kept = {r["scenario"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    for name in names:
        t1 = time.perf_counter()
        row = evaluate(args, name, evaluator)
        row["checks"] = checks(row)
        row["eval_s"] = time.perf_counter() - t1
        row["command"] = command.strip()
        kept[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "checks"}, default=str), flush=True)
    order = list(SCENARIOS)
    rows = sorted(kept.values(), key=lambda r: order.index(r["scenario"]))
    md = table(rows)
    print(md)
    result = {"command": command.strip(),
              "seed": args.seed, "n": args.n, "fpr": args.fpr, "check": args.check,
              "ufid_null": args.ufid_null, "ufid_perturb": args.ufid_perturb, "scale": args.scale,
              "poison_rate": args.poison_rate, "malicious_fraction": args.malicious_fraction,
              "estimate_kw": args.est_kw, "targets": TARGETS, "train_s": t_train,
              "total_s": time.perf_counter() - t0, "rows": rows}
    write(stem, result,
          f"# Security benchmark{' (quick)' if args.quick else ''}\n\n"
          f"Last command `{result['command']}` (each row's own command is in the JSON) -- "
          f"seed {args.seed}, {args.n} clean + {args.n} triggered inputs, "
          f"malicious fraction {args.malicious_fraction}, poison rate {args.poison_rate}, "
          f"detector FPR target {args.fpr}, output check {args.check}.")
    return result


if __name__ == "__main__":
    main()
