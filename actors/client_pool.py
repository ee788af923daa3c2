"""The pool actor: a Ray actor hosting many virtual clients (a thin shell over ClientPool)."""

from __future__ import annotations

import ray

from ssdiff_ray.config import Config


@ray.remote
class ClientPoolActor:
    def __init__(self, pool_index: int, cfg: Config, shard_dir: str, device: str = "cpu"):
        # torch is imported here, in the actor's process: the driver defines this class
        # and must not load torch itself (~330 MB and ~5 s of imports it never uses)
        from ssdiff_ray.client_pool import ClientPool
        from ssdiff_ray.threads import set_threads

        set_threads(cfg.ray.torch_threads)
        self.pool_index = pool_index
        self.pool = ClientPool(cfg, shard_dir, device, reuse_blob=True)  # see ClientPool

    def train_round(self, global_flat, round_, client_ids, bits, steps, ranks=None):
        # After a crash Ray re-runs __init__ in a new process: the report's pid changes, and
        # the driver records that these clients' state (residuals) was reset.
        return self.pool.train_round(global_flat, round_, client_ids, bits, steps, ranks)

    def state_dict(self) -> dict:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state)

    def ping(self) -> int:
        return self.pool_index
