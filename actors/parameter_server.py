"""The parameter-server actor: owns the global model (a thin shell over ParameterServer)."""

from __future__ import annotations

import ray

from ssdiff_ray.config import Config


@ray.remote
class ParameterServerActor:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu"):
        # torch is imported in the actor's process only (see ClientPoolActor)
        from ssdiff_ray.parameter_server import ParameterServer
        from ssdiff_ray.threads import set_threads

        set_threads(cfg.ray.torch_threads)
        self.server = ParameterServer(cfg, num_slots, device)

    def model_facts(self) -> tuple[int, float, int]:
        """(uplinked parameters, training FLOPs per sample and local step, downlinked
        parameters): the planner's inputs."""
        s = self.server
        return s.num_params, s.flops_per_sample_step(), s.downlink_params()

    def publish(self, round_: int):
        """Put this round's weights in the object store once; every pool reads that one copy."""
        flat, downlink_bytes = self.server.broadcast(round_)
        self.server.begin_round()
        return [ray.put(flat)], downlink_bytes

    def accumulate(self, slot, chunk, blob, weights, assigned_bits, ranks=None):
        return self.server.accumulate(slot, chunk, blob, weights, assigned_bits, ranks)

    def finish_round(self):
        return self.server.finish_round()

    def evaluate(self, seed: int, untrained: bool = False, threads: int = 1):
        from ssdiff_ray.threads import set_threads

        set_threads(threads)  # pools are idle while we evaluate: use the cores
        try:
            return self.server.evaluate(seed, untrained)
        finally:
            set_threads(self.server.cfg.ray.torch_threads)

    def fid_floor(self) -> float:
        return self.server.fid_floor()

    def state_dict(self):
        return self.server.state_dict()

    def load_state_dict(self, state) -> None:
        self.server.load_state_dict(state)

    def save_model(self, path: str) -> None:
        self.server.save_model(path)
