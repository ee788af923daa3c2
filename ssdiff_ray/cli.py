"""``ssdiff``: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ssdiff_ray.config import ConfigError


class UserError(Exception):
    """Anything a user can fix: printed as one line, exit code 2."""


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


def cmd_report(args) -> int:
    from ssdiff_ray.report import RunDirError, report

    try:
        totals = report(args.run_dir)
    except RunDirError as e:
        raise UserError(str(e)) from None
    by_class = totals.pop("energy_by_class_j")
    width = max(len(k) for k in totals)
    for k, v in totals.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    print("  energy by device class (J): " + ", ".join(f"{k} {v:.1f}" for k, v in by_class.items()))
    print(f"  plots: {Path(args.run_dir) / 'report.png'}")
    return 0


def cmd_compare(args) -> int:
    from ssdiff_ray.report import RunDirError, compare

    try:
        table = compare(args.run_dirs, args.out)
    except RunDirError as e:
        raise UserError(str(e)) from None
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"plot: {args.out}")
    return 0


def cmd_sample(args) -> int:
    from ssdiff_ray.serve import RunModelError, sample_run

    try:
        res = sample_run(args.run_dir, args.n, args.trigger, args.defend, args.seed, args.out)
    except RunModelError as e:
        raise UserError(str(e)) from None
    print(f"{res['n']} samples ({'triggered: ' + res['trigger'] if res['trigger'] else 'clean'}"
          f" inputs, defense {'on' if res['defended'] else 'off'}): {res['flagged']} flagged")
    print(f"grid: {res['png']}\nrecord: {res['record']}")
    return 0


def cmd_audit(args) -> int:
    from ssdiff_ray.serve import RunModelError, audit_run

    try:
        res = audit_run(args.run_dir, args.seed)
    except RunModelError as e:
        raise UserError(str(e)) from None
    print(f"verdict: {res.get('verdict')}")
    for k, v in res.items():
        if k != "verdict" and not isinstance(v, list):
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run federated DDPM training")
    r.add_argument("--config", help="TOML config file (defaults apply to anything not set)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else embedded local Ray)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="plots (energy, bits, latency, FID) and totals of a run")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="overlay runs: energy vs FID")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", default="compare.png", help="PNG to write")
    cmp_.set_defaults(func=cmd_compare)

    smp = sub.add_parser("sample", help="sample a run's model, with the backdoor defense")
    smp.add_argument("run_dir")
    smp.add_argument("--n", type=int, default=64)
    smp.add_argument("--trigger", choices=("box", "stop_sign", "glasses", "blend", "patch"),
                     help="start from triggered noise (to test the defense)")
    smp.add_argument("--defend", action=argparse.BooleanOptionalAction, default=True)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", help="PNG path (default RUN_DIR/sample_<trigger>.png)")
    smp.set_defaults(func=cmd_sample)

    aud = sub.add_parser("audit", help="does the run's model look backdoored?")
    aud.add_argument("run_dir")
    aud.add_argument("--seed", type=int, default=0)
    aud.set_defaults(func=cmd_audit)

    from tuning.cli import add_parser as add_tune  # argparse only; optuna/ray load when run

    add_tune(sub)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UserError, ConnectionError) as e:
        print(f"ssdiff: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Errors a user can cause in their data (DataError, DeviceProfileError) are
        # ValueErrors with a one-line message; internal bugs are other types and raise.
        if type(e).__name__ in ("DataError", "DeviceProfileError"):
            print(f"ssdiff: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("ssdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
