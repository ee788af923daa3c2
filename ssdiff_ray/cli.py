"""``ssdiff``: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ssdiff_ray.attacks import TRIGGERS
from ssdiff_ray.devices import DEVICE_CLASSES
from ssdiff_ray.errors import UserError
from ssdiff_ray.model import PRESETS


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(s: dict) -> None:
    rows = [
        ("run directory", s["run_dir"]),
        ("rounds", s["rounds"]),
        ("clients / pools", f"{s['clients']} / {s['pools']}"),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("FID (final)", f"{s['fid']:.2f}"),
    ]
    if "fid_untrained" in s:
        rows.append(("FID untrained / real floor",
                     f"{s['fid_untrained']:.2f} / {s.get('fid_floor', math.nan):.2f}"))
    rows += [
        ("classes present", s.get("classes_present", "")),
        ("uplink bytes", _fmt_bytes(s["uplink_bytes"])),
        ("downlink bytes", _fmt_bytes(s["downlink_bytes"])),
        ("device energy", f"{s['energy_j']:.1f} J"),
        ("stragglers", s["stragglers"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_run(args) -> int:
    from ssdiff_ray import api, config

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.toml)")
        cfg = config.load(run_dir / "config.toml", args.set)
    else:
        cfg = config.load(args.config, args.set)
    summary = api.run(cfg, address=args.address, resume=args.resume,
                      progress=not args.quiet)
    print_summary(summary)
    return 0


def cmd_pretrain(args) -> int:
    from ssdiff_ray import config
    from ssdiff_ray.pretrain import pretrain

    cfg = config.load(args.config, args.set)
    res = pretrain(cfg, args.out, args.steps)
    print(f"pretrained {res['params']:,} parameters on {res['images']} images (classes "
          f"{res['classes']}) for {res['steps']} steps in {res['wall_s']:.0f} s, loss "
          f"{res['loss']:.4f}\nsaved: {res['out']} (use --set model.pretrained={res['out']})")
    return 0


def cmd_report(args) -> int:
    from ssdiff_ray.report import report
    from ssdiff_ray.report_html import report_html

    totals = report(args.run_dir)
    page = report_html(args.run_dir)
    by_class = totals.pop("energy_by_class_j")
    width = max(len(k) for k in totals)
    for k, v in totals.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    print("  energy by device class (J): " + ", ".join(f"{k} {v:.1f}" for k, v in by_class.items()))
    print(f"  plots: {Path(args.run_dir) / 'report.png'}\n  page:  {page}")
    return 0


def cmd_compare(args) -> int:
    from ssdiff_ray.report import compare
    from ssdiff_ray.report_html import compare_html

    table = compare(args.run_dirs, args.out)
    page = compare_html(args.run_dirs, table, Path(args.out).with_suffix(".html"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"plot: {args.out}\npage: {page}")
    return 0


def cmd_sample(args) -> int:
    from ssdiff_ray.inference import sample_run

    res = sample_run(args.run_dir, args.n, args.trigger, args.defend, args.seed, args.out,
                     args.class_name, args.guidance, args.refresh)
    what = f", class {res['class']}" if res["class"] is not None else ""
    print(f"{res['n']} samples ({'triggered: ' + res['trigger'] if res['trigger'] else 'clean'}"
          f" inputs{what}, defense {'on' if res['defended'] else 'off'}): {res['flagged']} flagged")
    print(f"grid: {res['png']}\nrecord: {res['record']}")
    return 0


def cmd_evaluate(args) -> int:
    from ssdiff_ray.evaluate_model import evaluate_model, table

    res = evaluate_model(args.model, args.like, args.out, args.seed)
    print(f"{res['model']} scored like {res['like']} ({res['n']} samples, {res['sampler']}, "
          f"seed {res['seed']}, {res['feature_space']} space):")
    print(table(res))
    print(f"grid: {res['grid']}\nrecord: {res['out']}")
    return 0


def cmd_cleanse(args) -> int:
    from ssdiff_ray.defense.cleanse import CleanseOptions
    from ssdiff_ray.inference import cleanse_run

    if args.steps < 1 or not args.lr > 0:
        raise UserError(f"--steps {args.steps} / --lr {args.lr}: need steps >= 1 and lr > 0")
    res = cleanse_run(args.run_dir, args.out, CleanseOptions(steps=args.steps, lr=args.lr),
                      args.seed, args.refresh, force=args.force)
    for when in ("before", "after"):
        m = res[when]
        by = ", ".join(f"{k} {v:.3f}" for k, v in m.get("asr_by_sampler", {}).items())
        asr = f", ASR {m['asr']:.3f} (highest of {by})" if "asr" in m else ""
        print(f"{when}: FID {m['fid']:.1f}, trigger spread ratio "
              f"{m['trigger_spread_ratio']:.3f}{asr}")
    print(f"cleansed model: {res['out']} ({res['seconds']:.0f} s)")
    return 0


def cmd_audit(args) -> int:
    from ssdiff_ray.inference import audit_run

    res = audit_run(args.run_dir, args.seed, args.refresh)
    print(f"verdict: {res.get('verdict')}")
    for k, v in res.items():
        if k != "verdict" and not isinstance(v, list):
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _with_ray(address, fn):
    """fn(map_fn) with map_fn running Ray tasks: embedded local Ray unless ``address``."""
    from ssdiff_ray.driver.distill import ray_map
    from ssdiff_ray.driver.session import ray_session

    with ray_session(address):
        return fn(ray_map)


def _distill_run(run_dir: str):
    """(config, class names) of a run directory, or a UserError."""
    from ssdiff_ray import config as config_mod
    from ssdiff_ray.inference import class_names

    if not (Path(run_dir) / "config.toml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = config_mod.load(Path(run_dir) / "config.toml")
    return cfg, class_names(run_dir, cfg)


def cmd_distill(args) -> int:
    from ssdiff_ray.distill.distill import DistillSpec, check_request, distill, parse_classes

    cfg, names = _distill_run(args.run_dir)
    spec = DistillSpec(ipc=args.ipc, selection=args.selection, pool=args.pool,
                       defend=args.defend, sampler=args.sampler or cfg.eval.sampler,
                       steps=args.steps or cfg.eval.steps,
                       guidance=cfg.eval.guidance if args.guidance is None else args.guidance,
                       seed=args.seed, triggered_share=args.triggered_share,
                       classes=parse_classes(args.classes, names) if names else ())
    check_request(args.run_dir, spec, names)  # before Ray starts
    m = _with_ray(args.address, lambda map_fn: distill(args.run_dir, spec, args.out,
                                                       map_fn, log=print))
    print(f"{m['images']} images ({spec.ipc} per class x {len(m['per_class'])} classes, "
          f"{m['selection']} of {m['generated']} generated, {m['flagged']} inputs flagged by "
          f"the defense{'' if spec.defend else ': defense off'}), {_fmt_bytes(m['bytes'])}, "
          f"{m['seconds']:.0f} s\nset: {m['out']} (data.parquet, manifest.json, grid.png)")
    return 0


def cmd_distill_eval(args) -> int:
    from ssdiff_ray.distill.evaluate import baseline_sources, evaluate, set_source, summarise
    from ssdiff_ray.distill.student import StudentSpec
    from ssdiff_ray.run_dir import real_split

    cfg, _names = _distill_run(args.run_dir)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise UserError(f"--widths {args.widths!r}: expected channel counts like 16,32") from None
    if not widths or min(widths) < 1 or args.steps < 1 or args.seeds < 1:
        raise UserError("--widths, --steps and --seeds must be positive")
    train, test = real_split(args.run_dir, cfg)
    sources = [set_source(s) for s in args.sets]
    if args.baselines:
        sources = baseline_sources(train.images, train.labels,
                                   [s.ipc for s in sources] or [10]) + sources
    spec = StudentSpec(widths=widths, steps=args.steps)
    rows = _with_ray(args.address, lambda map_fn: evaluate(
        sources, test.images, test.labels, cfg.data.num_classes, spec,
        range(args.seeds), args.device, map_fn))
    out = Path(args.out) if args.out else Path(args.run_dir) / "distill" / "eval.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(out, index=False)
    table = summarise(rows)
    print(f"students: CNN widths {widths}, {args.steps} steps, {args.seeds} seeds; accuracy "
          f"on {len(test.labels)} held-out real images; costs on a {args.device}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"rows: {out}")
    return 0


def cmd_distill_scan(args) -> int:
    from ssdiff_ray.distill.scan_set import scan_path

    res = scan_path(args.set_dir, args.run, args.alpha, args.out)
    print(f"{res['flagged']} of {res['images']} images flagged (threshold {res['threshold']:.4g},"
          f" p = {res['p_value']:.3g}): {'SUSPECT' if res['suspect'] else 'no shared trigger found'}")
    if res.get("out"):
        print(f"set without the flagged images: {res['out']}")
    return 1 if res["suspect"] and not res.get("out") else 0


def cmd_submit(args) -> int:
    from ssdiff_ray.driver import jobs

    c, jid = jobs.submit(args.address, args.command, working_dir=args.working_dir,
                        env_file=args.runtime_env, pip=args.pip, job_id=args.job_id,
                        num_cpus=args.entrypoint_cpus)
    print(f"submitted {jid} to {jobs.job_address(args.address)}", file=sys.stderr)
    if not args.follow:
        print(jid)
        return 0
    status = jobs.follow(c, jid)
    print(f"job {jid}: {status}", file=sys.stderr)
    return jobs.EXIT.get(status, 1)


def cmd_jobs(args) -> int:
    from ssdiff_ray.driver import jobs

    rows = jobs.list_jobs(args.address)
    if not rows:
        print("no jobs")
    for r in rows:
        print(f"{r['job']:<32} {r['status']:<10} {r['start']:<19}  {r['entrypoint']}")
    return 0


def cmd_stop(args) -> int:
    from ssdiff_ray.driver import jobs

    stopped = jobs.stop(args.address, args.job)
    print(f"{args.job}: {'stopping' if stopped else 'already finished'}")
    return 0


def cmd_stress(args) -> int:
    from ssdiff_ray import config

    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--clients {args.clients!r}: expected counts like 100,250,500") from None
    if not counts or min(counts) < 1:
        raise UserError(f"--clients {args.clients!r}: expected positive counts like 100,250,500")
    config.load(None, [f"model.preset={args.preset}", f"clients.per_round={args.per_round}",
                       *args.set])  # bad values stop here, before Ray starts
    from ssdiff_ray.driver.session import ray_session
    from ssdiff_ray.driver.stress import run_stress

    with ray_session(args.address):
        res = run_stress(counts, Path(args.out), preset=args.preset, rounds=args.rounds,
                         per_round=args.per_round, extra=args.set,
                         checkpoint_every=args.checkpoint_every)
    per = res["per_count"]
    cols = ["clients", "selected", "wall_s", "overhead_ms_per_client", "driver_rss_mib",
            "server_rss_mib", "pools_rss_mib", "object_store_mib"]
    print(per[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    f = res["fits"]
    t, m = f["wall_s_vs_selected"], f["total_rss_mib_vs_clients"]
    print(f"fit: round wall = {t['intercept']:.3f} s + {1e3 * t['slope']:.2f} ms x selected "
          f"(R^2 {t['r2']:.3f})")
    print(f"fit: total RSS = {m['intercept']:.0f} MiB + {1024 * m['slope']:.1f} KiB x clients "
          f"(R^2 {m['r2']:.3f}, quadratic share {m.get('quadratic_share', 0):.3f})")
    if "idle_bytes_per_client_after_rounds" in f:
        print(f"idle client: {f['idle_bytes_per_client_registered']:.0f} bytes of RAM registered, "
              f"{f['idle_bytes_per_client_after_rounds']:.0f} after the rounds (less the "
              "residual caches)")
    for r in per.itertuples():
        print(f"{r.clients} clients: peak RSS {r.peak_rss_total_mib:.0f} MiB (PSS "
              f"{r.peak_pss_total_mib:.0f}), residuals {r.state_entries} ({r.state_ram_bytes_mib:.0f}"
              f" MiB RAM, {r.state_disk_bytes_mib:.0f} MiB disk), checkpoint "
              f"{r.checkpoint_s:.2f} s = {r.checkpoint_over_round:.2f} x a round, "
              f"{r.checkpoint_bytes_mib:.0f} MiB")
    print("files: " + ", ".join(res["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_cluster_commands(sub)
    _add_distill_commands(sub)
    from ssdiff_ray.service.cli import add_parsers as add_service  # argparse only; Serve loads when run
    from tuning.cli import add_parser as add_tune  # argparse only; optuna/ray load when run

    add_tune(sub)
    add_service(sub)
    return p


def _add_run_commands(sub) -> None:
    """run, report, compare."""
    r = sub.add_parser("run", help="run federated DDPM training")
    r.add_argument("--config", help="TOML config file (defaults apply to anything not set)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else embedded local Ray)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    pt = sub.add_parser("pretrain", help="train a base model centrally and save it as a "
                        "diffusers pipeline (for model.pretrained)")
    pt.add_argument("--config", help="TOML config file ([data], [model], [train] apply)")
    pt.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pt.add_argument("--steps", type=int, default=3000, help="Adam steps")
    pt.add_argument("--out", required=True, help="directory to save the pipeline to (new)")
    pt.set_defaults(func=cmd_pretrain)

    rep = sub.add_parser("report", help="plots, totals and a self-contained report.html of a run")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="overlay runs: energy vs FID")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", default="compare.png", help="PNG to write (and the page beside it, "
                      ".html)")
    cmp_.set_defaults(func=cmd_compare)


def _trigger_arg(value: str) -> str:
    from ssdiff_ray.attacks.patterns import is_pattern_file

    if value in TRIGGERS or is_pattern_file(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(TRIGGERS)} or a "
                                     ".png / .npy file")


def _add_model_commands(sub) -> None:
    """Commands on a finished run's model: sample, audit, evaluate, cleanse."""
    smp = sub.add_parser("sample", help="sample a run's model, with the backdoor defense")
    smp.add_argument("run_dir")
    smp.add_argument("--n", type=int, default=64)
    smp.add_argument("--trigger", type=_trigger_arg, metavar="|".join(TRIGGERS) + "|FILE",
                     help="start from triggered noise (to test the defense); a .png / .npy "
                     "file is a trigger of the run's attack kind")
    smp.add_argument("--class", dest="class_name", metavar="K",
                     help="generate this class (index or name) of a class-conditional model")
    smp.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the run's eval.guidance)")
    smp.add_argument("--defend", action=argparse.BooleanOptionalAction, default=True)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", help="PNG path (default RUN_DIR/sample_<trigger>.png)")
    smp.add_argument("--refresh", action="store_true",
                     help="estimate the trigger anew (default: reuse RUN_DIR/defense/)")
    smp.set_defaults(func=cmd_sample)

    aud = sub.add_parser("audit", help="does the run's model look backdoored?")
    aud.add_argument("run_dir")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--refresh", action="store_true",
                     help="estimate and audit anew (default: reuse RUN_DIR/defense/)")
    aud.set_defaults(func=cmd_audit)

    ev = sub.add_parser("evaluate", help="score a saved diffusers model (centralized, "
                        "pretrained, cleansed, downloaded) in a run's quality space")
    ev.add_argument("model", help="a diffusers pipeline or UNet directory (or a run's model/)")
    ev.add_argument("--like", required=True, metavar="RUN",
                    help="the run whose data, feature space, sampler and seed score it")
    ev.add_argument("--out", help="JSON path (default RUN/evaluations/<model>.json; the grid "
                    "goes beside it)")
    ev.add_argument("--seed", type=int, default=None,
                    help="sampling seed (default: the run's final evaluation's)")
    ev.set_defaults(func=cmd_evaluate)

    cl = sub.add_parser("cleanse", help="fine-tune the backdoor out of a run's model "
                        "(Elijah-style, with its estimated trigger); writes a new run directory")
    cl.add_argument("run_dir")
    cl.add_argument("--out", help="new run directory (default RUN_DIR-cleansed)")
    cl.add_argument("--steps", type=int, default=500, help="Adam steps")
    cl.add_argument("--lr", type=float, default=5e-4)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--refresh", action="store_true",
                    help="estimate the trigger anew (default: reuse RUN_DIR/defense/)")
    cl.add_argument("--force", action="store_true",
                    help="cleanse even a model the audit calls clean (costs quality)")
    cl.set_defaults(func=cmd_cleanse)


