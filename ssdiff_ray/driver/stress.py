"""Client-count stress: round time and memory as the number of clients grows.

Each count gets fresh actors in the same Ray session and a model so small (tiny preset,
8x8 images, one local step on a batch of one) that what remains of a round's wall time is
orchestration: planning, object-store traffic, ``ray.wait``, decoding and the ledger.
Uploads are 8-bit with error feedback, so every client that has uploaded has a residual
(``client_state``); rows record its RAM and disk bytes, RSS and PSS per process kind, the
round's time split and, with ``checkpoint_every``, each checkpoint's time and size.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import ray

from ssdiff_ray import config as config_mod
from ssdiff_ray.driver import warm
from ssdiff_ray.driver.federation import Federation
from ssdiff_ray.run_dir import prepare

MiB = 1 << 20


def stress_overrides(count: int, preset: str, rounds: int, per_round: float,
                     checkpoint_every: int = 0) -> list[str]:
    """A run whose wall time is orchestration; 8-bit uploads, so error feedback keeps a
    residual per client that has uploaded (the state that grows with the population)."""
    return [
        f"clients.count={count}", f"clients.per_round={per_round}", f"model.preset={preset}",
        f"rounds={rounds}", "model.timesteps=100", "data.image_size=8", "data.min_samples=1",
        "train.local_steps=1", "train.batch_size=1", "train.scale_work_by_device=false",
        "eval.baseline=false", "eval.samples=10", "eval.grid=0", f"name=stress-{count}",
        "quant.bits=8", "quant.error_feedback=true", f"server.checkpoint_every={checkpoint_every}",
    ]


def _rss(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: psutil.Process().memory_info().rss))


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def object_store_bytes() -> int:
    """Bytes in the Ray object store across the cluster (plasma, as ``ray memory`` shows)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(m.group(1)) * MiB if m else 0


def process_memory(server_pid: int, pool_pids: set[int]) -> dict:
    """RSS and PSS (shared pages split among their users) of this machine's processes of the
    run, by kind: the driver, the server, the pools, and Ray's own (raylet, GCS, idle
    workers: the driver's other descendants; on a cluster only this node's are seen)."""
    me = psutil.Process()
    out = {f"{m}_{k}": 0 for m in ("rss", "pss") for k in ("driver", "server", "pools", "ray")}
    for proc in [me, *me.children(recursive=True)]:
        try:
            mem = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        kind = ("driver" if proc.pid == me.pid else "server" if proc.pid == server_pid
                else "pools" if proc.pid in pool_pids else "ray")
        out[f"rss_{kind}"] += mem.rss
        out[f"pss_{kind}"] += getattr(mem, "pss", mem.rss)
    rss, pss = (sum(v for k, v in out.items() if k.startswith(m)) for m in ("rss_", "pss_"))
    return {**out, "rss_total": rss, "pss_total": pss}


def measure(fed: Federation, pids: tuple[int, set[int]]) -> dict:
    pools = [_rss(p) for p in fed.pools]
    state = ray.get([p.state_stats.remote() for p in fed.pools])
    return {"driver_rss": psutil.Process().memory_info().rss, "server_rss": _rss(fed.server),
            "pools_rss": sum(pools), "object_store": object_store_bytes(),
            **process_memory(*pids),
            "state_entries": sum(s["entries"] for s in state),
            "state_ram_bytes": sum(s["ram_bytes"] for s in state),
            "state_disk_bytes": sum(s["disk_bytes"] for s in state),
            "state_precision_loss": max(s["precision_loss"] for s in state)}


