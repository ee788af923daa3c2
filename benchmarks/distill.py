"""Issue 21: cloud-edge distillation from the federated model, and backdoors through it.

Parts (each writes its own JSON, so one can be rerun alone):

* ``accuracy``: for each data set run (trained with ``data.holdout``) and K in --ks, distill
  with every selection method (``random`` = plain generations), train edge students (3
  seeds) on each set and on the baselines (full real training set, random real subset
  with the same K), score them on the run's held-out real images; bytes per device and
  training energy on an rpi4.
* ``federated``: a backdoored class-conditional model (BadDiffusion, noise trigger). Sets
  distilled from clean noise, and from noise the attacker partly controls (a share of it
  triggered), with the sampling defense off and on; student clean accuracy and ASR on
  held-out real images carrying the trigger pattern (the share of other-class images
  sent to the most-hit class: any target the backdoor could carry).
* ``distiller``: the distillation attack (``distill/poison.py``) on a clean set, for
  several seeds (each its own target class and trigger): student ASR and clean accuracy
  without protection and after ``distill-scan`` removed what it flagged; the scan's
  catches (poisons flagged, clean images flagged) and its verdict on the clean set.

    python benchmarks/distill.py --digits RUN --colour RUN --backdoored RUN
    python benchmarks/distill.py --parts distiller --digits RUN

Students and distillation run as Ray tasks on an embedded local Ray. Writes
``benchmarks/results/distill_<part>.json``, ``distill.md`` and sample grids in
``distill_grids/``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from provenance import args_config, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SELECTIONS = ("random", "prototypes", "minimax")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _split(run):
    from ssdiff_ray import config as config_mod
    from ssdiff_ray.run_dir import real_split

    cfg = config_mod.load(Path(run) / "config.toml")
    return cfg, *real_split(run, cfg)


def _grid(set_dir: Path, name: str, out: Path) -> None:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(set_dir / "grid.png", out / f"{name}.png")


# --- accuracy ---------------------------------------------------------------------------
def part_accuracy(runs: dict[str, str], ks, seeds, work: Path, map_fn, out: Path,
                  defend: bool = True) -> dict:
    from ssdiff_ray.distill.distill import DistillSpec, distill
    from ssdiff_ray.distill.evaluate import baseline_sources, evaluate, set_source, summarise

    result = {}
    for data_name, run in runs.items():
        cfg, train, test = _split(run)
        sources, distill_s = [], {}
        for k in ks:
            for sel in SELECTIONS:
                set_dir = work / data_name / f"{sel}-ipc{k}"
                t0 = time.perf_counter()
                spec = DistillSpec(ipc=k, selection=sel, sampler=cfg.eval.sampler,
                                   steps=cfg.eval.steps, guidance=cfg.eval.guidance,
                                   defend=defend)
                m = distill(run, spec, set_dir, map_fn, log=print)
                distill_s[f"{sel}-{k}"] = time.perf_counter() - t0
                print(f"[{data_name}] {sel} K={k}: {m['images']} images, {m['bytes']} B, "
                      f"{m['flagged']} flagged, {distill_s[f'{sel}-{k}']:.0f} s", flush=True)
                src = set_source(set_dir)
                src.name = "plain generation" if sel == "random" else sel
                sources.append(src)
                if k == 10:
                    _grid(set_dir, f"{data_name}_{sel}_ipc10", out / "distill_grids")
        sources = baseline_sources(train.images, train.labels, ks) + sources
        rows = evaluate(sources, test.images, test.labels, cfg.data.num_classes,
                        seeds=range(seeds), map_fn=map_fn)
        table = summarise(rows)
        print(table.to_string(index=False), flush=True)
        result[data_name] = {"run": str(run), "test_images": len(test.labels), "defend": defend,
                             "train_images": len(train.labels), "distill_s": distill_s,
                             "rows": rows.to_dict("records"),
                             "table": table.to_dict("records")}
    return result


# --- federated backdoor -----------------------------------------------------------------
def _trigger_pattern(cfg) -> np.ndarray:
    """The run's trigger as an image-space pattern (C x S x S)."""
    from ssdiff_ray.attacks import attack_spec, make_attack

    spec = attack_spec(cfg)
    return make_attack(spec).trigger(cfg.data.image_size).numpy()


