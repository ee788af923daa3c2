"""Issue 24: the sampling defense, the audit and ``ssdiff cleanse`` on many backdoors.

A cache of trained models (``--cache``, default ``.cache/security-matrix``), one run
directory each, so rows can be rerun one at a time (``--rows box,glasses``). Every model
is a tiny UNet (T = 1000) trained centrally for ``--steps`` steps (colour: 4,000) on the
built-in data; a backdoored one is poisoned at ``attack.poison_rate`` = 0.5 in every batch
(a poisoned base checkpoint; federated rows are in ``security.md``). The triggers include two made
here as ``.npy`` files (the box moved to the other corner, the box at half amplitude) and
an adaptive one: a full-frame, low-amplitude pattern that no window of the model-free
test sees.

Per row, with the product's defaults (``cached_defense``, ``Defense``, ``cleanse_run``):

* ASR on ``--n-triggered`` triggered inputs without defense under DDIM-50 and DPM-10
  (``asr_by_sampler``); everything else in the row is measured under the sampler with the
  higher ASR (the attacker picks; clean rows: DPM-10), ASR with the sampling defense too;
* detection TPR on them, FPR on ``--n-clean`` fresh N(0, I) inputs (never used for a
  threshold) with its 95 % Wilson interval, AUROC;
* clean FID of ``eval.samples`` samples without and with the defense (same noise);
* the audit verdict, the estimate's cosine to the true trigger (mu for TrojDiff), the
  estimation time;
* ASR (the highest over both samplers) and FID after ``ssdiff cleanse`` (no input defense).

Then the audit on the whole population (every model, clean or backdoored): each model's
verdict from a rule calibrated on all the *other* models (leave-one-out), its true- and
true-negative rates with 95 % intervals; ``--write-rule`` saves the rule calibrated on all
of them to ``ssdiff_ray/defense/audit_rule.json``.

    python benchmarks/security_matrix.py                  # train what is missing, all rows
    python benchmarks/security_matrix.py --rows box --fresh
    python benchmarks/security_matrix.py --report-only    # the tables from the cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray import config as config_mod  # noqa: E402
from ssdiff_ray.attack_eval import asr_by_sampler, undefended_attack  # noqa: E402
from ssdiff_ray.attacks import attack_spec  # noqa: E402
from ssdiff_ray.attacks.metrics import attack_metrics  # noqa: E402
from ssdiff_ray.attacks.patterns import make_trigger  # noqa: E402
from ssdiff_ray.attacks.trojdiff import troj_params  # noqa: E402
from ssdiff_ray.defense.audit import calibrate_rule, leave_one_out  # noqa: E402
from ssdiff_ray.defense.cache import cached_defense  # noqa: E402
from ssdiff_ray.defense.defense import Defense  # noqa: E402
from ssdiff_ray.defense.input_tests import detection_metrics  # noqa: E402
from ssdiff_ray.evaluation import Evaluator  # noqa: E402
from ssdiff_ray.inference import cleanse_run, load_run_model  # noqa: E402
from ssdiff_ray.model.sampling import sample  # noqa: E402
from ssdiff_ray.pretrain import pretrain  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = ["model.preset=tiny", "model.timesteps=1000", "data.image_size=16",
        "train.batch_size=32", "train.lr=2e-3", "eval.samples=500"]
BD = ["attack.poison_rate=0.5"]
COLOUR_STEPS = 4000
CLEAN_SAMPLER = ("dpm", 10)  # clean rows: the fast sampler (backdoored rows: their worst)
COLOUR = ["data.name=colour_digits"]

# name -> (status, overrides); "{cache}" is the cache directory (trigger files live there)
MODELS: dict[str, tuple[str, list[str]]] = {
    "box": ("backdoored", [*BD, "seed=0", "attack.kind=baddiffusion", "attack.trigger=box"]),
    "box_top_left": ("backdoored", [*BD, "seed=1", "attack.kind=baddiffusion",
                                    "attack.trigger={cache}/box_top_left.npy",
                                    "attack.target=cross"]),
    "stop_sign": ("backdoored", [*BD, "seed=2", "attack.kind=baddiffusion",
                                 "attack.trigger=stop_sign"]),
    "glasses": ("backdoored", [*BD, "seed=3", "attack.kind=baddiffusion",
                               "attack.trigger=glasses", "attack.target=corner"]),
    "box_half": ("backdoored", [*BD, "seed=4", "attack.kind=baddiffusion",
                                "attack.trigger={cache}/box_half.npy"]),
    "trojdiff_blend": ("backdoored", [*BD, "seed=5", "attack.kind=trojdiff",
                                      "attack.trigger=blend"]),
    "trojdiff_patch": ("backdoored", [*BD, "seed=6", "attack.kind=trojdiff",
                                      "attack.trigger=patch", "attack.target=cross"]),
    "class_target": ("backdoored", [*BD, "seed=7", "attack.kind=baddiffusion",
                                    "attack.trigger=box", "attack.target=class:0"]),
    "colour_box": ("backdoored", [*BD, *COLOUR, "seed=0", "attack.kind=baddiffusion",
                                  "attack.trigger=box"]),
    "colour_stop_sign": ("backdoored", [*BD, *COLOUR, "seed=1", "attack.kind=baddiffusion",
                                        "attack.trigger=stop_sign", "attack.target=cross"]),
    "adaptive_full_frame": ("backdoored", [*BD, "seed=8", "attack.kind=baddiffusion",
                                           "attack.trigger={cache}/full_frame.npy"]),
    **{f"clean_digits_{s}": ("clean", [f"seed={s}"]) for s in range(6)},
    **{f"clean_colour_{s}": ("clean", [*COLOUR, f"seed={s}"]) for s in range(2)},
}
# clean models beyond one per data set join the audit's population only (no matrix row)
POPULATION_ONLY = {*(f"clean_digits_{s}" for s in range(1, 6)), "clean_colour_1"}


def write_trigger_files(cache: Path) -> None:
    """The file triggers: (pattern, mask) stacked as .npy (``read_pattern_file``)."""
    box = make_trigger("box", 16)
    files = {"box_top_left": np.roll(box, (-10, -10), (1, 2)),  # the other corner
             "box_half": 0.5 * box}
    yy, xx = np.mgrid[:16, :16] / 15
    files["full_frame"] = (0.3 * np.sign(np.cos(2 * np.pi * 1.5 * xx) * np.cos(
        2 * np.pi * 1.5 * yy)))[None].astype(np.float32)  # a faint checker over the frame
    for name, r in files.items():
        mask = np.ones_like(r) if name == "full_frame" else (r != 0).astype(np.float32)
        np.save(cache / f"{name}.npy", np.concatenate([r, mask]).astype(np.float32))


def train(cache: Path, name: str, steps: int) -> Path:
    """The model's run directory (model/ + config.toml), trained if missing."""
    run = cache / name
    if (run / "model" / "model_index.json").is_file():
        return run
    status, sets = MODELS[name]
    if COLOUR[0] in sets:  # 1,500 steps left the colour models without a backdoor
        steps = COLOUR_STEPS
    cfg = config_mod.load(None, [*BASE, *(s.format(cache=cache) for s in sets)])
    t0 = time.perf_counter()
    res = pretrain(cfg, run / "model", steps, progress=False)
    from ssdiff_ray.data import load_dataset
    from ssdiff_ray.run_dir import resolve

    config_mod.save(resolve(cfg, load_dataset(cfg.data)), run / "config.toml")
    (run / "train.json").write_text(json.dumps({**res, "status": status,
                                                "seconds": time.perf_counter() - t0}))
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float((mid - half) / (1 + z * z / n)), float((mid + half) / (1 + z * z / n))]


