"""The parameter-server actor: the global model, its broadcast, decoding and aggregation
of the clients' payloads, the server EMA, evaluation and checkpoints.

``ParameterServer`` is a plain class (tests call it directly); ``ParameterServerActor`` is
the same class as a Ray actor. As in ``actors.client_pool``, modules that need torch are
imported inside the methods: the driver imports this module and never loads torch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from ssdiff_ray import codec
from ssdiff_ray.aggregation import make_aggregator
from ssdiff_ray.aggregation.base import ClientUpdate, clip_to_norm
from ssdiff_ray.aggregation.lora_exact import add_residuals
from ssdiff_ray.config import Config
from ssdiff_ray.model.lora_ranks import RankParts
from ssdiff_ray.round_results import ChunkVerdicts, RoundOutcome, TrainedChunk


def ema_update(ema: np.ndarray | None, weights: np.ndarray, decay: float) -> np.ndarray | None:
    """decay * ema + (1 - decay) * weights (None when decay is 0: no EMA)."""
    if decay <= 0:
        return ema
    if ema is None:
        return weights.copy()
    # ema + (1 - decay) (w - ema): weights that did not move (a LoRA run's frozen base) stay
    # bit-identical, which decay * ema + (1 - decay) * w does not guarantee in float32.
    return (ema + (1 - decay) * (weights - ema)).astype(np.float32)


class ParameterServer:
    def __init__(self, cfg: Config, num_slots: int, device: str = "cpu",
                 threads: int | None = None):
        from ssdiff_ray.model.unet import build_scheduler, get_flat, param_layout, trainable_mask, unet_for
        from ssdiff_ray.threads import set_threads

        if threads is not None:
            set_threads(threads)
        self.cfg = cfg
        self.device = device
        self.unet = unet_for(cfg).to(device)
        self.scheduler = build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
        # Clients upload (and the aggregator averages) the trainable entries of the weight
        # vector: all of it, or only the adapters in LoRA mode (``mask``).
        # A client of a smaller LoRA rank sends only its components (``uplink_part``).
        self.uplink_part = RankParts(param_layout(self.unet, trainable_only=True), cfg.lora.rank)
        _, self.num_params, self.layout = self.uplink_part(None)
        self.weights = get_flat(self.unet)
        self.mask = trainable_mask(self.unet)
        self.trainable = None if self.mask is None else np.flatnonzero(self.mask)
        self.lora_layers, self.kept_updates = [], []
        if self.mask is not None and cfg.lora.aggregation == "exact":
            from ssdiff_ray.model.adapters import lora_layers

            self.lora_layers = lora_layers(self.unet)
        self.aggregator = make_aggregator(cfg.server, self.num_params, num_slots)
        # Diffusion models sample better from an average of recent weights than from the
        # last round's, which leans towards the few (non-IID) clients that round selected.
        self.ema: np.ndarray | None = None
        # What the clients hold: equals ``weights`` unless the downlink is quantized.
        self.client_view = self.weights.copy()
        self.evaluator = None

    def reset(self, cfg: Config, num_slots: int, device: str = "cpu",
              threads: int | None = None) -> int:
        """Become a new server for another run in this process (``driver.warm``): all state
        is built again as by a fresh actor; only the imports are kept. Returns the pid."""
        self.__init__(cfg, num_slots, device, threads)
        return os.getpid()

    def model_facts(self) -> tuple[int, float, int]:
        """(uplinked parameters, training FLOPs per sample and local step, downlinked
        parameters): the planner's inputs."""
        return self.num_params, self.flops_per_sample_step(), self.downlink_params()

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
            return self.client_view, codec.encoded_size(self.downlink_params(), 32, 1)
        # Send weights - view: the clients' view lags the weights by exactly what earlier
        # broadcasts rounded off, so this carries that error forward (error feedback, with
        # the view as the residual). Adding a separate residual too would count it twice.
        rng = np.random.default_rng([self.cfg.seed, round_, 7])
        payload = codec.encode(self.weights - self.client_view, bits, self.cfg.quant.block_size,
                               rng, self.layout)
        self.client_view = self.client_view + codec.decode(payload, self.layout, self.num_params)
        return self.client_view, len(payload)

    def downlink_params(self) -> int:
        """Values a client must receive each round: the model, or in LoRA mode the adapters
        (clients keep the base), plus the adapted layers' base weights when exact
        aggregation moves them."""
        moved = sum(int(np.prod(layer.base[1])) for layer in self.lora_layers)
        return self.num_params + moved

    def publish(self, round_: int) -> tuple[np.ndarray, int]:
        """``broadcast``, and the aggregator starts the round. Called with two returns, the
        weights are put in the object store once and every pool reads that one copy."""
        flat, downlink_bytes = self.broadcast(round_)
        self.begin_round()
        return flat, downlink_bytes

    # --- uplink ---------------------------------------------------------------------------
    def begin_round(self) -> None:
        self.kept_updates = []
        self.aggregator.begin_round(self._uplinked(self.weights))

    def _uplinked(self, weights: np.ndarray) -> np.ndarray:
        return weights if self.mask is None else weights[self.mask]

    def accumulate(self, slot: int, chunk: TrainedChunk, blob: np.ndarray,
                   weights: np.ndarray, assigned_bits: np.ndarray,
                   ranks: np.ndarray | None = None) -> ChunkVerdicts:
        """Check and decode one pool's payloads and hand them to the aggregator.

        A client whose pool reports it failed, a payload that fails to decode, and one
        whose bit width is not the one its policy assigned (``bits_mismatch``) are rejected
        with their reason and never touch the model. A client of a smaller LoRA rank
        (``ranks``) sends its first components only; the rest of its update is zero. Norm clipping
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
                delta = self._decode(payload, None if ranks is None else int(ranks[i]))
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
            if self.lora_layers:  # exact LoRA aggregation needs each client's factors
                self.kept_updates.append((int(chunk.client_id[i]), float(weights[i]), delta))
            decode_s += t1 - t0
            aggregate_s += time.perf_counter() - t1
        return ChunkVerdicts(rejected, screened, sent_bits, decode_s, aggregate_s)

    def _decode(self, payload, rank: int | None) -> np.ndarray:
        idx, size, layout = self.uplink_part(rank)
        if idx is None:
            return codec.decode(payload, layout, size)
        delta = np.zeros(self.num_params, dtype=np.float32)
        delta[idx] = codec.decode(payload, layout, size)
        return delta

    def finish_round(self) -> RoundOutcome:
        """The aggregator's step, then the server EMA of the new weights."""
        result = self.aggregator.finish()
        if result.aggregated:
            self.weights = self._new_weights(result)
            self.ema = ema_update(self.ema, self.weights, self.cfg.server.ema_decay)
        return RoundOutcome(result.aggregated, result.update_norm, result.verdicts)

    def _new_weights(self, result) -> np.ndarray:
        if self.mask is None:
            return result.weights
        new = self.weights.copy()
        new[self.mask] = result.weights
        if self.lora_layers:
            kept = [(w, d) for cid, w, d in self.kept_updates
                    if cid not in result.verdicts or result.verdicts[cid].kept]
            new = add_residuals(new, self.weights, self.lora_layers, self.trainable, kept,
                                self.cfg.server.lr)
        self.kept_updates = []
        return new

    # --- evaluation -----------------------------------------------------------------------
    def sampling_weights(self) -> np.ndarray:
        """The weights that sample and get saved: the EMA when enabled, else the global model."""
        return self.ema if self.ema is not None else self.weights

    def evaluate(self, seed: int, untrained: bool = False, threads: int | None = None
                 ) -> tuple[dict, np.ndarray]:
        """Evaluate the sampling weights (or the untrained model): metrics and a grid.
        ``threads``: torch threads meanwhile (the pools are idle: use the cores)."""
        from ssdiff_ray.model.unet import get_flat, set_flat, unet_for
        from ssdiff_ray.threads import set_threads

        weights = get_flat(unet_for(self.cfg)) if untrained else self.sampling_weights()
        set_flat(self.unet, weights)
        if threads is not None:
            set_threads(threads)
        try:
            return self._evaluator().evaluate(self.unet, self.scheduler, seed,
                                              with_attack=not untrained)
        finally:
            if threads is not None:
                set_threads(self.cfg.ray.torch_threads)

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
        """The model as a diffusers pipeline at ``path``; in LoRA mode that is the merged
        model, and the adapter goes beside it (``adapter/``, peft's format), with the base it
        applies to: the pretrained model, or ``adapter_base/`` when exact aggregation moved it."""
        from pathlib import Path

        from ssdiff_ray.model.pipeline import save_pipeline
        from ssdiff_ray.model.unet import set_flat

        set_flat(self.unet, self.sampling_weights())
        self.unet.cpu()
        if self.mask is None:
            save_pipeline(self.unet, self.scheduler, path)
        else:
            from ssdiff_ray.model.adapters import merged_unet, save_adapter

            save_pipeline(merged_unet(self.unet), self.scheduler, path)
            base = self.cfg.model.pretrained
            if self.lora_layers:
                base = str(Path(path).parent / "adapter_base")
                self._save_base(base)
            save_adapter(self.unet, Path(path).parent / "adapter", self.cfg.lora, base)
        self.unet.to(self.device)

    def _save_base(self, path: str) -> None:
        """The base weights the adapter applies to (exact aggregation moved them)."""
        from ssdiff_ray.model.adapters import merged_unet
        from ssdiff_ray.model.pipeline import save_pipeline

        save_pipeline(merged_unet(self.unet, with_adapters=False), self.scheduler, path)


ParameterServerActor = ray.remote(ParameterServer)
