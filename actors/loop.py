"""The round loop on the driver: start the actors, run rounds, evaluate, checkpoint.

The driver plans each round (selection, bits, simulated costs) with core functions,
sends the published weights reference to every pool that has work, and hands each
pool's result to the parameter server as it arrives (``ray.wait``). Payload bytes go
pool -> object store -> server; the driver only touches per-client metadata.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray.exceptions import RayError

from actors.pool import ClientPool
from actors.server import ParameterServer
from ssdiff_ray.config import Config
from ssdiff_ray.images import save_grid
from ssdiff_ray.ledger import Ledger
from ssdiff_ray.planner import RoundPlan, RoundPlanner
from ssdiff_ray.runtime import Prepared

CHECKPOINT = "checkpoint.pkl"
CHUNK_BYTES = 64 << 20  # payload bytes per train_round call (see run_round)


def pool_count(cfg: Config, num_clients: int) -> int:
    """Pools requested, or one per available CPU (or GPU share) of the Ray cluster."""
    if cfg.clients.pools > 0:
        return min(cfg.clients.pools, num_clients)
    res = ray.available_resources()
    if cfg.ray.num_gpus_per_pool > 0 and res.get("GPU", 0) > 0:
        n = int(res["GPU"] / cfg.ray.num_gpus_per_pool)
    else:
        n = int(res.get("CPU", 1) / max(cfg.ray.num_cpus_per_pool, 1e-3))
    return max(1, min(n, num_clients))


def server_placement(cfg: Config) -> dict:
    """Pin the parameter server: to a node offering ``ray.server_resource``, else to the
    driver's node (the head, for a submitted job), never wherever a pool left room."""
    if cfg.ray.server_resource:
        return {"resources": {cfg.ray.server_resource: 0.001}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


class Federation:
    """One federated run: actors, planner and ledger, driven round by round."""

    def __init__(self, cfg: Config, prep: Prepared, policy,
                 flops_per_sample_step: float | None = None):
        self.cfg = cfg
        self.prep = prep
        self.num_pools = pool_count(cfg, cfg.clients.count)
        gpu = cfg.ray.num_gpus_per_pool > 0 and ray.available_resources().get("GPU", 0) > 0
        device = "cuda" if gpu else "cpu"
        cpus = min(cfg.ray.num_cpus_per_pool,
                   ray.available_resources().get("CPU", 1) / self.num_pools)
        # The server is idle while pools train, so it asks for no CPU of its own; it
        # borrows the cores for evaluation, when the pools are idle.
        self.server = ParameterServer.options(num_cpus=0, num_gpus=0.0, **server_placement(cfg)
                                              ).remote(cfg, self.num_pools, "cpu")
        self.pools = [
            ClientPool.options(
                num_cpus=cpus, num_gpus=cfg.ray.num_gpus_per_pool if gpu else 0,
                resources=dict(cfg.ray.pool_resources) or None,
                max_restarts=cfg.ray.max_restarts, scheduling_strategy="SPREAD",
            ).remote(i, cfg, str(prep.shard_dir), device)
            for i in range(self.num_pools)
        ]
        # Model facts come from the server: the driver never imports torch (memory, start-up).
        self.num_params = ray.get(self.server.num_params.remote())
        if flops_per_sample_step is None:
            flops_per_sample_step = ray.get(self.server.flops_per_sample_step.remote())
        self.planner = RoundPlanner(cfg, prep, policy, self.num_params, flops_per_sample_step,
                                    self.num_pools)
        self.ledger = Ledger(prep.run_dir)
        self.loss_history: list[float] = []
        self.malicious_ids = np.array(ray.get(self.server.malicious_ids.remote()), dtype=np.int64)
        self.suspect: set[int] = set()   # pools that failed and may be restarting
        self.pool_pid: dict[int, int] = {}
        self.last_round = 0
        self.eval_threads = max(1, int(ray.available_resources().get("CPU", 1)))

    # --- one round ------------------------------------------------------------------------
    def run_round(self, r: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        plan = self.planner.plan(r, self.loss_history)
        self._wait_for_restarts()
        (weights_ref,), downlink_bytes = ray.get(self.server.publish.remote(r))
        n = len(plan.client_ids)
        out = {
            "loss": np.full(n, np.nan), "update_norm": np.full(n, np.nan),
            "uplink_bytes": np.zeros(n, np.int64), "train_s": np.zeros(n),
            "encode_s": np.zeros(n),
            "drop_reason": np.where(plan.straggler, "straggler", "").astype(object),
            "rejected_reason": np.full(n, "", dtype=object), "screened": np.zeros(n, bool),
            "state_reset": np.zeros(n, bool),
        }
        pool_of = plan.client_ids % self.num_pools
        # Each pool's clients go in chunks of at most CHUNK_BYTES of payloads: the server
        # decodes and aggregates one chunk while the pools train the next (not all of it
        # after training), and the object store holds a few chunks, not a round's payloads.
        per_chunk = max(1, CHUNK_BYTES // max(1, int(plan.costs["upload_bytes"].max(initial=1))))
        queued: dict[int, list] = {}
        for slot in range(self.num_pools):
            idx_all = np.flatnonzero((pool_of == slot) & ~plan.straggler)
            for s in range(0, len(idx_all), per_chunk):
                idx = idx_all[s:s + per_chunk]
                meta_ref, blob_ref = self.pools[slot].train_round.options(num_returns=2).remote(
                    weights_ref, r, plan.client_ids[idx], plan.bits[idx], plan.local_steps[idx])
                queued.setdefault(slot, []).append((meta_ref, (slot, idx, blob_ref)))
        # Only each pool's next chunk is waited on, so a pool's chunks reach the server in
        # order and the aggregate stays independent of timing.
        pending = dict(q.pop(0) for q in queued.values())
        deadline = t0 + cfg.server.round_timeout_s
        verdicts, failed = [], set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            slot, idx, blob_ref = pending.pop(ready[0])
            if queued[slot]:
                pending.update([queued[slot].pop(0)])
            try:
                meta = ray.get(ready[0])
            except RayError:
                out["drop_reason"][idx] = "pool_failed"
                failed.add(slot)
                self.suspect.add(slot)
                continue
            for k in ("loss", "update_norm", "uplink_bytes", "train_s", "encode_s"):
                out[k][idx] = meta[k]
            # A new process behind the same actor: its clients' residuals started empty.
            out["state_reset"][idx] = self.pool_pid.get(slot, meta["pid"]) != meta["pid"]
            self.pool_pid[slot] = meta["pid"]
            weights = plan.num_samples[idx].astype(np.float64)
            verdicts.append((idx, self.server.accumulate.remote(slot, ready[0], blob_ref,
                                                                weights)))
        for _slot, idx, _ in [*pending.values(), *(c for q in queued.values() for _, c in q)]:
            out["drop_reason"][idx] = "timeout"  # past the round timeout
        failures = len(failed)
        t_train = time.perf_counter()
        decode_s = aggregate_s = 0.0
        for idx, ref in verdicts:
            v = ray.get(ref)
            out["rejected_reason"][idx] = v["rejected_reason"]
            out["screened"][idx] = v["screened"]
            decode_s += v["decode_s"]
            aggregate_s += v["aggregate_s"]
        rejected = out["rejected_reason"] != ""
        out["drop_reason"][rejected & (out["drop_reason"] == "")] = "rejected"
        stats = ray.get(self.server.finish_round.remote())
        stats.update(decode_s=decode_s, aggregate_s=aggregate_s)
        pos = {int(c): i for i, c in enumerate(plan.client_ids)}
        for cid, reason in stats["screened"].items():
            i = pos[int(cid)]
            out["screened"][i] = True
            if reason.startswith("dropped:"):
                out["rejected_reason"][i] = reason[len("dropped:"):]
                out["drop_reason"][i] = "screened"
            elif not out["rejected_reason"][i]:
                out["rejected_reason"][i] = ""  # clipped but kept
        wall_s = time.perf_counter() - t0
        return self._record(plan, out, stats, downlink_bytes, wall_s, t_train - t0, failures)

    def _wait_for_restarts(self, timeout_s: float = 120.0) -> None:
        """A pool that failed is being restarted by Ray; give it time to come back."""
        deadline = time.perf_counter() + timeout_s
        for slot in sorted(self.suspect):
            while time.perf_counter() < deadline:
                try:
                    ray.get(self.pools[slot].ping.remote(), timeout=10)
                    self.suspect.discard(slot)
                    break
                except RayError:
                    time.sleep(0.2)

    def _record(self, plan: RoundPlan, out: dict, stats: dict, downlink_bytes: int,
                wall_s: float, train_wall_s: float, failures: int) -> dict:
        prof = self.prep.population.iloc[plan.client_ids]
        dropped = out["drop_reason"] != ""
        costs = plan.costs
        clients = pd.DataFrame({
            "round": plan.round, "client_id": plan.client_ids,
            "pool": plan.client_ids % self.num_pools,
            "device_class": prof["device_class"].to_numpy(),
            "num_samples": plan.num_samples, "local_steps": plan.local_steps, "bits": plan.bits,
            "uplink_bytes": out["uplink_bytes"], "downlink_bytes": downlink_bytes,
            "loss": out["loss"], "update_norm": out["update_norm"],
            "dropped": dropped, "drop_reason": out["drop_reason"].astype(str),
            "straggler": plan.straggler, "screened": out["screened"],
            "rejected_reason": out["rejected_reason"].astype(str),
            "state_reset": out["state_reset"],
            "malicious": np.isin(plan.client_ids, self.malicious_ids),
            "train_s": out["train_s"], "encode_s": out["encode_s"],
            "compute_s": costs["compute_s"], "upload_s": costs["upload_s"],
            "download_s": costs["download_s"], "compute_energy_j": costs["compute_energy_j"],
            "upload_energy_j": costs["upload_energy_j"],
            "download_energy_j": costs["download_energy_j"], "energy_j": costs["energy_j"],
            "tx_power_w": plan.tx_power_w, "cpu_hz": plan.cpu_hz, "rate_bps": costs["rate_bps"],
        })
        trained = np.isfinite(out["loss"])
        mean_loss = float(np.average(out["loss"][trained], weights=plan.num_samples[trained])) \
            if trained.any() else float("nan")
        self.loss_history.append(mean_loss)
        self.planner.observe(plan.client_ids, out["loss"], out["update_norm"])
        aggregated = ~dropped
        row = {
            "round": plan.round, "wall_s": wall_s, "train_wall_s": train_wall_s,
            "clients_selected": len(plan.client_ids), "clients_aggregated": int(stats["aggregated"]),
            "stragglers": int(plan.straggler.sum()), "pool_failures": failures,
            "uplink_bytes": int(out["uplink_bytes"][aggregated].sum()),
            "downlink_bytes": int(downlink_bytes) * int((~plan.straggler).sum()),
            "loss": mean_loss, "update_norm": stats["update_norm"],
            "mean_bits": float(plan.bits.mean()),
            "latency_s": float(costs["total_s"][aggregated].max()) if aggregated.any() else 0.0,
            "energy_j": float(costs["energy_j"].sum()),
            "train_s": float(out["train_s"].sum()), "encode_s": float(out["encode_s"].sum()),
            "decode_s": stats["decode_s"], "aggregate_s": stats["aggregate_s"],
            "fid": float("nan"),
        }
        self.ledger.add_round(clients, row)
        self.last_round = plan.round
        return row

    # --- evaluation, checkpoints, outputs -------------------------------------------------
    def evaluate(self, r: int, untrained: bool = False) -> dict:
        t0 = time.perf_counter()
        metrics, grid = ray.get(self.server.evaluate.remote(
            self.cfg.seed + 10_000 + r, untrained, self.eval_threads))
        samples = self.prep.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        if len(grid):
            save_grid(grid, samples / ("untrained.png" if untrained else f"round_{r:04d}.png"))
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, (list, np.ndarray))}
        metrics["eval_s"] = time.perf_counter() - t0
        if not untrained:
            self.ledger.update_last_round(**metrics)
        return metrics

    def checkpoint(self) -> None:
        """Server, pools' client state, planner memory and ledger, as of ``last_round``."""
        state = {
            "round": self.last_round,
            "server": ray.get(self.server.state_dict.remote()),
            "pools": ray.get([p.state_dict.remote() for p in self.pools]),
            "loss_history": self.loss_history,
            "planner": {"last_loss": self.planner.last_loss, "last_norm": self.planner.last_norm},
        }
        path = self.prep.run_dir / CHECKPOINT
        with open(path.with_suffix(".tmp"), "wb") as f:
            pickle.dump(state, f, protocol=5)
        self.ledger.flush()
        os.replace(path.with_suffix(".tmp"), path)

    def restore(self, run_dir: Path) -> int:
        """Load the last checkpoint; returns its round (the run continues after it)."""
        with open(run_dir / CHECKPOINT, "rb") as f:
            state = pickle.load(f)
        ray.get(self.server.load_state_dict.remote(state["server"]))
        # Client i lives in pool i % num_pools; the cluster may give a resumed run a different
        # pool count, so hand each client's residual to the pool that now hosts it.
        residuals: dict = {}
        for s in state["pools"]:
            residuals.update(s.get("residuals", {}))
        n = len(self.pools)
        ray.get([p.load_state_dict.remote(
            {"residuals": {c: v for c, v in residuals.items() if int(c) % n == i}})
            for i, p in enumerate(self.pools)])
        self.loss_history = list(state["loss_history"])
        self.planner.last_loss = state["planner"]["last_loss"]
        self.planner.last_norm = state["planner"]["last_norm"]
        self.ledger = Ledger.load(run_dir)
        self.ledger.truncate(state["round"])
        self.last_round = state["round"]
        return state["round"]

    def save_model(self) -> Path:
        path = self.prep.run_dir / "model"
        ray.get(self.server.save_model.remote(str(path)))
        return path

    def fid_floor(self) -> float:
        return ray.get(self.server.fid_floor.remote())

    def shutdown(self) -> None:
        for a in [self.server, *self.pools]:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


__all__ = ["Federation", "pool_count", "server_placement"]
