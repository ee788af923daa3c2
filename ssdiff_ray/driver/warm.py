"""A finished run's parameter-server process, kept for the next run of this driver process.

A fresh server process spends ~5 s of CPU importing torch and diffusers before it does any
work. A driver that runs many short federations in one Ray session (tuning trials, a
notebook looping over ``api.run``, the tests) pays that once: ``Federation`` takes the idle
server here and ``reset``s it in place (``ParameterServer.reset`` runs ``__init__`` again, so
nothing of the last run survives but the imports). Only the server is kept, never pools: it
reserves no CPU (an idle pool would hold its cores from every other run on the cluster) and
is never restarted by Ray (a restarted pool would come back with the first run's config).

At most one server is kept; it is killed when Ray shuts down (``release``) or when a run
that needs it on another node takes its place.
"""

from __future__ import annotations

import ray

_idle: list[tuple[str, str, object]] = []  # (job id, placement key, actor)


def take(placement: str):
    """The idle server for this Ray job and placement, or None."""
    job = ray.get_runtime_context().get_job_id()
    while _idle:
        owner, where, actor = _idle.pop()
        if owner == job and where == placement:
            return actor
        _kill(actor)
    return None


def give(placement: str, actor) -> None:
    """Keep ``actor`` (a server whose run finished) for the next run."""
    release()
    _idle.append((ray.get_runtime_context().get_job_id(), placement, actor))


def release() -> None:
    """Kill the kept server (before ``ray.shutdown``, or to free its memory)."""
    while _idle:
        _kill(_idle.pop()[2])


def _kill(actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
        pass