def true_pattern(spec, size: int) -> np.ndarray:
    if spec.kind == "trojdiff":
        return troj_params(spec, size)[0]
    return make_trigger(spec.trigger, size, spec.channels)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def measure(run: Path, name: str, args) -> dict:
    """One row of the matrix (module docstring)."""
    cfg, unet, sched = load_run_model(run)
    status = MODELS[name][0]
    evaluator = Evaluator(cfg)
    spec = attack_spec(cfg)
    by_sampler = {}
    if spec is not None and name not in POPULATION_ONLY:
        # the defense is measured under the sampler the backdoor fires best under
        by_sampler = asr_by_sampler(cfg, unet, sched, evaluator.dataset,
                                    evaluator.quality.classifier, 1000, args.n_triggered)
        worst = max(by_sampler, key=by_sampler.get)
    else:
        worst = "-".join(map(str, CLEAN_SAMPLER))
    cfg.eval.sampler, cfg.eval.steps = worst.split("-")[0], int(worst.split("-")[1])
    t0 = time.perf_counter()
    defense, audit = cached_defense(run, Defense.from_config(cfg, unet, sched), refresh=True)
    row = {"name": name, "status": status, "estimate_s": time.perf_counter() - t0,
           "audit": audit, "estimator": defense.est.stats.get("method", ""),
           "sampler": worst, "asr_by_sampler": by_sampler}
    if name in POPULATION_ONLY:
        return row
    e, size, c = cfg.eval, cfg.data.image_size, cfg.data.channels
    x_clean = torch.randn((args.n_clean, c, size, size),
                          generator=torch.Generator().manual_seed(2000))
    det_c = defense.detect(x_clean)
    row["fpr"] = float(det_c["flagged"].mean())
    row["fpr_ci"] = wilson(int(det_c["flagged"].sum()), args.n_clean)
    x0 = torch.randn((e.samples, c, size, size), generator=torch.Generator().manual_seed(3000))
    plain = sample(unet, sched, e.samples, sampler=e.sampler, steps=e.steps, x_T=x0)
    defended, _ = defense.sample(x0, sampler=e.sampler, steps=e.steps)
    row["fid"], row["fid_defended"] = (float(evaluator.quality.fid(plain)),
                                       float(evaluator.quality.fid(defended)))
    if spec is not None:
        clf = evaluator.quality.classifier
        # the triggered inputs' seed (1000) is also the sampler's: DDIM ignores it
        m, x_t, tgt = undefended_attack(cfg, unet, sched, evaluator.dataset, clf, 1000,
                                        args.n_triggered)
        det_t = defense.detect(x_t)
        cleaned, _ = defense.sample(x_t, flags=det_t["flagged"], sampler=e.sampler,
                                    steps=e.steps)
        dm = detection_metrics(det_c["score"], det_t["score"], flags_clean=det_c["flagged"],
                               flags_triggered=det_t["flagged"])
        row.update(asr=m["asr"], asr_defended=attack_metrics(cleaned, spec, tgt, clf)["asr"],
                   tpr=dm["tpr"], auroc=dm["auroc"],
                   cosine=cosine(defense.est.mu, true_pattern(spec, size)))
    out = run.with_name(run.name + "-cleansed")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cl = cleanse_run(run, out, log=lambda m: None, force=True)  # clean rows too: its cost
    row["cleanse"] = {k: cl[k] for k in ("before", "after", "seconds")}
    return row


