"""The parameter server's state: the global model, its broadcast, decoding and aggregation
of the clients' payloads, the server EMA, evaluation and checkpoints.

``ParameterServer`` runs without Ray; the parameter-server actor is a thin shell around it.
"""

from __future__ import annotations

import time

import numpy as np

from ssdiff_ray import codec
from ssdiff_ray.aggregation import make_aggregator
from ssdiff_ray.aggregation.base import ClientUpdate, clip_to_norm
from ssdiff_ray.config import Config
from ssdiff_ray.model.unet import build_scheduler, get_flat, param_layout, set_flat, unet_for
from ssdiff_ray.round_results import ChunkVerdicts, RoundOutcome, TrainedChunk


def ema_update(ema: np.ndarray | None, weights: np.ndarray, decay: float) -> np.ndarray | None:
    """decay * ema + (1 - decay) * weights (None when decay is 0: no EMA)."""
    if decay <= 0:
        return ema
    return weights.copy() if ema is None else (decay * ema + (1 - decay) * weights).astype(np.float32)


class ParameterServer:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.unet = unet_for(cfg).to(device)
        self.scheduler = build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
        self.layout = codec.layout_id(param_layout(self.unet))
        self.weights = get_flat(self.unet)
        self.num_params = len(self.weights)
        self.aggregator = make_aggregator(cfg.server, self.num_params, num_slots)
        # Diffusion models sample better from an average of recent weights than from the
        # last round's, which leans towards the few (non-IID) clients that round selected.
        self.ema: np.ndarray | None = None
        # What the clients hold: equals ``weights`` unless the downlink is quantized.
        self.client_view = self.weights.copy()
        self.evaluator = None

    def flops_per_sample_step(self) -> float:
        """Training FLOPs per sample and local step of the model (the planner's input)."""
        from ssdiff_ray.model.unet import flops_per_sample_step

        return flops_per_sample_step(self.unet)

    # --- downlink -------------------------------------------------------------------------
    def broadcast(self, round_: int) -> tuple[np.ndarray, int]:
        """The weights clients train from this round, and the bytes of the broadcast."""
        bits = self.cfg.quant.downlink_bits
        if bits == 32:
            self.client_view = self.weights.copy()
            return self.client_view, codec.encoded_size(self.num_params, 32, 1)
        # Send weights - view: the clients' view lags the weights by exactly what earlier
        # broadcasts rounded off, so this carries that error forward (error feedback, with
        # the view as the residual). Adding a separate residual too would count it twice.
        rng = np.random.default_rng([self.cfg.seed, round_, 7])
        payload = codec.encode(self.weights - self.client_view, bits, self.cfg.quant.block_size,
                               rng, self.layout)
        self.client_view = self.client_view + codec.decode(payload, self.layout, self.num_params)
        return self.client_view, len(payload)

    # --- uplink ---------------------------------------------------------------------------
    def begin_round(self) -> None:
        self.aggregator.begin_round(self.weights)

    def accumulate(self, slot: int, chunk: TrainedChunk, blob: np.ndarray,
                   weights: np.ndarray, assigned_bits: np.ndarray) -> ChunkVerdicts:
        """Check and decode one pool's payloads and hand them to the aggregator.

        A client whose pool reports it failed, a payload that fails to decode, and one
        whose bit width is not the one its policy assigned (``bits_mismatch``) are rejected
        with their reason and never touch the model. Norm clipping
        (``server.max_update_norm``) marks the client ``screened`` but keeps its (clipped)
        update.
        """
        n = len(chunk.client_id)
        rejected = np.full(n, "", dtype=object)
        screened = np.zeros(n, dtype=bool)
        sent_bits = np.zeros(n, dtype=np.int64)
        view = memoryview(blob)
        decode_s = aggregate_s = 0.0
        for i in range(n):
            if chunk.failed_reason[i]:
                rejected[i] = chunk.failed_reason[i]
                continue
            payload = view[int(chunk.offsets[i]):int(chunk.offsets[i + 1])]
            sent_bits[i] = codec.header_bits(payload)
            t0 = time.perf_counter()
            try:
                delta = codec.decode(payload, self.layout, self.num_params)
            except codec.PayloadError as e:
                rejected[i] = e.reason
                continue
            if sent_bits[i] != assigned_bits[i]:
                rejected[i] = "bits_mismatch"
                continue
            t1 = time.perf_counter()
            delta, screened[i] = clip_to_norm(delta, self.cfg.server.max_update_norm)
            self.aggregator.add(ClientUpdate(int(chunk.client_id[i]), slot, delta),
                                float(weights[i]))
            decode_s += t1 - t0
            aggregate_s += time.perf_counter() - t1
        return ChunkVerdicts(rejected, screened, sent_bits, decode_s, aggregate_s)

    def finish_round(self) -> RoundOutcome:
        """The aggregator's step, then the server EMA of the new weights."""
        result = self.aggregator.finish()
        if result.aggregated:
            self.weights = result.weights
            self.ema = ema_update(self.ema, self.weights, self.cfg.server.ema_decay)
        return RoundOutcome(result.aggregated, result.update_norm, result.verdicts)

    # --- evaluation -----------------------------------------------------------------------
    def sampling_weights(self) -> np.ndarray:
        """The weights that sample and get saved: the EMA when enabled, else the global model."""
        return self.ema if self.ema is not None else self.weights

    def evaluate(self, seed: int, untrained: bool = False) -> tuple[dict, np.ndarray]:
        """Evaluate the sampling weights (or the untrained model): metrics and a grid."""
        weights = get_flat(unet_for(self.cfg)) if untrained else self.sampling_weights()
        set_flat(self.unet, weights)
        return self._evaluator().evaluate(self.unet, self.scheduler, seed,
                                          with_attack=not untrained)

    def fid_floor(self) -> float:
        return self._evaluator().fid_floor()

    def _evaluator(self):
        if self.evaluator is None:
            from ssdiff_ray.evaluation import Evaluator

            self.evaluator = Evaluator(self.cfg)
        return self.evaluator

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"weights": self.weights, "ema": self.ema,
                "aggregator": self.aggregator.state_dict(),
                "client_view": self.client_view}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]
        self.ema = state.get("ema")
        self.aggregator.load_state_dict(state["aggregator"])
        self.client_view = state["client_view"]

    def save_model(self, path) -> None:
        from ssdiff_ray.model.pipeline import save_pipeline

        set_flat(self.unet, self.sampling_weights())
        save_pipeline(self.unet.cpu(), self.scheduler, path)
        self.unet.to(self.device)
