"""The one way this project starts or joins Ray: ``with ray_session(address): ...``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from ssdiff_ray.errors import UserError


class ClusterUnreachable(UserError, ConnectionError):
    """The Ray cluster a user named does not answer."""


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray; yields whether
    this call started Ray. A Ray that is already initialised is used as it is and left
    running (an ``address`` naming another cluster is an error); one this call started is
    shut down on exit."""
    started = init_ray(address, num_cpus)
    try:
        yield started
    finally:
        if started:
            from ssdiff_ray.driver import warm

            warm.release()
            ray.shutdown()


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray.
    Returns True when this call started Ray (``ray_session`` shuts it down)."""
    if ray.is_initialized():
        check_address(address)
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                     ) from None
    else:
        # "local": an instance of our own even when `ray start` left a cluster (running, or
        # stale in /tmp/ray/ray_current_cluster) that a bare ray.init() would try to join.
        # It needs no dashboard or its agents: fewer processes, less RAM.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def check_address(address: str | None) -> None:
    """Before anything is written: a named cluster answers, and, in a process already
    connected to a Ray, is that one (never run on one cluster when the user named another)."""
    if not address:
        return
    if not ray.is_initialized():
        check_reachable(address)
        return
    here = ray.get_runtime_context().gcs_address
    there = address.split("://", 1)[-1]
    if address == "auto" or there == here:
        return
    check_reachable(address)
    if there.rpartition(":")[2] != here.rpartition(":")[2]:  # same port: another name for it
        raise UserError(f"this process is already connected to the Ray cluster at {here!r}; "
                        f"it cannot also join {address!r}")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address must accept a TCP connection:
    ray.init waits minutes on an address nobody answers at, printing GCS time-outs."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", a bare host, ...: ray.init answers these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: "
                                 f"{e.strerror or type(e).__name__} (is the head node up, "
                                 "and is its GCS port open?)") from None
