"""The public API: ``run(cfg)`` trains a federated DDPM and returns its summary.

This is the outer shell: it starts (or joins) Ray, prepares the run directory, lets a
``Federation`` fit and summarises.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ssdiff_ray import config as config_mod
from ssdiff_ray.config import Config


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        # The embedded default needs no dashboard or its agents: fewer processes, less RAM.
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address must accept a TCP connection:
    ray.init waits minutes on an address nobody answers at, printing GCS time-outs."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", a bare host, ...: ray.init answers these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: "
                              f"{e.strerror or type(e).__name__} (is the head node up, "
                              "and is its GCS port open?)") from None


def run(
    cfg: Config,
    *,
    address: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_round=None,
) -> dict:
    """Run (or resume) a federated training run; returns the summary dict.

    ``on_round(federation, round, row)`` is called after each round (tests, tuning).
    """
    import ray

    from driver.federation import CHECKPOINT, Federation
    from ssdiff_ray.run_dir import prepare, write_summary

    t_start = time.perf_counter()
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and not ray.is_initialized():
        check_reachable(address)  # before the run directory is made
    prep = prepare(cfg, resume)  # shards and population are rebuilt identically on resume
    cfg, run_dir = prep.cfg, prep.run_dir
    started = init_ray(address)
    fed = None
    try:
        fed = Federation(prep)
        start = 1
        if resume and (run_dir / CHECKPOINT).exists():
            start = fed.restore(run_dir) + 1
        fed.fit(start, progress, on_round)
        summary = summarize(fed, time.perf_counter() - t_start)
        write_summary(run_dir, summary)
        return summary
    finally:
        if fed is not None:
            fed.shutdown()
        if started:
            ray.shutdown()


# the final evaluation's figures that go into the summary when the run measured them
QUALITY = ("feature_space", "kid", "precision", "recall", "bad_sample_share", "confidence",
           "class_accuracy")


def summarize(fed, wall_s: float) -> dict:
    """The run's summary: its size, the final evaluation and the totals of its ledger."""
    rounds = fed.ledger.rounds()
    last = rounds.iloc[-1]
    quality = {k: (v if isinstance(v, str) else float(v)) for k in QUALITY
               if isinstance(v := last.get(k), str) or (v is not None and math.isfinite(v))}
    return {
        "run_dir": str(fed.prep.run_dir), "num_params": fed.num_params, "pools": fed.num_pools,
        "clients": fed.cfg.clients.count, **fed.baseline,
        "rounds": int(fed.cfg.rounds), "wall_s": wall_s,
        "fid": float(last.get("fid", math.nan)), **quality,
        "classes_present": int(last.get("classes_present", 0) or 0),
        "uplink_bytes": int(rounds["uplink_bytes"].sum()),
        "downlink_bytes": int(rounds["downlink_bytes"].sum()),
        "energy_j": float(rounds["energy_j"].sum()),
        "stragglers": int(rounds["stragglers"].sum()),
        "final_loss": float(last["loss"]),
        "placement": fed.placement,
    }


def load_config(path: str | None, overrides: list[str]) -> Config:
    return config_mod.load(path, overrides)
