"""A finished run's actor processes, kept for the next run of this driver process.

A fresh actor process spends 6-8 s of CPU importing torch and diffusers before it does any
work (``benchmarks/actor_startup.py``). A driver that runs many short federations in one Ray
session (tuning, a notebook looping over ``api.run``, the tests) pays that once per process:
``Federation`` takes the idle actors here and ``reset``s them in place (``__init__`` again:
nothing of the last run survives but the imports).

- The server is kept until Ray shuts down (``release``): it reserves no CPU.
- Pools are kept for ``ray.keep_pools_s`` seconds only, since an idle pool still holds its
  CPUs: any other work on the cluster (this driver's own Ray tasks included) waits for them
  meanwhile. A timer kills them after that; ``release_pools`` frees them at once.
- A pool is kept under the resources it was started with (CPUs, GPUs, custom resources,
  restarts): a run takes only pools started exactly as it would start them.

Only actors of a run that finished, and pools Ray never restarted, are kept (a restarted pool
has used up some of its restarts). A kept pool that Ray restarts later comes back with its
*first* run's constructor arguments; every call carries the current run's ``PoolSetup``, so
the pool notices and sets itself up again (``ClientPool.train_round``).
"""

from __future__ import annotations

import threading

import ray

_lock = threading.Lock()
_servers: list[tuple[str, str, object]] = []       # (job id, placement key, actor)
_pools: list[tuple[str, tuple, object]] = []       # (job id, options key, actor)
_timer: threading.Timer | None = None


def _job() -> str:
    return ray.get_runtime_context().get_job_id()


def take(placement: str):
    """The idle server for this Ray job and placement, or None."""
    job = _job()
    with _lock:
        found = None
        while _servers:
            owner, where, actor = _servers.pop()
            if found is None and owner == job and where == placement:
                found = actor
            else:
                _kill(actor)
        return found


def give(placement: str, actor) -> None:
    """Keep ``actor`` (a server whose run finished) for the next run."""
    release_server()
    with _lock:
        _servers.append((_job(), placement, actor))


def take_pools(options: tuple, n: int) -> list:
    """Up to ``n`` idle pools of this Ray job started with ``options``; kept pools that do
    not match are killed (they would hold CPUs the new pools need)."""
    job = _job()
    with _lock:
        found, rest = [], []
        for owner, key, actor in _pools:
            (found if owner == job and key == options and len(found) < n else rest).append(actor)
        _pools.clear()
    for actor in rest:
        _kill(actor)
    return found


def held() -> dict[str, float]:
    """CPUs and GPUs the kept pools of this job hold (an options key starts with them)."""
    job = _job()
    with _lock:
        mine = [key for owner, key, _ in _pools if owner == job]
    return {"CPU": sum(k[0] for k in mine), "GPU": sum(k[1] for k in mine)}


def give_pools(options: tuple, pools: list, keep_s: float) -> None:
    """Keep ``pools`` (of a finished run) for ``keep_s`` seconds, then kill them."""
    global _timer
    release_pools()
    if keep_s <= 0:
        for actor in pools:
            _kill(actor)
        return
    with _lock:
        job = _job()
        _pools.extend((job, options, actor) for actor in pools)
        _timer = threading.Timer(keep_s, release_pools)
        _timer.daemon = True
        _timer.start()


def release_pools() -> None:
    """Kill the kept pools now: their CPUs are free for other work."""
    global _timer
    with _lock:
        pools = [actor for _, _, actor in _pools]
        _pools.clear()
        if _timer is not None:
            _timer.cancel()
            _timer = None
    for actor in pools:
        _kill(actor)


def release_server() -> None:
    with _lock:
        servers = [actor for _, _, actor in _servers]
        _servers.clear()
    for actor in servers:
        _kill(actor)


def release() -> None:
    """Kill every kept actor (before ``ray.shutdown``, or to free their memory)."""
    release_pools()
    release_server()


def kept() -> dict:
    """How many actors are kept, by kind (tests, diagnostics)."""
    with _lock:
        return {"servers": len(_servers), "pools": len(_pools)}


def _kill(actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
        pass
