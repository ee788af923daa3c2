"""Distillation on Ray: classes generated and students trained as Ray tasks, so a cluster
distills many classes and evaluates many students at once."""

from __future__ import annotations

import ray


def _call(fn, item):
    import torch

    torch.set_num_threads(1)  # one core per task: the scheduler packs tasks by CPU
    return fn(item)


def ray_map(fn, items, num_cpus: float = 1.0) -> list:
    """[fn(item) for item in items], each item a Ray task; results in the items' order."""
    from ssdiff_ray.driver import warm

    warm.release_pools()  # a finished run's kept pools would hold the CPUs tasks need
    task = ray.remote(num_cpus=num_cpus)(_call)
    fn_ref = ray.put(fn)  # shipped once, not once per task
    return ray.get([task.remote(fn_ref, item) for item in items])
