"""ClientPool: a Ray actor hosting many virtual clients (a thin shell over ClientGroup)."""

from __future__ import annotations

import os

import ray

from ssdiff_ray.config import Config


@ray.remote
class ClientPool:
    def __init__(self, pool_index: int, cfg: Config, shard_dir: str, device: str = "cpu"):
        # torch is imported here, in the actor's process: the driver defines this class
        # and must not load torch itself (~330 MB and ~5 s of imports it never uses)
        from ssdiff_ray.clients import ClientGroup, set_threads

        set_threads(cfg.ray.torch_threads)
        self.pool_index = pool_index
        self.group = ClientGroup(cfg, shard_dir, device, reuse_blob=True)  # see ClientGroup

    def train_round(self, global_flat, round_, client_ids, bits, steps):
        meta, blob = self.group.train_round(global_flat, round_, client_ids, bits, steps)
        # After a crash Ray re-runs __init__ in a new process: the driver sees the pid change
        # and records that these clients' state (residuals) was reset.
        meta["pid"] = os.getpid()
        return meta, blob

    def state_dict(self) -> dict:
        return self.group.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)

    def ping(self) -> int:
        return self.pool_index
