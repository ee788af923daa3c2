"""The parameter server's state: global model, broadcast, decode + screen + aggregate, eval.

``ServerState`` runs without Ray; the ParameterServer actor is a thin shell around it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ssdiff_ray import codec
from ssdiff_ray.aggregate import ServerOptimizer, StreamingAggregator, clip_to_norm
from ssdiff_ray.config import Config
from ssdiff_ray.model import (
    build_scheduler,
    build_unet,
    get_flat,
    param_layout,
    sample,
    set_flat,
)


class ServerState:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.unet = build_unet(cfg.model.preset, cfg.data.image_size, seed=cfg.seed).to(device)
        self.scheduler = build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
        self.layout = codec.layout_id(param_layout(self.unet))
        self.weights = get_flat(self.unet)
        self.num_params = len(self.weights)
        self.optimizer = ServerOptimizer(cfg.server.lr, cfg.server.momentum)
        # Diffusion models sample better from an average of recent weights than from the
        # last round's, which leans towards the few (non-IID) clients that round selected.
        self.ema: np.ndarray | None = None
        self.num_slots = num_slots
        # What the clients hold: equals ``weights`` unless the downlink is quantized.
        self.client_view = self.weights.copy()
        self.downlink_residual: np.ndarray | None = None
        self.agg: StreamingAggregator | None = None
        self.evaluator = None

    # --- downlink -------------------------------------------------------------------------
    def broadcast(self, round_: int) -> tuple[np.ndarray, int]:
        """The weights clients train from this round, and the bytes of the broadcast."""
        bits = self.cfg.quant.downlink_bits
        if bits == 32:
            self.client_view = self.weights.copy()
            return self.client_view, codec.encoded_size(self.num_params, 32, 1)
        # Quantize the change since the last broadcast, with error feedback on the server.
        rng = np.random.default_rng([self.cfg.seed, round_, 7])
        payload, self.downlink_residual = codec.quantize_with_feedback(
            self.weights - self.client_view, self.downlink_residual, bits,
            self.cfg.quant.block_size, rng, self.layout)
        self.client_view = self.client_view + codec.decode(payload, self.layout, self.num_params)
        return self.client_view, len(payload)

    # --- uplink ---------------------------------------------------------------------------
    def begin_round(self) -> None:
        self.agg = StreamingAggregator(self.num_params, self.num_slots)
        self.buffer: list[tuple[int, np.ndarray, float]] = []

    @property
    def buffered(self) -> bool:
        """Outlier screening compares a round's updates with each other, so it must see them
        all before aggregating; without it, updates stream into the sum as they arrive."""
        return self.cfg.server.screening != "none"

    def accumulate(self, slot: int, meta: dict, blob: np.ndarray, weights: np.ndarray) -> dict:
        """Decode, screen and add one pool's payloads; return per-client verdicts.

        A payload that fails to decode is rejected with the codec's reason and never
        touches the model. Norm clipping (``server.max_update_norm``) marks the client
        ``screened`` but keeps its (clipped) update.
        """
        n = len(meta["client_id"])
        rejected = np.full(n, "", dtype=object)
        screened = np.zeros(n, dtype=bool)
        offsets = meta["offsets"]
        view = memoryview(blob)
        decode_s = aggregate_s = 0.0
        for i in range(n):
            payload = view[int(offsets[i]):int(offsets[i + 1])]
            t0 = time.perf_counter()
            try:
                delta = codec.decode(payload, self.layout, self.num_params)
            except codec.PayloadError as e:
                rejected[i] = e.reason
                continue
            t1 = time.perf_counter()
            delta, screened[i] = clip_to_norm(delta, self.cfg.server.max_update_norm)
            if self.buffered:
                self.buffer.append((int(meta["client_id"][i]), delta, float(weights[i])))
            else:
                self.agg.add(slot, delta, float(weights[i]))
            decode_s += t1 - t0
            aggregate_s += time.perf_counter() - t1
        return {"rejected_reason": rejected, "screened": screened, "decode_s": decode_s,
                "aggregate_s": aggregate_s}

    def _screen_buffer(self) -> dict[int, str]:
        """Screen the buffered updates; add the kept ones; return {client_id: reason}."""
        from ssdiff_ray.screening import screen_updates

        if not self.buffer:
            return {}
        self.buffer.sort(key=lambda b: b[0])  # arrival order must not change the result
        ids = [b[0] for b in self.buffer]
        deltas = np.stack([b[1] for b in self.buffer])
        weights = np.array([b[2] for b in self.buffer])
        params = {"norm_factor": self.cfg.server.norm_factor} \
            if self.cfg.server.screening == "norm" else {}
        keep, reasons = screen_updates(deltas, weights, self.cfg.server.screening, **params)
        for i in np.flatnonzero(keep):
            self.agg.add(0, deltas[i], float(weights[i]))
        self.buffer = []
        # "dropped:" marks an update left out of the sum; others were clipped and kept
        return {cid: ("" if k else "dropped:") + (r or "screened")
                for cid, k, r in zip(ids, keep, reasons) if r or not k}

    def finish_round(self) -> dict:
        """Apply the weighted mean of this round's accepted updates (FedAvg / FedAvgM)."""
        screened = self._screen_buffer() if self.buffered else {}
        mean = self.agg.mean()
        stats = {"aggregated": self.agg.count, "update_norm": 0.0, "screened": screened}
        if mean is not None:
            stats["update_norm"] = float(np.linalg.norm(mean))
            self.weights = self.optimizer.step(self.weights, mean)
            d = self.cfg.server.ema_decay
            if d > 0:
                self.ema = self.weights.copy() if self.ema is None else \
                    (d * self.ema + (1 - d) * self.weights).astype(np.float32)
        self.agg = None
        return stats

    # --- evaluation -----------------------------------------------------------------------
    def _evaluator(self):
        if self.evaluator is None:
            from ssdiff_ray.fid import QualityEvaluator
            from ssdiff_ray.runtime import load_dataset

            images, labels = load_dataset(self.cfg)
            self.evaluator = QualityEvaluator(images, labels)
        return self.evaluator

    def sampling_weights(self) -> np.ndarray:
        """The weights that sample and get saved: the EMA when enabled, else the global model."""
        return self.ema if self.ema is not None else self.weights

    def generate(self, n: int, seed: int, weights: np.ndarray | None = None,
                 x_T: torch.Tensor | None = None) -> np.ndarray:
        set_flat(self.unet, self.sampling_weights() if weights is None else weights)
        e = self.cfg.eval
        return sample(self.unet, self.scheduler, n, sampler=e.sampler, steps=e.steps, seed=seed,
                      x_T=x_T)

    def evaluate(self, seed: int, untrained: bool = False) -> tuple[dict, np.ndarray]:
        """Sample ``eval.samples`` images; FID, confidence, classes present; plus a grid."""
        weights = get_flat(build_unet(self.cfg.model.preset, self.cfg.data.image_size,
                                      seed=self.cfg.seed)) if untrained else None
        images = self.generate(self.cfg.eval.samples, seed, weights)
        evaluator = self._evaluator()
        metrics = evaluator.evaluate(images)
        if self.cfg.attack.kind != "none" and not untrained:
            from ssdiff_ray.security import evaluate_attack

            metrics.update(evaluate_attack(self.cfg, self.unet, self.scheduler,
                                           evaluator.classifier, images, evaluator, seed))
        return metrics, images[: self.cfg.eval.grid]

    def fid_floor(self) -> float:
        return float(self._evaluator().fid_floor())

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"weights": self.weights, "ema": self.ema, "optimizer": self.optimizer.state_dict(),
                "client_view": self.client_view, "downlink_residual": self.downlink_residual}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]
        self.ema = state.get("ema")
        self.optimizer.load_state_dict(state["optimizer"])
        self.client_view = state["client_view"]
        self.downlink_residual = state["downlink_residual"]

    def save_model(self, path) -> None:
        from ssdiff_ray.model import save_pipeline

        set_flat(self.unet, self.sampling_weights())
        save_pipeline(self.unet.cpu(), self.scheduler, path)
        self.unet.to(self.device)
