"""Peak resident memory of a command and every process it starts (embedded Ray included).

Samples the RSS of the whole process tree (driver, raylet, GCS, Ray workers = pool and
server actors) every ``--every`` seconds and records the peak of the sum, plus the peak
per role. Writes benchmarks/results/peak_rss_<name>.json.

    python benchmarks/peak_rss.py --name clients1000 -- \
        ssdiff run --set clients.count=1000 --set model.preset=tiny --set rounds=2 \
                   --set clients.pools=2 --quiet
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
from provenance import args_config, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def role(p: psutil.Process) -> str:
    """Which part of the run a process is, from its command line."""
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "ray::ClientPool" in cmd or p.name().startswith("ray::ClientPool"):
        return "pool"
    if "ray::ParameterServer" in cmd or p.name().startswith("ray::ParameterServer"):
        return "server"
    if "default_worker.py" in cmd or p.name().startswith("ray::"):
        return "ray_worker"
    if "raylet" in cmd or "gcs_server" in cmd or "ray/" in cmd:
        return "ray_system"
    return "driver"


def sample_tree(root: psutil.Process) -> dict[str, int]:
    """RSS in bytes of ``root`` and all its descendants, summed per role."""
    out: dict[str, int] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        r = role(p)
        out[r] = out.get(r, 0) + rss
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="run")
    ap.add_argument("--every", type=float, default=0.2, help="sampling period (s)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak_total, peak_by_role, peak_at = 0, {}, {}
    while proc.poll() is None:
        s = sample_tree(root)
        total = sum(s.values())
        if total > peak_total:
            peak_total, peak_at = total, s
        for k, v in s.items():
            peak_by_role[k] = max(peak_by_role.get(k, 0), v)
        time.sleep(args.every)
    gib = 1024**3
    result = {
        "command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
        "peak_total_gib": peak_total / gib,
        "at_peak_gib": {k: v / gib for k, v in peak_at.items()},
        "peak_by_role_gib": {k: v / gib for k, v in peak_by_role.items()},
        "cpu_count": psutil.cpu_count(), "load_avg_1m_at_end": psutil.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"peak_rss_{args.name}.json"
    write_json(out, result, args_config(args))
    print(f"wrote {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