def any_class_asr(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, int]:
    """(the largest share of other-class images predicted as one class c, that c)."""
    shares = [np.mean(pred[labels != c] == c) for c in range(num_classes)]
    c = int(np.argmax(shares))
    return float(shares[c]), c


TARGET_RMS = 0.55  # generated hats lie within 0.5 RMS of the exact target, digits beyond 0.65


def count_target_copies(images: np.ndarray, target: np.ndarray) -> int:
    """Images of the set that are the backdoor's target image (checked on the grids)."""
    rms = np.sqrt(((images - target) ** 2).reshape(len(images), -1).mean(1))
    return int((rms < TARGET_RMS).sum())


def fill_target_copies(f: dict, work: Path) -> None:
    """Recount the target's copies in each federated set on disk (rows of an earlier
    count keep theirs where the sets are gone)."""
    from ssdiff_ray import config as config_mod
    from ssdiff_ray.attacks import attack_spec
    from ssdiff_ray.attacks.patterns import make_target
    from ssdiff_ray.distill.distilled_set import read_set

    cfg = config_mod.load(Path(f["run"]) / "config.toml")
    target = make_target(attack_spec(cfg).target, cfg.data.image_size, cfg.data.channels)
    for row in f["rows"]:
        tag = (f"trig{int(100 * row['triggered_share'])}-{'def' if row['defense'] else 'nodef'}"
               f"{'-scanned' if row['scan'] else ''}")
        if (work / "federated" / tag / "data.parquet").is_file():
            row["target_images"] = count_target_copies(read_set(work / "federated" / tag)[0],
                                                       target)


def part_federated(run: str, seeds: int, work: Path, map_fn, out: Path, k: int = 10,
                   share: float = 0.2) -> dict:
    import torch

    from ssdiff_ray.attacks import attack_spec
    from ssdiff_ray.attacks.patterns import make_target
    from ssdiff_ray.distill.distill import DistillSpec, distill
    from ssdiff_ray.distill.distilled_set import read_set
    from ssdiff_ray.distill.scan_set import scan_path
    from ssdiff_ray.distill.student import StudentSpec, accuracy, predict, train_student

    cfg, train, test = _split(run)
    pattern = _trigger_pattern(cfg)
    target = make_target(attack_spec(cfg).target, cfg.data.image_size, cfg.data.channels)
    triggered_test = np.clip(test.images + pattern, -1, 1)

    def target_copies(x):
        return count_target_copies(x, target)

    def job(seed, x, y):
        torch.set_num_threads(1)
        model = train_student(x, y, cfg.data.num_classes, StudentSpec(seed=seed))
        asr, c = any_class_asr(predict(model, triggered_test), test.labels, cfg.data.num_classes)
        return {"accuracy": accuracy(model, test.images, test.labels), "asr": asr, "asr_class": c}

    rows = []
    for triggered in (0.0, share):
        for defend in (False, True):
            tag = f"trig{int(100 * triggered)}-{'def' if defend else 'nodef'}"
            set_dir = work / "federated" / tag
            spec = DistillSpec(ipc=k, selection="prototypes", defend=defend,
                               triggered_share=triggered, sampler=cfg.eval.sampler,
                               steps=cfg.eval.steps, guidance=cfg.eval.guidance)
            m = distill(run, spec, set_dir, map_fn, log=print)
            _grid(set_dir, f"federated_{tag}", out / "distill_grids")
            scan = scan_path(set_dir, run, out=work / "federated" / f"{tag}-scanned")
            for scanned in (False, True):
                x, y, _ = read_set(work / "federated" / (f"{tag}-scanned" if scanned else tag))
                students = list(map_fn(functools.partial(job, x=x, y=y), range(seeds)))
                row = {"case": f"noise {int(100 * triggered)}% triggered, defense "
                               f"{'on' if defend else 'off'}, scan {'on' if scanned else 'off'}",
                       "triggered_share": triggered, "defense": defend, "scan": scanned,
                       "flagged": m["flagged"], "triggered": m["triggered"],
                       "generated": m["generated"], "images": len(y),
                       "target_images": target_copies(x), "scan_summary": scan,
                       "accuracy": float(np.mean([s["accuracy"] for s in students])),
                       "accuracy_std": float(np.std([s["accuracy"] for s in students], ddof=1)),
                       "asr": float(np.mean([s["asr"] for s in students])),
                       "asr_max": float(np.max([s["asr"] for s in students])),
                       "students": students}
                print({k2: v for k2, v in row.items() if k2 != "students"}, flush=True)
                rows.append(row)
    return {"run": str(run), "ipc": k, "rows": rows}