def release_freed_memory() -> None:
    """Hand the driver's freed heap back to the OS (glibc keeps it otherwise, so the RSS
    of a count would include the peak of the counts before it, and of ``prepare``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _checkpoint_bytes(run_dir: Path) -> int:
    return sum(f.stat().st_size for f in run_dir.glob("checkpoint*") if f.is_file()) + sum(
        f.stat().st_size for f in run_dir.glob("client_state.sqlite*"))


def stress_one(count: int, out_dir: Path, preset: str = "tiny", rounds: int = 3,
               per_round: float = 0.1, extra: list[str] = (), checkpoint_every: int = 0
               ) -> list[dict]:
    """One client count: a row per round (the first one also loads shards: kept apart)."""
    t0 = time.perf_counter()
    cfg = config_mod.load(None, [*stress_overrides(count, preset, rounds, per_round,
                                                   checkpoint_every), f"out_dir={out_dir}", *extra])
    prep = prepare(cfg, Path(cfg.out_dir) / cfg.name)
    warm.release()  # actors kept by an earlier run would carry their memory into the figures
    fed = Federation(prep)
    setup_s = time.perf_counter() - t0
    pids = (actor_pid(fed.server), {actor_pid(p) for p in fed.pools})
    rows = []
    release_freed_memory()  # what earlier counts freed is not what this one holds
    idle = measure(fed, pids)

    def on_round(fed, r, row):
        wall = row["wall_s"]  # plan to aggregation: the round without its ledger and eval
        c = fed.ledger.clients().query("round == @r")
        # Pools train in parallel: the slowest pool's compute is the round's critical
        # path; everything else in the wall time is orchestration.
        compute = float((c["train_s"] + c["encode_s"]).groupby(c["pool"]).sum().max())
        sel = int(row["clients_selected"])
        rows.append({"clients": count, "round": r, "selected": sel, "pools": fed.num_pools,
                     "setup_s": setup_s, "wall_s": wall, "compute_s": compute,
                     "overhead_ms_per_client": 1e3 * max(0.0, wall - compute) / sel,
                     "wall_ms_per_client": 1e3 * wall / sel,
                     **{k: row[k] for k in ("plan_s", "dispatch_s", "collect_s", "finish_s",
                                            "record_s", "train_s", "encode_s", "decode_s",
                                            "aggregate_s")},
                     "checkpoint_s": row.get("checkpoint_s", np.nan),
                     "checkpoint_state_rows": row.get("state_rows", 0),
                     "checkpoint_state_bytes": row.get("state_bytes", 0),
                     "checkpoint_bytes": _checkpoint_bytes(prep.run_dir),
                     **{f"idle_{k}": v for k, v in idle.items()}, **measure(fed, pids)})

    try:
        fed.fit(progress=False, on_round=on_round)
    finally:
        fed.shutdown()
    return rows


def fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line and how much a quadratic term would add (linear or not)."""
    b, a = np.polyfit(x, y, 1)
    res1 = y - (a + b * x)
    ss = float(((y - y.mean()) ** 2).sum()) or 1.0
    out = {"intercept": float(a), "slope": float(b), "r2": 1 - float((res1 ** 2).sum()) / ss}
    if len(x) >= 3:
        c2 = np.polyfit(x, y, 2)
        # the quadratic term's share of y at the largest x: small = growth is linear
        out["quadratic_share"] = float(abs(c2[0]) * x.max() ** 2 / max(abs(y).max(), 1e-12))
    return out


