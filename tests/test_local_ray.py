"""The embedded default starts a Ray of its own (``address="local"``), whatever a
``ray start`` on the machine left behind: a running cluster, or a stale
``/tmp/ray/ray_current_cluster`` after that cluster died."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import TINY

CURRENT = Path("/tmp/ray/ray_current_cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssdiff_run(out: Path, name: str, env: dict) -> subprocess.CompletedProcess:
    sets = sum((["--set", s] for s in [*TINY, "rounds=1", f"out_dir={out}", f"name={name}"]), [])
    return subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", "run", "--quiet", *sets],
                          capture_output=True, text=True, env=env, timeout=600)


def _kill_session(session: str) -> None:
    """Kill the processes of one Ray session (``ray stop`` would kill every Ray here,
    this test session's too)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(session in a for a in (p.info["cmdline"] or [])):
            procs.append(p)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_run_beside_a_running_and_then_a_dead_ray_start_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    saved = CURRENT.read_text() if CURRENT.is_file() else None
    port = _free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
                    "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    session = Path("/tmp/ray/session_latest").resolve().name
    try:
        assert str(port) in CURRENT.read_text()  # what a bare ray.init() would join
        r = _ssdiff_run(tmp_path, "beside-running", env)
        assert r.returncode == 0, r.stderr[-3000:]
        _kill_session(session)  # the cluster dies; ray_current_cluster stays behind
        assert str(port) in CURRENT.read_text()
        r = _ssdiff_run(tmp_path, "beside-stale", env)
        assert r.returncode == 0, r.stderr[-3000:]
        for name in ("beside-running", "beside-stale"):
            assert (tmp_path / name / "rounds.parquet").is_file()
    finally:
        _kill_session(session)
        if saved is None:
            CURRENT.unlink(missing_ok=True)
        else:
            CURRENT.write_text(saved)