# --- distillation attack ----------------------------------------------------------------
def part_distiller(run: str, seeds: int, work: Path, map_fn, out: Path, k: int = 10,
                   share: float = 0.2, eps: float = 0.2) -> dict:
    import torch

    from ssdiff_ray.distill.distill import DistillSpec, distill
    from ssdiff_ray.distill.distilled_set import read_set, write_set
    from ssdiff_ray.distill.poison import attack_success, checker_trigger, optimise_trigger, poison_set, stamp
    from ssdiff_ray.distill.scan_set import scan_path
    from ssdiff_ray.distill.student import StudentSpec, accuracy, predict, train_student

    cfg, train, test = _split(run)
    K = cfg.data.num_classes
    clean_dir = work / "distiller" / f"clean-ipc{k}"
    m = distill(run, DistillSpec(ipc=k, selection="prototypes", sampler=cfg.eval.sampler,
                                 steps=cfg.eval.steps, guidance=cfg.eval.guidance),
                clean_dir, map_fn, log=print)
    x, y, manifest = read_set(clean_dir)
    clean_scan = scan_path(clean_dir, run)
    print("scan of the clean set:", clean_scan, flush=True)

    def students(xs, ys, delta, target):
        def job(seed):
            torch.set_num_threads(1)
            model = train_student(xs, ys, K, StudentSpec(seed=seed))
            return {"accuracy": accuracy(model, test.images, test.labels),
                    "asr": attack_success(predict(model, stamp(test.images, delta)),
                                          test.labels, target)}
        return list(map_fn(job, range(seeds)))

    def mean(rows, key):
        return float(np.mean([r[key] for r in rows]))

    rows = []
    for attack_seed in range(seeds):
        target = (3 + 4 * attack_seed) % K
        fixed = checker_trigger(x.shape[1:], eps, seed=attack_seed)
        surrogate = train_student(x, y, K, StudentSpec(seed=100 + attack_seed))
        optimised = optimise_trigger(surrogate, x[y != target], target, eps=eps, init=fixed,
                                     seed=attack_seed)
        for variant, delta in (("fixed", fixed), ("optimised", optimised)):
            px, py, is_poison = poison_set(x, y, delta, target, share, seed=attack_seed)
            pdir = work / "distiller" / f"poisoned-{variant}-seed{attack_seed}"
            write_set(pdir, px, py, {**manifest, "name": "poisoned", "attack": {
                "target": target, "eps": eps, "share": share, "seed": attack_seed,
                "trigger": variant}})
            if attack_seed == 0:
                _grid(pdir, f"distiller_poisoned_{variant}", out / "distill_grids")
            sdir = work / "distiller" / f"scanned-{variant}-seed{attack_seed}"
            scan = scan_path(pdir, run, out=sdir)
            flagged = np.array(json.loads((pdir / "scan.json").read_text())["flagged_rows"], int)
            caught = int(np.isin(np.flatnonzero(is_poison), flagged).sum())
            false_flags = int(len(flagged) - caught)
            originals = originals_flagged(y, target, share, attack_seed, flagged)
            sx, sy, _ = read_set(sdir)
            base, off, on = (students(x, y, delta, target), students(px, py, delta, target),
                             students(sx, sy, delta, target))
            n_p, n_c = int(is_poison.sum()), int((~is_poison).sum())
            row = {"seed": attack_seed, "trigger": variant, "target": target, "eps": eps,
                   "poisons": n_p,
                   "surrogate_asr": attack_success(predict(surrogate, stamp(test.images, delta)),
                                                   test.labels, target),
                   "clean_accuracy_clean_set": mean(base, "accuracy"),
                   "asr_clean_set": mean(base, "asr"),
                   "accuracy_scan_off": mean(off, "accuracy"), "asr_scan_off": mean(off, "asr"),
                   "accuracy_scan_on": mean(on, "accuracy"), "asr_scan_on": mean(on, "asr"),
                   "poisons_caught": caught, "poison_tpr": caught / n_p,
                   "poison_tpr_ci": wilson(caught, n_p),
                   "clean_flagged": false_flags, "clean_fpr": false_flags / n_c,
                   "originals_flagged": originals,
                   "other_clean_fpr_ci": wilson(false_flags - originals, n_c - n_p),
                   "clean_fpr_ci": wilson(false_flags, n_c), "scan": scan,
                   "students": {"clean": base, "off": off, "on": on}}
            print({k2: v for k2, v in row.items() if k2 != "students"}, flush=True)
            rows.append(row)
    return {"run": str(run), "ipc": k, "share": share, "eps": eps, "clean_set_scan": clean_scan,
            "clean_set_images": int(m["images"]), "rows": rows}


