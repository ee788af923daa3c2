"""Virtual clients: many per process, each with its own shard, randomness and residual.

``ClientGroup`` is what a ClientPool actor holds; it runs without Ray so tests and the
no-framework floor benchmark call it directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ssdiff_ray import codec
from ssdiff_ray.batched import BatchedTrainer, use_batched
from ssdiff_ray.config import Config
from ssdiff_ray.data import read_shard
from ssdiff_ray.model import build_scheduler, build_unet, param_layout
from ssdiff_ray.security import client_attack
from ssdiff_ray.train import LocalTrainer, client_seed, round_lr


def shard_path(shard_dir: str | Path, client_id: int) -> Path:
    return Path(shard_dir) / f"client_{client_id:06d}.parquet"


class ClientGroup:
    """The clients one pool hosts. One model + optimizer serve them all in turn."""

    def __init__(self, cfg: Config, shard_dir: str | Path, device: str = "cpu",
                 reuse_blob: bool = False):
        self.cfg = cfg
        # A Ray actor copies its result into the object store as it returns, so it can
        # hand every call the same blob buffer (no 64 MB allocation and page faults per
        # chunk); a direct caller that keeps results across calls must not (the default).
        self.reuse_blob = reuse_blob
        self._blob = np.empty(0, dtype=np.uint8)
        self.shard_dir = Path(shard_dir)
        self.device = device
        unet = build_unet(cfg.model.preset, cfg.data.image_size, seed=cfg.seed).to(device)
        sched = build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
        self.layout = codec.layout_id(param_layout(unet))
        self.num_params = sum(p.numel() for p in unet.parameters())
        self.trainer = LocalTrainer(unet, sched.alphas_cumprod, cfg.train.lr, cfg.train.grad_clip)
        self.batched = BatchedTrainer(unet, sched.alphas_cumprod, cfg.train.lr, cfg.train.grad_clip)
        self.shards: dict[int, np.ndarray] = {}   # loaded on first use
        self.residuals: dict[int, np.ndarray] = {}  # error feedback, only after a first upload
        # Malicious clients of an [attack] config poison their batches (None: all benign).
        self.attack = client_attack(cfg, sched.alphas_cumprod)

    def images(self, client_id: int) -> np.ndarray:
        if client_id not in self.shards:
            self.shards[client_id] = read_shard(shard_path(self.shard_dir, client_id))[0]
        return self.shards[client_id]

    def train_round(
        self,
        global_flat: np.ndarray,
        round_: int,
        client_ids: np.ndarray,
        bits: np.ndarray,
        steps: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Train, encode and pack every listed client; one result for the whole group.

        Returns (meta, blob): ``meta`` holds per-client arrays (loss, update_norm,
        uplink_bytes, offsets into ``blob``, timings); ``blob`` is all payloads
        back to back as one uint8 array, so Ray moves it without copying per client.
        With ``reuse_blob`` the blob is only valid until the next call.
        """
        cfg = self.cfg
        n = len(client_ids)
        loss = np.zeros(n)
        norm = np.zeros(n)
        train_s = np.zeros(n)
        encode_s = np.zeros(n)
        # Payload sizes are known before encoding: each is encoded straight into its slice of
        # one blob (no bytes objects, no list of payloads, no join).
        sizes = np.array([codec.encoded_size(self.num_params, int(b), cfg.quant.block_size)
                          for b in bits], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if not self.reuse_blob:
            blob = np.empty(int(offsets[-1]), dtype=np.uint8)
        else:
            if self._blob.size < offsets[-1]:
                self._blob = np.empty(int(offsets[-1]), dtype=np.uint8)
            blob = self._blob[:int(offsets[-1])]
        seeds = [client_seed(cfg.seed, int(c), round_) for c in client_ids]
        poisons = [self.attack.poison_for(int(c)) if self.attack is not None else None
                   for c in client_ids]
        t = cfg.train
        lr = round_lr(t.lr, t.lr_final, t.lr_schedule, round_, cfg.rounds)
        deltas = None
        if use_batched(cfg.ray.batched_clients, self.device, np.asarray(steps)):
            t0 = time.perf_counter()
            deltas, loss[:] = self.batched.train(global_flat, [self.images(int(c)) for c in client_ids],
                                                 int(steps[0]), cfg.train.batch_size, seeds, poisons, lr)
            train_s[:] = (time.perf_counter() - t0) / n
        for i, cid in enumerate(client_ids):
            cid = int(cid)
            seed = seeds[i]
            t0 = time.perf_counter()
            if deltas is None:
                delta, loss[i] = self.trainer.train(global_flat, self.images(cid), int(steps[i]),
                                                    cfg.train.batch_size, seed, poisons[i], lr)
            else:
                delta = deltas[i]
            if self.attack is not None:
                delta = self.attack.scale_update(cid, delta)
            t1 = time.perf_counter()
            norm[i] = float(np.linalg.norm(delta))
            rng = np.random.default_rng(seed)
            # EF diverges at 1 bit (the quantizer's error exceeds ||v||^2), so skip it there.
            out = blob[offsets[i]:offsets[i + 1]]  # each payload is encoded in place
            if cfg.quant.error_feedback and 2 <= int(bits[i]) < 32:
                _, self.residuals[cid] = codec.quantize_with_feedback(
                    delta, self.residuals.get(cid), int(bits[i]), cfg.quant.block_size, rng,
                    self.layout, out=out)
            else:
                codec.encode_into(out, delta, int(bits[i]), cfg.quant.block_size, rng,
                                  self.layout)
            encode_s[i] = time.perf_counter() - t1
            if deltas is None:
                train_s[i] = t1 - t0
        meta = dict(client_id=np.asarray(client_ids, dtype=np.int64), loss=loss,
                    update_norm=norm, uplink_bytes=sizes, offsets=offsets,
                    train_s=train_s, encode_s=encode_s)
        return meta, blob

    def state_dict(self) -> dict:
        """What must survive a restart: the error-feedback residuals."""
        return {"residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = dict(state.get("residuals", {}))


def set_threads(n: int) -> None:
    """One pool = ``n`` torch threads; more threads than cores across pools only thrashes."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