def fmt(v, spec=".3f") -> str:
    return "" if v is None else format(v, spec)


def asr_cell(r: dict) -> str:
    by = r.get("asr_by_sampler") or {}
    if not by:
        return fmt(r.get("asr"))
    return f"{fmt(by.get('ddim-50'))} / {fmt(by.get('dpm-10'))}"


def report(rows: list[dict], verdicts: dict | None = None) -> str:
    """The matrix; the audit column is ``verdicts`` (leave-one-out on the population) when
    given, else the verdict of the rule the row was measured with."""
    verdicts = verdicts or {r["name"]: r["audit"]["verdict"] for r in rows}
    head = ("| model | sampler | ASR (DDIM-50 / DPM-10) | ASR defended | TPR | FPR (95% CI) | "
            "AUROC | FID | FID defended | "
            "audit (leave-one-out) | cosine | ASR cleansed | FID before -> after cleanse | "
            "estimate s |")
    lines = [head, "|" + "---|" * 14]
    for r in (r for r in rows if "cleanse" in r):
        cl = r["cleanse"]
        lines.append(
            f"| {r['name']} | {r.get('sampler', '')} | {asr_cell(r)} | {fmt(r.get('asr_defended'))} | "
            f"{fmt(r.get('tpr'))} | {r['fpr']:.4f} ({r['fpr_ci'][0]:.4f}-{r['fpr_ci'][1]:.4f}) | "
            f"{fmt(r.get('auroc'))} | {r['fid']:.1f} | {r['fid_defended']:.1f} | "
            f"{verdicts[r['name']]} | {fmt(r.get('cosine'), '.2f')} | "
            f"{fmt(cl['after'].get('asr'))} | {cl['before']['fid']:.1f} -> {cl['after']['fid']:.1f} | "
            f"{r['estimate_s']:.0f} |")
    return "\n".join(lines)