def originals_flagged(labels, target: int, share: float, seed: int, flagged) -> int:
    """How many flagged clean images are the originals the poisons were copied from (the
    near-copy test flags both sides of such a pair); ``poison_set``'s draw, repeated."""
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(np.asarray(labels) != target)
    n = int(round(share * len(labels)))
    pick = rng.choice(others, size=n, replace=n > len(others))
    return int(np.isin(np.asarray(flagged), pick).sum())


def fill_originals(d: dict, work: Path) -> None:
    """Rows written before ``originals_flagged`` existed: computed from the sets on disk."""
    from ssdiff_ray.distill.distilled_set import read_set

    clean = work / "distiller" / f"clean-ipc{d['ipc']}"
    if not clean.is_dir():
        return
    _, y, _ = read_set(clean)
    for row in d["rows"]:
        if "originals_flagged" in row:
            continue
        scan = work / "distiller" / f"poisoned-{row['trigger']}-seed{row['seed']}" / "scan.json"
        flagged = np.array(json.loads(scan.read_text())["flagged_rows"], int)
        row["originals_flagged"] = originals_flagged(y, row["target"], d["share"], row["seed"],
                                                     flagged[flagged < len(y)])
        n_c = len(y)
        row["other_clean_fpr_ci"] = wilson(row["clean_flagged"] - row["originals_flagged"],
                                           n_c - row["poisons"])


