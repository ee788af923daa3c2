"""ParameterServer: a Ray actor owning the global model (a thin shell over ServerState)."""

from __future__ import annotations

import ray

from ssdiff_ray.config import Config


@ray.remote
class ParameterServer:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu"):
        # torch is imported in the actor's process only (see ClientPool)
        from ssdiff_ray.clients import set_threads
        from ssdiff_ray.server import ServerState

        set_threads(cfg.ray.torch_threads)
        self.state = ServerState(cfg, num_slots, device)

    def num_params(self) -> int:
        return self.state.num_params

    def flops_per_sample_step(self) -> float:
        """Training FLOPs per sample and local step of the model (the planner's input)."""
        from ssdiff_ray.api import flops_per_sample_step

        return flops_per_sample_step(self.state.cfg)

    def malicious_ids(self) -> list[int]:
        """The clients an ``[attack]`` config makes malicious (for the ledger)."""
        from ssdiff_ray.security import attack_spec

        spec = attack_spec(self.state.cfg)
        return sorted(spec.malicious_ids) if spec else []

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
        from ssdiff_ray.clients import set_threads

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
