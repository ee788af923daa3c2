"""cluster/: the launcher YAML, KubeRay manifests and runtime_env parse and hold what we use.

A small schema of the fields this project relies on, plus the strongest check available
without a Kubernetes cluster: every entrypoint parses with ssdiff's own argument parser
and its ``--set`` overrides validate as a config.
"""

import shlex
from pathlib import Path

import pytest
import yaml

from ssdiff_ray import config
from ssdiff_ray.cli import build_parser
from ssdiff_ray.driver.jobs import runtime_env

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars",
                    "container", "image_uri", "config"}


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_pod(template, gpu: bool):
    (c,) = template["spec"]["containers"]
    assert c["image"] and c["name"]
    limits = c["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"] for v in template["spec"]["volumes"]}
    # pools on every node read the run's shards: out_dir must be on a volume all pods mount
    assert mounts.get("results") == "/results" and "results" in vols


def _check_cluster_spec(spec):
    head = spec["headGroupSpec"]
    # the Jobs API runs code: token auth on; the pod listens behind its ClusterIP service
    assert spec["authOptions"] == {"mode": "token"}
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "serviceType" not in head or head["serviceType"] == "ClusterIP"
    assert "ps" in yaml.safe_load(head["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
    _check_pod(head["template"], gpu=False)
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["groupName"] and 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    _check_pod(gpu["template"], gpu=True)


def _check_entrypoint(entry: str) -> str:
    argv = shlex.split(entry)
    assert argv[0] == "ssdiff"
    args = build_parser().parse_args(argv[1:])
    cfg = config.load(args.config, args.set)  # overrides are valid config
    assert cfg.out_dir.startswith("/results/") or (args.out or "").startswith("/results/")
    return args.command


def test_launcher_yaml():
    c = _load("cluster.yaml")
    assert c["cluster_name"] and c["provider"]["type"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types and len(types) >= 2
    assert "ps" in types[c["head_node_type"]]["resources"]
    workers = [t for n, t in types.items() if n != c["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"]
    setup = " ".join(c["setup_commands"])
    assert "pip install" in setup and "ssdiff-ray" in setup
    starts = [s for s in c["head_start_ray_commands"] if "--head" in s]
    assert starts and all("RAY_AUTH_MODE=token" in s and "--dashboard-host=127.0.0.1" in s
                          for s in starts)
    assert all("RAY_AUTH_MODE=token" in s for s in c["worker_start_ray_commands"] if "--address" in s)
    assert "/home/ubuntu/.ray/auth_token" in c["file_mounts"]


def test_raycluster():
    m = _load("kuberay/raycluster.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster"
    assert m["metadata"]["name"]
    _check_cluster_spec(m["spec"])


@pytest.mark.parametrize("name,command", [("kuberay/rayjob.yaml", "run"),
                                          ("kuberay/rayjob-tune.yaml", "tune")])
def test_rayjob(name, command):
    m = _load(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    s = m["spec"]
    assert _check_entrypoint(s["entrypoint"]) == command
    env = yaml.safe_load(s["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= RUNTIME_ENV_KEYS
    assert s["shutdownAfterJobFinishes"] is True
    assert isinstance(s["ttlSecondsAfterFinished"], int) and s["ttlSecondsAfterFinished"] >= 0
    _check_cluster_spec(s["rayClusterSpec"])


def test_runtime_env_file_is_what_submit_sends():
    raw = _load("runtime_env.yaml")
    assert set(raw) <= RUNTIME_ENV_KEYS
    env = runtime_env(None, str(CLUSTER / "runtime_env.yaml"), ["psutil"])
    assert env["working_dir"] == "." and env["pip"] == ["psutil"]
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