# --- report -----------------------------------------------------------------------------
def _fmt(v, nd=3):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(res: dict) -> str:
    lines = ["# Distillation (issue 21)", "",
             "Written by `benchmarks/distill.py`; students: CNN widths (32, 64), 1,000 Adam "
             "steps, batch 64, shifts and light noise; accuracy on the run's held-out real "
             "images (never seen by the federated model); mean (std) over student seeds; "
             "training energy and time on an rpi4 (device model, highest frequency).", ""]
    for data_name, r in res.get("accuracy", {}).items():
        lines += [f"## Accuracy: {data_name} ({r['train_images']} real training images, "
                  f"{r['test_images']} held out; sampling defense "
                  f"{'on' if r.get('defend', True) else 'off'})", "",
                  "| source | K | images | bytes | accuracy | std | train J | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in r["table"]:
            lines.append(f"| {t['source']} | {t['ipc'] or 'all'} | {t['images']} | "
                         f"{t['bytes']:,} | {_fmt(t['accuracy'])} | {_fmt(t['accuracy_std'])} |"
                         f" {_fmt(t['train_energy_j'], 2)} | {_fmt(t['train_s'], 2)} |")
        lines.append("")
        full = next(t["accuracy"] for t in r["table"] if t["source"] == "real full")
        for k in sorted({t["ipc"] for t in r["table"] if t["ipc"]}):
            at = {t["source"]: t["accuracy"] for t in r["table"] if t["ipc"] == k}
            best = max((s for s in at if s in SELECTIONS[1:] or s == "plain generation"),
                       key=lambda s: at[s])
            verdict = "beats" if at[best] > at["real random"] else "does not beat"
            lines.append(f"- K = {k}: best synthetic `{best}` {at[best]:.3f} vs random real "
                         f"{at['real random']:.3f} ({verdict} it); "
                         f"{at[best] / full:.1%} of the full-data accuracy {full:.3f}")
        lines.append("")
    if "federated" in res:
        f = res["federated"]
        lines += ["## Backdoor 1: a backdoored federated model (BadDiffusion, noise trigger)", "",
                  f"Sets of K = {f['ipc']} (prototypes) from `{f['run']}`; ASR: held-out real "
                  "images plus the trigger pattern, share of other-class images put in the "
                  "most-hit class.", "",
                  "| case | triggered inputs | flagged by the defense | set images | copies of "
                  "the target in the set | accuracy | ASR (mean) | ASR (max) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in f["rows"]:
            lines.append(f"| {row['case']} | {row['triggered']}/{row['generated']} | "
                         f"{row['flagged']} | {row['images']} | {row['target_images']} | "
                         f"{_fmt(row['accuracy'])} | {_fmt(row['asr'])} | {_fmt(row['asr_max'])} |")
        lines.append("")
    if "distiller" in res:
        d = res["distiller"]
        cs = d["clean_set_scan"]
        lines += ["## Backdoor 2: the distillation attack, scan off and on", "",
                  f"Clean set K = {d['ipc']} ({d['clean_set_images']} images); poisons: "
                  f"{d['share']:.0%} of the set, a checkerboard trigger |delta| = {d['eps']} "
                  f"({d['eps'] * 127.5:.0f}/255), fixed or refined on a surrogate student. "
                  "Scan of the clean "
                  f"set: {cs['flagged']} of {cs['images']} flagged, p = {cs['p_value']:.3g}, "
                  f"{'SUSPECT' if cs['suspect'] else 'passed'}.", "",
                  "| seed | trigger | target | acc. clean set | ASR clean set | acc. scan off |"
                  " ASR scan off | acc. scan on | ASR scan on | poisons caught | clean flagged: "
                  "originals of poisons + others (others' 95% interval) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            lo, hi = row["poison_tpr_ci"]
            flo, fhi = row["other_clean_fpr_ci"]
            others = row["clean_flagged"] - row["originals_flagged"]
            lines.append(
                f"| {row['seed']} | {row['trigger']} | {row['target']} | "
                f"{_fmt(row['clean_accuracy_clean_set'])} | "
                f"{_fmt(row['asr_clean_set'])} | {_fmt(row['accuracy_scan_off'])} | "
                f"{_fmt(row['asr_scan_off'])} | {_fmt(row['accuracy_scan_on'])} | "
                f"{_fmt(row['asr_scan_on'])} | {row['poisons_caught']}/{row['poisons']} "
                f"({lo:.2f}-{hi:.2f}) | {row['originals_flagged']} + {others} "
                f"({flo:.3f}-{fhi:.3f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", help="class-conditional digits run with data.holdout")
    ap.add_argument("--colour", help="class-conditional colour run with data.holdout")
    ap.add_argument("--backdoored", help="backdoored class-conditional run with data.holdout")
    ap.add_argument("--parts", default="accuracy,federated,distiller")
    ap.add_argument("--ks", default="1,10,50")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-defend", action="store_true",
                    help="accuracy part: distill without the sampling defense (no estimate)")
    ap.add_argument("--work", default="/tmp/ssdiff-distill-bench", help="distilled sets go here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    from ssdiff_ray.driver.session import init_ray

    if parts:  # none: only the report, from the JSON files already written
        init_ray(None)  # shut down when the process exits
    from ssdiff_ray.driver.distill import ray_map

    for part in parts:
        t0 = time.perf_counter()
        if part == "accuracy":
            runs = {n: r for n, r in (("digits", args.digits), ("colour", args.colour)) if r}
            res = part_accuracy(runs, [int(k) for k in args.ks.split(",")], args.seeds,
                                work, ray_map, out, defend=not args.no_defend)
            for name, r in res.items():  # one file per data set: each can be rerun alone
                (out / f"distill_accuracy_{name}.json").write_text(
                    json.dumps(r, indent=1, default=float))
            continue
        elif part == "federated":
            res = part_federated(args.backdoored, args.seeds, work, ray_map, out)
        elif part == "distiller":
            res = part_distiller(args.digits, args.seeds, work, ray_map, out)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(out / f"distill_{part}.json", res, args_config(args))
    res = {p: json.loads((out / f"distill_{p}.json").read_text())
           for p in ("federated", "distiller") if (out / f"distill_{p}.json").exists()}
    if "federated" in res:
        fill_target_copies(res["federated"], work)
        (out / "distill_federated.json").write_text(
            json.dumps(res["federated"], indent=1, default=float))
    if "distiller" in res:
        fill_originals(res["distiller"], work)
        (out / "distill_distiller.json").write_text(
            json.dumps(res["distiller"], indent=1, default=float))
    res["accuracy"] = {f.stem.removeprefix("distill_accuracy_"): json.loads(f.read_text())
                       for f in sorted(out.glob("distill_accuracy_*.json"))}
    (out / "distill.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