def _add_distill_commands(sub) -> None:
    """distill, distill-eval, distill-scan."""
    from ssdiff_ray.distill import SELECTIONS

    d = sub.add_parser("distill", help="a small labelled synthetic data set (K images per "
                       "class) from a class-conditional run, for edge devices")
    d.add_argument("run_dir")
    d.add_argument("--ipc", type=int, default=10, help="images per class (K)")
    d.add_argument("--selection", default="prototypes", choices=tuple(SELECTIONS))
    d.add_argument("--pool", type=int, default=0, help="candidates generated per kept image "
                   "(default: the method's, 5; random keeps its first K)")
    d.add_argument("--classes", default="", help="only these classes ('3,7' or names)")
    d.add_argument("--defend", action=argparse.BooleanOptionalAction, default=True,
                   help="never generate from noise the sampling defense flags")
    d.add_argument("--sampler", default=None, help="default: the run's eval.sampler")
    d.add_argument("--steps", type=int, default=0, help="default: the run's eval.steps")
    d.add_argument("--guidance", type=float, default=None, help="default: eval.guidance")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--triggered-share", type=float, default=0.0,
                   help="red team: share of the noise carrying the run's attack trigger")
    d.add_argument("--out", help="directory (default RUN_DIR/distill/<selection>-ipc<K>)")
    d.add_argument("--address", default=None, help="Ray cluster to join (default: embedded)")
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("distill-eval", help="edge students trained on distilled sets and "
                       "baselines, scored on the run's held-out real data")
    e.add_argument("run_dir", help="the run (its held-out data: data.holdout)")
    e.add_argument("sets", nargs="*", help="distilled set directories")
    e.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also the full real set and random real subsets at the sets' K")
    e.add_argument("--widths", default="32,64", help="the student CNN's conv channels")
    e.add_argument("--steps", type=int, default=1000, help="student training steps")
    e.add_argument("--seeds", type=int, default=3, help="students per source")
    e.add_argument("--device", default="rpi4", choices=tuple(DEVICE_CLASSES),
                   help="device class for the training energy")
    e.add_argument("--out", help="Parquet of every student (default RUN_DIR/distill/eval.parquet)")
    e.add_argument("--address", default=None, help="Ray cluster to join (default: embedded)")
    e.set_defaults(func=cmd_distill_eval)

    s = sub.add_parser("distill-scan", help="does a synthetic set carry a shared trigger? "
                       "(exit 1 if so)")
    s.add_argument("set_dir")
    s.add_argument("--run", required=True, help="the run whose model made the set (its "
                   "judge; never taken from the set's own manifest)")
    s.add_argument("--alpha", type=float, default=0.01, help="false-positive rate per image")
    s.add_argument("--out", help="write the set without the flagged images here")
    s.set_defaults(func=cmd_distill_scan)


