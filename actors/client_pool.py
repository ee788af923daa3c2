"""The pool actor: virtual clients, many per process, each with its own shard, randomness
and residual.

``ClientPool`` is a plain class (tests and the no-framework floor benchmark call it
directly); ``ClientPoolActor`` is the same class as a Ray actor. The driver imports this
module to define the actor and must not load torch (~330 MB and ~5 s of imports it never
uses), so the modules that need torch are imported inside the methods, in the actor's
process.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ssdiff_ray import codec, faults
from ssdiff_ray.attacks import attack_spec, make_attack, target_class
from ssdiff_ray.client_state import ClientStateStore
from ssdiff_ray.config import Config
from ssdiff_ray.data.shards import read_shard, shard_path
from ssdiff_ray.model.lora_ranks import RankParts
from ssdiff_ray.round_results import TrainedChunk

SHARD_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class PoolSetup:
    """What a pool is built from; ``token`` names the run it serves (``driver.warm``)."""
    cfg: Config
    shard_dir: str
    device: str = "cpu"
    reuse_blob: bool = False
    threads: int | None = None
    token: str = ""


class ClientPool:
    """The clients one pool hosts. One model + optimizer serve them all in turn."""

    def __init__(self, cfg: Config, shard_dir: str | Path, device: str = "cpu",
                 reuse_blob: bool = False, threads: int | None = None, token: str = ""):
        from ssdiff_ray.batched import BatchedTrainer
        from ssdiff_ray.model.unet import build_scheduler, param_layout, unet_for
        from ssdiff_ray.threads import set_threads
        from ssdiff_ray.train import LocalTrainer

        if getattr(self, "residuals", None) is not None:  # reset: the last run's spill file
            self.residuals.close()

        if threads is not None:
            set_threads(threads)
        self.cfg = cfg
        self.token = token
        # A Ray actor copies its result into the object store as it returns, so it can
        # hand every call the same blob buffer (no 64 MB allocation and page faults per
        # chunk); a direct caller that keeps results across calls must not (the default).
        self.reuse_blob = reuse_blob
        self._blob = np.empty(0, dtype=np.uint8)
        self.shard_dir = Path(shard_dir)
        self.device = device
        unet = unet_for(cfg).to(device)
        sched = build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
        # What clients upload: every parameter, or only the adapters (train.mode = lora).
        # A client of a smaller LoRA rank uploads only its components (``uplink_part``).
        self.uplink_part = RankParts(param_layout(unet, trainable_only=True), cfg.lora.rank)
        _, self.num_params, self.layout = self.uplink_part(None)
        t = cfg.train
        self.trainer = LocalTrainer(unet, sched.alphas_cumprod, t.lr, t.grad_clip, t.label_dropout,
                                    t.warmup_steps)
        self.batched = BatchedTrainer(unet, sched.alphas_cumprod, t.lr, t.grad_clip,
                                      label_dropout=t.label_dropout, warmup_steps=t.warmup_steps)
        self.conditional = cfg.model.conditional
        # Shards are read on first use and kept while they fit SHARD_CACHE_BYTES (least
        # recently used go): with 100,000 clients, keeping all would grow with the population.
        self.shards: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._shard_bytes = 0
        c = cfg.clients  # error feedback, only after a first upload; bounded in RAM
        self.residuals = ClientStateStore(self.num_params, int(c.state_cache_mib * 2**20),
                                          c.state_dtype, c.state_dir or None)
        self.attack = self._make_attack(sched.alphas_cumprod)  # None: all clients benign
        self.faults = faults.parse_faults(cfg.faults.inject)  # injected faults (tests, chaos)

    def reset(self, setup: PoolSetup) -> int:
        """Become a pool of another run (``driver.warm``): all state is built again as by a
        fresh actor; only the imports are kept. Returns the pid."""
        self.__init__(setup.cfg, setup.shard_dir, setup.device, setup.reuse_blob, setup.threads,
                      setup.token)
        return os.getpid()

    def _make_attack(self, alphas_cumprod):
        spec = attack_spec(self.cfg)
        if spec is None:
            return None
        targets = None
        if target_class(spec.target) is not None:
            from ssdiff_ray.attacks.base import target_images
            from ssdiff_ray.data import load_dataset

            data = load_dataset(self.cfg.data)
            targets = target_images(spec, data.images, data.labels)
        return make_attack(spec, alphas_cumprod, targets)

    def images(self, client_id: int) -> np.ndarray:
        return self.shard(client_id)[0]

    def shard(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of a client's shard, read on first use."""
        if client_id in self.shards:
            self.shards.move_to_end(client_id)
            return self.shards[client_id]
        images, labels = self.shards[client_id] = read_shard(shard_path(self.shard_dir, client_id))
        self._shard_bytes += images.nbytes + labels.nbytes
        while len(self.shards) > 1 and self._shard_bytes > SHARD_CACHE_BYTES:
            _, (i, lab) = self.shards.popitem(last=False)
            self._shard_bytes -= i.nbytes + lab.nbytes
        return images, labels

    def labels(self, client_id: int) -> np.ndarray | None:
        """A client's labels when the model is class-conditional, else None."""
        return self.shard(client_id)[1] if self.conditional else None

    def _payload_buffer(self, client_ids: np.ndarray, bits: np.ndarray, ranks
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sizes, offsets, blob): payload sizes are known before encoding, so each payload
        is encoded straight into its slice of one blob (no bytes objects, no join)."""
        sizes = []
        for c, b, r in zip(client_ids, bits, ranks):
            fault = self.faults.get(int(c))
            size = codec.encoded_size(self.uplink_part(r)[1], faults.sent_bits(int(b), fault),
                                      self.cfg.quant.block_size)
            sizes.append(faults.payload_size(size, fault))
        sizes = np.array(sizes, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if not self.reuse_blob:
            return sizes, offsets, np.empty(int(offsets[-1]), dtype=np.uint8)
        if self._blob.size < offsets[-1]:
            self._blob = np.empty(int(offsets[-1]), dtype=np.uint8)
        return sizes, offsets, self._blob[:int(offsets[-1])]

    def _encode(self, client_id: int, delta: np.ndarray, bits: int, seed: int,
                out: np.ndarray, rank: int | None = None, round_: int = 0) -> str:
        """Quantize ``delta`` (its rank-``rank`` part) into ``out``, with this client's
        error-feedback residual. Returns "" or why nothing was sent: a diverged client
        (NaN, Inf) is rejected alone, its pool's other clients go on."""
        if not np.isfinite(delta).all():
            return "non_finite"
        idx, _, layout = self.uplink_part(rank)
        if idx is not None:
            delta = delta[idx]
        q = self.cfg.quant
        rng = np.random.default_rng(seed)
        fault = self.faults.get(client_id)
        bits = faults.sent_bits(bits, fault)
        if fault is not None and fault[0] in ("truncate", "oversize"):
            full = np.zeros(codec.encoded_size(len(delta), bits, q.block_size), np.uint8)
            codec.encode_into(full, delta, bits, q.block_size, rng, layout)
            out[:] = 0
            n = min(len(out), len(full))
            out[:n] = full[:n]
            return ""
        # EF diverges at 1 bit (the quantizer's error exceeds ||v||^2), so skip it there.
        if q.error_feedback and 2 <= bits < 32:
            _, residual = codec.quantize_with_feedback(
                delta, self.residuals.get(client_id), bits, q.block_size, rng, layout, out=out)
            self.residuals.put(client_id, residual, round_)
        else:
            codec.encode_into(out, delta, bits, q.block_size, rng, layout)
        return ""

    def train_round(self, global_flat: np.ndarray, round_: int, client_ids: np.ndarray,
                    bits: np.ndarray, steps: np.ndarray, ranks: np.ndarray | None = None,
                    setup: PoolSetup | None = None) -> tuple[TrainedChunk, np.ndarray]:
        """Train, encode and pack every listed client: (report, blob of all payloads).
        ``ranks``: each client's LoRA rank (LoRA mode). With ``reuse_blob`` the blob is only
        valid until the next call. ``setup``: the run this call belongs to; a pool set up for
        another (a kept pool that Ray restarted with its first run's arguments) resets first."""
        from ssdiff_ray.batched import use_batched
        from ssdiff_ray.train import client_seed, round_lr

        if setup is not None and setup.token != self.token:
            self.reset(setup)
        cfg, t = self.cfg, self.cfg.train
        n = len(client_ids)
        loss, norm, train_s, encode_s = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        failed = np.full(n, "", dtype=object)
        ranks = [None] * n if ranks is None else [int(r) for r in ranks]
        sizes, offsets, blob = self._payload_buffer(client_ids, bits, ranks)
        seeds = [client_seed(cfg.seed, int(c), round_) for c in client_ids]
        poisons = [self.attack.poison_for(int(c)) if self.attack is not None else None
                   for c in client_ids]
        lr = round_lr(t.lr, t.lr_final, t.lr_schedule, round_, cfg.rounds)
        deltas = None
        if t.mode == "full" and use_batched(cfg.ray.batched_clients, self.device,
                                            np.asarray(steps)):
            t0 = time.perf_counter()
            deltas, loss[:] = self.batched.train(
                global_flat, [self.images(int(c)) for c in client_ids], int(steps[0]),
                t.batch_size, seeds, poisons, lr, [self.labels(int(c)) for c in client_ids])
            train_s[:] = (time.perf_counter() - t0) / n
        for i, cid in enumerate(client_ids):
            cid = int(cid)
            if cancelled():  # the round timed out: the rest of the call is dropped anyway
                failed[i:] = "cancelled"
                break
            t0 = time.perf_counter()
            faults.before_training(self.faults.get(cid), cancelled)
            if deltas is None:
                delta, loss[i] = self.trainer.train(global_flat, self.images(cid), int(steps[i]),
                                                    t.batch_size, seeds[i], poisons[i], lr,
                                                    self.labels(cid), self._masked(ranks[i]))
                train_s[i] = time.perf_counter() - t0
            else:
                delta = deltas[i]
            if self.attack is not None:
                delta = self.attack.scale_update(cid, delta)
            delta = faults.corrupt_update(delta, self.faults.get(cid))
            t1 = time.perf_counter()
            norm[i] = float(np.linalg.norm(delta))
            failed[i] = self._encode(cid, delta, int(bits[i]), seeds[i],
                                     blob[offsets[i]:offsets[i + 1]], ranks[i], round_)
            encode_s[i] = time.perf_counter() - t1
        sent = np.where(failed == "", sizes, 0)  # a client that failed sent nothing
        report = TrainedChunk(np.asarray(client_ids, dtype=np.int64), loss, norm, sent, offsets,
                              train_s, encode_s, os.getpid(), failed)
        return report, blob

    def _masked(self, rank: int | None) -> int | None:
        """The rank to mask training to, None when the client trains the full rank."""
        return None if rank is None or rank == self.cfg.lora.rank else rank

    def state_since(self, round_: int, after: int = -1, max_bytes: int = 64 << 20
                    ) -> list[tuple[int, int, np.ndarray]]:
        """What must survive a restart and changed after round ``round_`` (the last
        checkpoint): (client, round, residual) rows of the clients after ``after``, at most
        ``max_bytes`` of them (at least one row): the caller asks again from the last one."""
        rows, nbytes = [], 0
        for row in self.residuals.changed_since(round_, after):
            rows.append(row)
            nbytes += row[2].nbytes
            if nbytes >= max_bytes:
                break
        return rows

    def load_state(self, rows: list[tuple[int, int, np.ndarray]]) -> None:
        """Take residual rows from a checkpoint."""
        self.residuals.load(rows)

    def clear_state(self) -> None:
        """Drop every client's residual and the spill file (resume, shutdown)."""
        self.residuals.close()

    def state_stats(self) -> dict:
        """The residual store's entries and bytes in RAM and on disk (``ssdiff stress``)."""
        return self.residuals.stats()

    def ping(self) -> int:
        """The process id: after a crash Ray re-runs ``__init__`` in a new process, and the
        driver records that the clients' state (residuals) was reset."""
        return os.getpid()


def cancelled() -> bool:
    """The driver cancelled this call (``ray.cancel``: the round timed out). Ray cannot
    interrupt a running actor task, so the pool checks between clients. False outside Ray
    (tests call ``ClientPool`` directly)."""
    try:
        return ray.get_runtime_context().is_canceled()
    except Exception:  # noqa: BLE001 - not inside a Ray task
        return False


ClientPoolActor = ray.remote(ClientPool)
