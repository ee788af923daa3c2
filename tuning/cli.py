"""``ssdiff tune``: arguments and output (registered by ssdiff_ray.cli, imported lazily)."""

from __future__ import annotations

import argparse

from tuning.choices import OBJECTIVES, PRUNER_CHOICES, SAMPLERS


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("tune", help="Optuna study over whole federated runs, trials in parallel on Ray")
    t.add_argument("--config", help="base TOML config of every trial")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base config value (repeatable)")
    t.add_argument("--space", help="search space TOML (default: the packaged default_space.toml)")
    t.add_argument("--trials", type=int, default=20, help="finished trials wanted in the study")
    t.add_argument("--parallel", type=int, default=1, help="trials at once (Ray tasks)")
    t.add_argument("--storage", help="sqlite:///FILE (default OUT/study.db), "
                   "postgresql+psycopg://USER@HOST:PORT/DB, or journal:///FILE")
    t.add_argument("--study", default="ssdiff", help="study name (rerun the same to resume)")
    t.add_argument("--out", help="results directory (default <out_dir>/tune-<study>)")
    t.add_argument("--objectives", default="energy,fid",
                   help=f"comma list of {', '.join(OBJECTIVES)} (one = single-objective)")
    t.add_argument("--constraint", action="append", default=[], metavar="METRIC<=VALUE",
                   help="feasibility constraint, e.g. fid<=200 (repeatable)")
    t.add_argument("--sampler", default="tpe", choices=tuple(SAMPLERS))
    t.add_argument("--pruner", default="auto", choices=PRUNER_CHOICES,
                   help="single-objective only; auto = median")
    t.add_argument("--pruner-startup", type=int, default=2,
                   help="finished trials before the median pruner prunes")
    t.add_argument("--startup-trials", type=int, help="random trials before TPE (default trials/3)")
    t.add_argument("--seed", type=int, help="sampler seed (default: the config's seed)")
    t.add_argument("--reference", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="enqueue the base config with these changes as a reference trial")
    t.add_argument("--confirm-seeds", type=int, default=3, metavar="N",
                   help="run the reference and the front again on N fresh seeds: report.md "
                   "gives means, 95%% intervals and the verdict against the reference (0 = off)")
    t.add_argument("--address", default=None, help="Ray cluster to join (default: embedded local Ray)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)
    return t


def cmd_tune(args) -> int:
    from tuning.study import TuneOptions, run_study

    opts = TuneOptions(
        config=args.config, overrides=args.set, space=args.space, trials=args.trials,
        parallel=args.parallel, storage=args.storage, study=args.study, out=args.out,
        objectives=[o.strip() for o in args.objectives.split(",") if o.strip()],
        constraints=args.constraint, sampler=args.sampler, pruner=args.pruner,
        pruner_startup=args.pruner_startup, startup_trials=args.startup_trials, seed=args.seed,
        reference=args.reference, address=args.address, confirm_seeds=args.confirm_seeds)
    res = run_study(opts, progress=not args.quiet)
    print(f"study {res['study']} ({res['storage']}): {res['complete']} complete, "
          f"{res['pruned']} pruned, {res['failed']} failed")
    label = "Pareto front" if len(opts.objectives) > 1 else "best trial"
    print(f"{label}:")
    for f in res["front"]:
        vals = "  ".join(f"{o} {f[o]:.4g}" for o in opts.objectives)
        print(f"  #{f['number']:<4} {vals}  policy={f['params'].get('quant.policy', '-')}")
    if "best" in res:
        print(f"best config: {res['best']['config']}  (ssdiff run --config {res['best']['config']})")
    if "confirmed" in res:
        _print_confirmed(res["confirmed"], opts.objectives)
    print(f"results: {res['out']} (trials.parquet, pareto.parquet, configs/, "
          f"{', '.join(p.rsplit('/', 1)[-1] for p in res['plots'])})")
    return 0


def _print_confirmed(c: dict, objectives: list[str]) -> None:
    print(f"confirmed on fresh seeds (mean [95% interval]; {c['report']}):")
    for r in c["members"]:
        cells = "  ".join(f"{o} {r['objectives'][o]['mean']:.4g} [{r['objectives'][o]['low']:.4g}, "
                          f"{r['objectives'][o]['high']:.4g}]" for o in objectives)
        tag = "reference" if r["reference"] else r.get("verdict", "")
        print(f"  #{r['number']:<4} {cells}  {tag}")
    if "best_confirmed" in c:
        print(f"to deploy: ssdiff run --config {c['best_confirmed']}")