def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per count: medians over the steady rounds (round 1 loads every shard it touches),
    peaks over all rounds, the last round's client state, and the memory an idle client
    costs (fits across counts)."""
    steady = df[df["round"] > 1] if (df["round"] > 1).any() else df
    split = ("plan_s", "dispatch_s", "collect_s", "finish_s", "record_s", "train_s",
             "encode_s", "decode_s", "aggregate_s")
    per = steady.groupby("clients").agg(
        selected=("selected", "first"), pools=("pools", "first"), wall_s=("wall_s", "median"),
        compute_s=("compute_s", "median"),
        overhead_ms_per_client=("overhead_ms_per_client", "median"),
        wall_ms_per_client=("wall_ms_per_client", "median"),
        **{k: (k, "median") for k in split},
    ).reset_index()
    by = df.groupby("clients")
    per["setup_s"] = by["setup_s"].first().to_numpy()
    per["checkpoint_s"] = by["checkpoint_s"].median().to_numpy()
    per["checkpoint_over_round"] = per["checkpoint_s"] / per["wall_s"]
    per["peak_rss_total_mib"] = by["rss_total"].max().to_numpy() / MiB
    per["peak_pss_total_mib"] = by["pss_total"].max().to_numpy() / MiB
    per["rss_round1_mib"] = by.apply(lambda g: g.loc[g["round"].idxmin(), "rss_total"],
                                     include_groups=False).to_numpy() / MiB
    last = df.sort_values("round").groupby("clients").last().reset_index()
    for k in ("driver_rss", "server_rss", "pools_rss", "object_store", "idle_driver_rss",
              "idle_server_rss", "idle_pools_rss", "rss_total", "pss_total", "idle_rss_total",
              *(f"{m}_{k}" for m in ("rss", "pss") for k in ("driver", "server", "pools", "ray")),
              "state_ram_bytes", "state_disk_bytes", "checkpoint_bytes"):
        per[k + "_mib"] = last[k].to_numpy() / MiB
    per["state_entries"] = last["state_entries"].to_numpy()
    per["state_precision_loss"] = last["state_precision_loss"].to_numpy()
    per["state_disk_bytes_per_entry"] = last["state_disk_bytes"].to_numpy() / np.maximum(
        1, per["state_entries"].to_numpy())
    per["rss_last_over_round1"] = per["rss_total_mib"] / per["rss_round1_mib"]
    per["total_rss_mib"] = per[["driver_rss_mib", "server_rss_mib", "pools_rss_mib"]].sum(axis=1)
    per["idle_actors_rss_mib"] = per["idle_server_rss_mib"] + per["idle_pools_rss_mib"]
    x = per["clients"].to_numpy(float)
    fits = {"wall_s_vs_selected": fit(per["selected"].to_numpy(float), per["wall_s"].to_numpy()),
            "total_rss_mib_vs_clients": fit(x, per["total_rss_mib"].to_numpy()),
            "actors_rss_mib_vs_clients": fit(x, (per["server_rss_mib"]
                                                 + per["pools_rss_mib"]).to_numpy()),
            "idle_actors_rss_mib_vs_clients": fit(x, per["idle_actors_rss_mib"].to_numpy())}
    if len(per) >= 2:
        # What one more registered client costs in RAM: before any round (all processes),
        # and after the rounds less the residuals the pools' bounded caches hold.
        fits["idle_bytes_per_client_registered"] = MiB * fit(
            x, per["idle_rss_total_mib"].to_numpy())["slope"]
        fits["idle_bytes_per_client_after_rounds"] = MiB * fit(
            x, (per["rss_total_mib"] - per["state_ram_bytes_mib"]).to_numpy())["slope"]
    return per, fits


def plot(per: pd.DataFrame, path: Path, per_round: float = 0.1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(per["clients"], per["wall_ms_per_client"], "o-", label="round wall / selected")
    a.plot(per["clients"], per["overhead_ms_per_client"], "s-", label="orchestration / selected")
    a.axhline(20, color="grey", ls=":", label="20 ms target")
    a.set_xlabel(f"clients ({100 * per_round:g}% selected per round)")
    a.set_ylabel("ms per selected client")
    a.legend()
    for k, lbl, style in [
            ("rss_total_mib", "all processes (RSS)", "o-"), ("pss_total_mib", "all processes (PSS)", "o--"),
            ("driver_rss_mib", "driver", "o-"), ("server_rss_mib", "server", "o-"),
            ("pools_rss_mib", "pools (all)", "o-"), ("state_ram_bytes_mib", "residuals in RAM", "s:"),
            ("object_store_mib", "object store", "o-")]:
        b.plot(per["clients"], per[k], style, label=lbl)
    b.set_xlabel("clients")
    b.set_ylabel("MiB (after the last round)")
    b.legend(fontsize=8)
    if per["clients"].max() >= 10 * per["clients"].min():  # 1,000 to 100,000: a log axis
        a.set_xscale("log")
        b.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_stress(counts: list[int], out: Path, *, preset: str = "tiny", rounds: int = 3,
               per_round: float = 0.1, extra: list[str] = (), checkpoint_every: int = 0,
               progress=print) -> dict:
    """All counts; writes OUT/stress_rounds.parquet, stress.parquet, stress.png."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in counts:
        rows += stress_one(n, out / "runs", preset, rounds, per_round, extra, checkpoint_every)
        r = rows[-1]
        progress(f"  {n:>6} clients: {r['wall_s']:.3f} s/round, "
                 f"{r['overhead_ms_per_client']:.2f} ms overhead per selected client, "
                 f"RSS driver/server/pools {r['driver_rss'] / MiB:.0f}/{r['server_rss'] / MiB:.0f}/"
                 f"{r['pools_rss'] / MiB:.0f} MiB, all processes {r['rss_total'] / MiB:.0f} MiB, "
                 f"{r['state_entries']} residuals ({r['state_ram_bytes'] / MiB:.0f} MiB in RAM, "
                 f"{r['state_disk_bytes'] / MiB:.0f} MiB on disk)")
    df = pd.DataFrame(rows)
    df.to_parquet(out / "stress_rounds.parquet")
    per, fits = summarize(df)
    per.to_parquet(out / "stress.parquet")
    plot(per, out / "stress.png", per_round)
    return {"per_count": per, "fits": fits, "files": [str(out / f) for f in
            ("stress_rounds.parquet", "stress.parquet", "stress.png")],
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


__all__ = ["run_stress", "stress_one", "summarize", "fit", "object_store_bytes"]
