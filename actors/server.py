"""ParameterServer: a Ray actor owning the global model (a thin shell over ServerState)."""

from __future__ import annotations

import ray

from ssdiff_ray.clients import set_threads
from ssdiff_ray.config import Config
from ssdiff_ray.server import ServerState


@ray.remote
class ParameterServer:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu"):
        set_threads(cfg.ray.torch_threads)
        self.state = ServerState(cfg, num_slots, device)

    def num_params(self) -> int:
        return self.state.num_params

    def publish(self, round_: int):
        """Put this round's weights in the object store once; every pool reads that one copy."""
        flat, downlink_bytes = self.state.broadcast(round_)
        self.state.begin_round()
        return [ray.put(flat)], downlink_bytes

    def accumulate(self, slot, meta, blob, weights):
        return self.state.accumulate(slot, meta, blob, weights)

    def finish_round(self):
        return self.state.finish_round()

    def evaluate(self, seed: int, untrained: bool = False, threads: int = 1):
        set_threads(threads)  # pools are idle while we evaluate: use the cores
        try:
            return self.state.evaluate(seed, untrained)
        finally:
            set_threads(self.state.cfg.ray.torch_threads)

    def fid_floor(self) -> float:
        return self.state.fid_floor()

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state) -> None:
        self.state.load_state_dict(state)

    def get_weights(self):
        return self.state.weights

    def save_model(self, path: str) -> None:
        self.state.save_model(path)