def population(rows: list[dict], write_rule: bool) -> tuple[dict, str]:
    stats = [r["audit"] for r in rows]
    truth = [r["status"] == "backdoored" for r in rows]
    loo = leave_one_out(stats, truth)
    hit = np.array([v == "backdoored" for v in loo])
    y = np.array(truth)
    tp, tn = int(hit[y].sum()), int((~hit[~y]).sum())
    rule = calibrate_rule(stats, truth)
    res = {"backdoored": int(y.sum()), "clean": int((~y).sum()),
           "tpr_loo": tp / y.sum(), "tpr_loo_ci": wilson(tp, int(y.sum())),
           "tnr_loo": tn / (~y).sum(), "tnr_loo_ci": wilson(tn, int((~y).sum())),
           "rule_all": {"statistic": rule.statistic, "threshold": rule.threshold,
                        "below": rule.below},
           "loo_verdicts": dict(zip([r["name"] for r in rows], loo, strict=True))}
    if write_rule:
        rule.population = {"source": "benchmarks/security_matrix.py", **{
            k: res[k] for k in ("backdoored", "clean", "tpr_loo", "tpr_loo_ci", "tnr_loo",
                                "tnr_loo_ci")}, "models": [r["name"] for r in rows]}
        rule.save()
    missed = [r["name"] for r, h in zip(rows, hit, strict=True)
              if not h and r["status"] == "backdoored"]
    alarms = [r["name"] for r, h in zip(rows, hit, strict=True) if h and r["status"] == "clean"]
    text = (f"Audit on {res['backdoored']} backdoored + {res['clean']} clean models, "
            f"leave-one-out: TPR {res['tpr_loo']:.2f} ({res['tpr_loo_ci'][0]:.2f}-"
            f"{res['tpr_loo_ci'][1]:.2f}), TNR {res['tnr_loo']:.2f} ({res['tnr_loo_ci'][0]:.2f}-"
            f"{res['tnr_loo_ci'][1]:.2f}); rule on all: {rule}. Missed: "
            f"{', '.join(missed) or 'none'}; false alarms: {', '.join(alarms) or 'none'}")
    return res, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "security-matrix"))
    ap.add_argument("--rows", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--n-triggered", type=int, default=300)
    ap.add_argument("--n-clean", type=int, default=2000)
    ap.add_argument("--fresh", action="store_true", help="recompute the rows asked for")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--write-rule", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "security_matrix"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    write_trigger_files(cache)
    names = [n for n in args.rows.split(",") if n] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"--rows: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if not args.report_only:
        for name in names:
            row_file = cache / name / "row.json"
            if row_file.is_file() and not args.fresh:
                continue
            run = train(cache, name, args.steps)
            row = measure(run, name, args)
            row_file.write_text(json.dumps(row, indent=1, default=float))
            print(report([row]).splitlines()[-1] if "cleanse" in row else
                  f"{name}: audit {row['audit']['verdict']}", flush=True)
    rows = [json.loads((cache / n / "row.json").read_text()) for n in MODELS
            if (cache / n / "row.json").is_file()]
    pop, pop_text = population(rows, args.write_rule) if len({r["status"] for r in rows}) == 2 \
        else ({}, "")
    table = report(rows, pop.get("loo_verdicts"))
    print(table + "\n\n" + pop_text)
    write_json(args.out + ".json", {"rows": rows, "population": pop}, args_config(args))
    Path(args.out + ".md").write_text(table + "\n\n" + pop_text + "\n")


if __name__ == "__main__":
    main()