def _add_cluster_commands(sub) -> None:
    """Ray jobs on a cluster (submit, jobs, stop) and the stress harness."""
    addr_help = "Ray Jobs API (dashboard) URL, e.g. http://HEAD:8265 (default: RAY_JOB_ADDRESS)"
    sb = sub.add_parser("submit", help="submit run / tune / stress as a Ray job to a cluster",
                        usage="ssdiff submit [--address URL] [--follow] [options] -- run|tune|stress ...")
    sb.add_argument("--address", help=addr_help)
    sb.add_argument("--follow", action="store_true",
                    help="stream the job's logs until it ends; exit with its status")
    sb.add_argument("--working-dir", help="upload this directory as the job's working dir "
                    "(default: the package is installed on the nodes)")
    sb.add_argument("--runtime-env", metavar="YAML", help="runtime_env file (cluster/runtime_env.yaml)")
    sb.add_argument("--pip", action="append", default=[], help="pip package for the job (repeatable)")
    sb.add_argument("--job-id", help="submission id (default: generated)")
    sb.add_argument("--entrypoint-cpus", type=float, default=None,
                    help="CPUs reserved for the driver (default 0)")
    sb.add_argument("command", nargs=argparse.REMAINDER, help="the ssdiff command to run")
    sb.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="list the cluster's Ray jobs")
    jb.add_argument("--address", help=addr_help)
    jb.set_defaults(func=cmd_jobs)

    st = sub.add_parser("stop", help="stop a Ray job")
    st.add_argument("job")
    st.add_argument("--address", help=addr_help)
    st.set_defaults(func=cmd_stop)

    ss = sub.add_parser("stress", help="round time and memory against the client count")
    ss.add_argument("--clients", default="100,250,500,1000,2000", help="comma-separated counts")
    ss.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    ss.add_argument("--rounds", type=int, default=3, help="rounds per count (first one warms up)")
    ss.add_argument("--per-round", type=float, default=0.1, help="fraction selected per round")
    ss.add_argument("--checkpoint-every", type=int, default=0,
                    help="rounds between checkpoints, each timed (0 = only the final one)")
    ss.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ss.add_argument("--address", default=None, help="Ray cluster to join (default: embedded)")
    ss.add_argument("--out", default="stress", help="directory for Parquet, PNG and runs")
    ss.set_defaults(func=cmd_stress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # every error a user can fix; anything else is a bug and raises
        print(f"ssdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
