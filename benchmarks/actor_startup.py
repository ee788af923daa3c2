"""What an actor process costs before it works, and what kept actors (driver/warm.py) save.

In one embedded Ray (2 CPUs): the CPU seconds (all processes, from /proc/stat) and wall
seconds of starting a pool actor and a parameter-server actor, and of resetting each; then
tiny 2-round runs in this process, alternately cold (kept actors released first) and warm
(the last run's server and pool reset), ``--pairs`` times each, with mean and 95% t-interval.

    python benchmarks/actor_startup.py [--pairs 3]

Writes benchmarks/results/actor_startup.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from provenance import write_json

from tuning.confirm import interval  # mean and 95% t-interval

HERE = Path(__file__).resolve().parent
TINY = ["model.preset=tiny", "model.timesteps=100", "clients.count=6", "clients.per_round=1.0",
        "clients.pools=1", "train.local_steps=2", "train.batch_size=8", "data.image_size=16",
        "eval.samples=40", "eval.steps=4", "eval.grid=16", "eval.baseline=false",
        "train.warmup_steps=0", "rounds=2"]


def cpu_s() -> float:
    """CPU seconds (user + nice + system) all processes have used so far."""
    import os

    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / os.sysconf("SC_CLK_TCK")


def measured(fn) -> dict:
    c0, t0 = cpu_s(), time.perf_counter()
    fn()
    return {"cpu_s": cpu_s() - c0, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    a = ap.parse_args()
    import ray

    from actors.client_pool import ClientPoolActor, PoolSetup
    from actors.parameter_server import ParameterServerActor
    from ssdiff_ray import api, config
    from ssdiff_ray.driver import warm
    from ssdiff_ray.run_dir import prepare

    out = Path(tempfile.mkdtemp(prefix="actor-startup-"))
    cfg = config.load(None, [*TINY, f"out_dir={out}", "name=actors"])
    prep = prepare(cfg, None)
    res: dict = {"cpus": 2, "pairs": a.pairs}
    with api.ray_session(num_cpus=2):
        time.sleep(5)  # let Ray's own start-up settle before measuring
        pool = server = None

        def start_pool():
            nonlocal pool
            pool = ClientPoolActor.options(num_cpus=1).remote(cfg, str(prep.shard_dir), "cpu")
            ray.get(pool.ping.remote())

        def start_server():
            nonlocal server
            server = ParameterServerActor.options(num_cpus=0).remote(cfg, 1, "cpu", 1)
            ray.get(server.model_facts.remote())

        res["pool_start"] = measured(start_pool)
        res["server_start"] = measured(start_server)
        res["server_reset"] = measured(lambda: ray.get(server.reset.remote(cfg, 1, "cpu", 1)))
        setup = PoolSetup(cfg, str(prep.shard_dir), "cpu", token="again")
        res["pool_reset"] = measured(lambda: ray.get(pool.reset.remote(setup)))
        ray.kill(pool)
        ray.kill(server)
        runs = {"cold": [], "warm": []}
        for i in range(a.pairs):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    warm.release()
                run_cfg = config.load(None, [*TINY, f"out_dir={out}", f"name={kind}{i}"])
                runs[kind].append(measured(lambda c=run_cfg: api.run(c, progress=False)))
        warm.release()
    for kind, rows in runs.items():
        res[f"run_{kind}"] = {"rows": rows, "cpu_s": interval([r["cpu_s"] for r in rows]),
                              "wall_s": interval([r["wall_s"] for r in rows])}
    saved = [c["cpu_s"] - w["cpu_s"] for c, w in zip(runs["cold"], runs["warm"])]
    res["cpu_s_saved_per_run"] = interval(saved)
    res["warm_over_cold_cpu"] = res["run_warm"]["cpu_s"][0] / res["run_cold"]["cpu_s"][0]
    write_json(HERE / "results" / "actor_startup.json", res, {"overrides": TINY})
    for k in ("pool_start", "pool_reset", "server_start", "server_reset"):
        print(f"{k}: {res[k]['cpu_s']:.1f} CPU-s, {res[k]['wall_s']:.1f} s wall")
    for kind in ("cold", "warm"):
        m, lo, hi = res[f"run_{kind}"]["cpu_s"]
        print(f"tiny run, {kind} actors: {m:.1f} CPU-s [{lo:.1f}, {hi:.1f}]")
    m, lo, hi = res["cpu_s_saved_per_run"]
    print(f"saved per run by the kept server and pool: {m:.1f} CPU-s [{lo:.1f}, {hi:.1f}]")


if __name__ == "__main__":
    main()
