"""A real multi-process Ray cluster on loopback: ``ssdiff submit --follow`` runs a job on it.

`ray start --head` (dashboard on a free port, own temp dir) plus one worker node, each with
little CPU and object-store memory. The cluster is torn down in the fixture's finally,
by killing only the processes that carry this cluster's temp dir, never with `ray stop`
(which would kill every Ray on the machine).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args, env):
    r = subprocess.run([BIN / "ray", "start", *args], env=env, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def _ours(temp_dir):
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _teardown(temp_dir):
    procs = _ours(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


@pytest.fixture
def cluster():
    # short path: Ray's unix sockets live under it and must stay under 107 characters
    temp_dir = tempfile.mkdtemp(prefix="ssd7-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, rt_env, metrics, wmetrics, wrt_env = _free_ports(9)
    # Started the way a user does: plain `ray start`, whose token auth is on because a token
    # sits in ~/.ray/auth_token (as any earlier embedded ray.init() leaves one); a HOME of
    # its own keeps the user's real ~/.ray out of it. Clients find the token there too.
    home = Path(temp_dir) / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0", HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=100000000",
              f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        _ray_start(
            ["--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
             '--resources={"ps": 1}', *common], env)
        # a joining node is told the mode, as Ray's docs say for every node of the cluster
        _ray_start(
            [f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
             f"--metrics-export-port={wmetrics}", f"--runtime-env-agent-port={wrt_env}",
             f"--dashboard-agent-listen-port={_free_ports(1)[0]}", *common],
            {**env, "RAY_AUTH_MODE": "token"})
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        _teardown(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ssdiff(*args, env, timeout=600):
    return subprocess.run([BIN / "ssdiff", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_follow_runs_a_job_on_a_two_node_cluster(cluster, tmp_path):
    env, addr = cluster["env"], cluster["address"]
    sets = [a for s in [*TINY, "rounds=2", f"out_dir={tmp_path}", "name=job", "eval.samples=10",
                        "ray.server_resource=ps", "clients.pools=3", "model.conditional=true",
                        "data.holdout=0.2"] for a in ("--set", s)]
    r = _ssdiff("submit", "--address", addr, "--follow", "--job-id", "ssd-e2e", "--",
                "run", "--quiet", *sets, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "job ssd-e2e: SUCCEEDED" in r.stderr
    assert "run directory" in r.stdout  # the job's own output, streamed back
    run_dir = tmp_path / "job"
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert list(rounds["round"]) == [1, 2] and len(clients) == 12 and not clients["dropped"].any()
    assert sorted(clients["pool"].unique()) == [0, 1, 2]
    assert (run_dir / "model" / "model_index.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    # the parameter server ran on the node holding the "ps" resource (the head), and the
    # pools spread to the worker, which has the CPUs
    place = summary["placement"]
    assert place["server_node_resources"].get("ps") == 1
    assert any(n != place["server_node"] for n in place["pool_nodes"])

    # distillation as a job: its classes are Ray tasks on the cluster
    r = _ssdiff("submit", "--address", addr, "--follow", "--", "distill", run_dir, "--ipc", "2",
                "--selection", "minimax", "--no-defend", "--steps", "2", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((run_dir / "distill" / "minimax-ipc2" / "manifest.json").read_text())
    assert m["per_class"] == [2] * 10 and m["generated"] == 2 * 5 * 10

    r = _ssdiff("jobs", "--address", addr, env=env, timeout=60)
    assert r.returncode == 0 and any(line.split()[:2] == ["ssd-e2e", "SUCCEEDED"]
                                     for line in r.stdout.splitlines()), r.stdout
    r = _ssdiff("stop", "ssd-e2e", "--address", addr, env=env, timeout=60)
    assert r.returncode == 0 and "already finished" in r.stdout
    r = _ssdiff("stop", "no-such-job", "--address", addr, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no-such-job" in r.stderr


def test_cluster_with_token_auth_without_the_token_is_one_line(cluster, tmp_path):
    env = {**cluster["env"], "HOME": str(tmp_path)}  # no ~/.ray/auth_token here
    r = _ssdiff("jobs", "--address", cluster["address"], env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "requires a token: set RAY_AUTH_TOKEN or put it in ~/.ray/auth_token" in r.stderr
    token = (Path(cluster["temp_dir"]) / "home" / ".ray" / "auth_token").read_text()
    r = _ssdiff("jobs", "--address", cluster["address"], env={**env, "RAY_AUTH_TOKEN": token},
                timeout=60)
    assert r.returncode == 0, r.stderr


def test_unreachable_address_is_one_line(tmp_path):
    (port,) = _free_ports(1)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for args in (["submit", "--address", f"http://127.0.0.1:{port}", "--", "run"],
                 ["jobs", "--address", f"http://127.0.0.1:{port}"],
                 ["stop", "x", "--address", f"http://127.0.0.1:{port}"]):
        r = _ssdiff(*args, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("ssdiff: error: cannot reach the Ray Jobs API")
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
