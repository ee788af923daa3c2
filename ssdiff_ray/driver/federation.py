"""One federated run on Ray, read top to bottom in ``Federation.fit``: plan, dispatch,
collect, aggregate, record, evaluate, checkpoint.

The driver plans each round with core functions (selection, bits, simulated costs), sends
the published weights' reference to every pool that has work, and hands each pool's report
to the parameter server as it arrives (``ray.wait``). Payload bytes go pool -> object store
-> server; the driver only touches per-client metadata, and never imports torch.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayError
from tqdm import tqdm

from actors.client_pool import ClientPoolActor, PoolSetup
from actors.parameter_server import ParameterServerActor
from ssdiff_ray import checkpoint
from ssdiff_ray.attacks import attack_spec
from ssdiff_ray.client_state import ClientStateError
from ssdiff_ray.client_state_file import ClientStateFile
from ssdiff_ray.config import Config
from ssdiff_ray.driver import warm
from ssdiff_ray.images import save_grid
from ssdiff_ray.ledger import ClientResults, Ledger, client_rows, round_row
from ssdiff_ray.planner import RoundPlan, RoundPlanner
from ssdiff_ray.round_results import RoundOutcome
from ssdiff_ray.run_dir import Prepared

CHECKPOINT_FORMAT = 4  # bump when the checkpoint's layout changes
CHUNK_BYTES = 64 << 20  # payload bytes per train_round call (see dispatch)


def pool_count(cfg: Config, num_clients: int) -> int:
    """Pools requested, or one per available CPU (or GPU share) of the Ray cluster."""
    if cfg.clients.pools > 0:
        return min(cfg.clients.pools, num_clients)
    if cfg.ray.num_gpus_per_pool > 0 and _has_gpu():
        n = int(_free("GPU") / cfg.ray.num_gpus_per_pool)
    else:
        n = int(_free("CPU") / max(cfg.ray.num_cpus_per_pool, 1e-3))
    return max(1, min(n, num_clients))


def _has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _free(resource: str) -> float:
    """Available ``resource`` ("CPU", "GPU"), counting what this process's kept pools hold
    (a run takes or kills them before it starts its own)."""
    held = warm.held()[resource]
    return ray.available_resources().get(resource, 0 if resource == "GPU" else 1) + held


def server_placement(cfg: Config) -> dict:
    """Pin the parameter server: to a node offering ``ray.server_resource``, else to the
    driver's node (the head, for a submitted job), never wherever a pool left room."""
    if cfg.ray.server_resource:
        return {"resources": {cfg.ray.server_resource: 0.001}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


class Federation:
    """One federated run: actors, planner and ledger."""

    def __init__(self, prep: Prepared):
        self.cfg = cfg = prep.cfg
        self.prep = prep
        self.num_pools = pool_count(cfg, cfg.clients.count)
        self.server_key = cfg.ray.server_resource or ray.get_runtime_context().get_node_id()
        self.server, self.pools = self._start_actors()
        # Model facts come from the server: the driver never imports torch (memory, start-up).
        self.num_params, flops, downlink = ray.get(self.server.model_facts.remote())
        ray.get([p.ping.remote() for p in self.pools])  # started: round timeouts exclude start-up
        self.planner = RoundPlanner(cfg, prep, self.num_params, flops, self.num_pools, downlink)
        self.ledger = Ledger(prep.run_dir)
        spec = attack_spec(cfg)
        self.malicious_ids = np.array(sorted(spec.malicious_ids) if spec else [], dtype=np.int64)
        self.suspect: set[int] = set()   # pools that failed and may be restarting
        self.restarted: set[int] = set()  # pools that failed or came back in a new process
        self.setup_ref = ray.put(self.setup)  # every call names its run (ClientPool.train_round)
        self.pool_pid: dict[int, int] = {}
        self.last_round = 0
        self.run_id = uuid.uuid4().hex   # names the run's client-state file (a resume keeps it)
        self.state_file: ClientStateFile | None = None
        self.state_round = 0             # round of the last checkpoint's client state
        self.baseline: dict = {}         # the untrained model's FID and the real floor
        self.eval_threads = max(1, int(ray.available_resources().get("CPU", 1)))
        self.placement = self._placement()

    def _start_actors(self):
        cfg = self.cfg
        device = "cuda" if _has_gpu() and cfg.ray.num_gpus_per_pool > 0 else "cpu"
        cpus = min(cfg.ray.num_cpus_per_pool, _free("CPU") / self.num_pools)
        gpus = cfg.ray.num_gpus_per_pool if device == "cuda" else 0
        resources = dict(cfg.ray.pool_resources)
        # reuse_blob: the actor's results are copied into the object store (ClientPool)
        self.setup = PoolSetup(cfg, str(self.prep.shard_dir), device, reuse_blob=True,
                               threads=cfg.ray.torch_threads, token=uuid.uuid4().hex)
        self.pool_key = (cpus, gpus, tuple(sorted(resources.items())), cfg.ray.max_restarts,
                         device)
        pools = []
        for pool in warm.take_pools(self.pool_key, self.num_pools):  # a finished run's pools
            try:
                ray.get(pool.reset.remote(self.setup))
                pools.append(pool)
            except RayError:  # it died meanwhile: start a fresh one instead
                pass
        s = self.setup
        pools += [
            ClientPoolActor.options(
                num_cpus=cpus, num_gpus=gpus, resources=resources or None,
                max_restarts=cfg.ray.max_restarts, scheduling_strategy="SPREAD",
            ).remote(s.cfg, s.shard_dir, s.device, s.reuse_blob, s.threads, s.token)
            for _ in range(self.num_pools - len(pools))
        ]
        args = (cfg, self.num_pools, "cpu", cfg.ray.torch_threads)
        server = warm.take(self.server_key)  # a finished run's server, if this process has one
        if server is not None:
            try:
                ray.get(server.reset.remote(*args))
            except RayError:  # it died meanwhile: start a fresh one
                server = None
        if server is None:
            # The server is idle while pools train, so it asks for no CPU of its own; it
            # borrows the cores for evaluation, when the pools are idle.
            server = ParameterServerActor.options(num_cpus=0, num_gpus=0.0,
                                                  **server_placement(cfg)).remote(*args)
        return server, pools

    def _placement(self) -> dict:
        """Which node each actor runs on, and the server node's custom resources."""
        def node_of(actor) -> str:
            return ray.get(actor.__ray_call__.remote(
                lambda _: ray.get_runtime_context().get_node_id()))

        server = node_of(self.server)
        res = next((n.get("Resources", {}) for n in ray.nodes() if n["NodeID"] == server), {})
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory",
                  "object_store_memory") and not k.startswith("node:")}
        return {"server_node": server, "server_node_resources": custom,
                "pool_nodes": [node_of(p) for p in self.pools]}

    # --- the run --------------------------------------------------------------------------
    def fit(self, start: int = 1, progress: bool = True, on_round=None, trackers=None) -> None:
        """Run rounds ``start``..``rounds``; ``on_round(federation, round, row)`` after each
        (the ledger's row, the round's time split and a checkpoint's cost), and each round's
        row to ``trackers`` (TensorBoard, MLflow) if given."""
        cfg = self.cfg
        if cfg.eval.baseline and start == 1:
            self.baseline = {"fid_untrained": self.evaluate(0, untrained=True)["fid"],
                             "fid_floor": ray.get(self.server.fid_floor.remote())}
        bar = tqdm(total=cfg.rounds, initial=start - 1, disable=not progress, unit="round",
                   desc="federated", dynamic_ncols=True)
        for r in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            plan = self.planner.plan(r)
            t_plan = time.perf_counter()
            weights_ref, downlink_bytes = self.publish(r)
            calls = self.dispatch(plan, weights_ref)
            t_dispatch = time.perf_counter()
            results, verdicts, failures = self.collect(plan, calls, t0 + cfg.server.round_timeout_s)
            t_train = time.perf_counter()
            outcome, timings = self.aggregate(plan, results, verdicts)
            t_agg = time.perf_counter()
            timings.update(wall_s=t_agg - t0, train_wall_s=t_train - t0, pool_failures=failures)
            row = self.record(plan, results, outcome, downlink_bytes, timings)
            split = {"plan_s": t_plan - t0, "dispatch_s": t_dispatch - t_plan,  # on_round only
                     "collect_s": t_train - t_dispatch, "finish_s": t_agg - t_train,
                     "record_s": time.perf_counter() - t_agg}
            evaluated = {}
            if r == cfg.rounds or _due(r, cfg.eval.every):
                evaluated = self.evaluate(r)
                row.update(evaluated)
            if _due(r, cfg.server.checkpoint_every):
                t1 = time.perf_counter()
                # a copy: the ledger's row stays the same whether or not a checkpoint ran
                row = {**row, **self.checkpoint(), "checkpoint_s": time.perf_counter() - t1}
            if trackers:
                grid = self.prep.run_dir / "samples" / f"round_{r:04d}.png"
                trackers.log_round(r, row, evaluated, grid if evaluated else None)
            bar.set_postfix(loss=f"{row['loss']:.4f}", fid=f"{row.get('fid', math.nan):.2f}",
                            refresh=False)
            bar.update(1)
            if on_round is not None:
                on_round(self, r, {**row, **split})
        bar.close()
        self.checkpoint()
        self.save_model()

    def publish(self, r: int):
        """The server puts this round's weights in the object store once: (ref, bytes)."""
        self._wait_for_restarts()
        weights_ref, downlink_ref = self.server.publish.options(num_returns=2).remote(r)
        return weights_ref, ray.get(downlink_ref)

    def dispatch(self, plan: RoundPlan, weights_ref) -> dict[int, list]:
        """Start every pool's training: its clients (stragglers excepted) in chunks of at
        most CHUNK_BYTES of payloads, so the server decodes one chunk while the pools train
        the next, and the object store holds a few chunks, not a round's payloads.
        Returns, per pool, its calls in order: (report ref, pool, client indices, blob ref)."""
        pool_of = plan.client_ids % self.num_pools
        per_chunk = max(1, CHUNK_BYTES // max(1, int(plan.costs["upload_bytes"].max(initial=1))))
        calls: dict[int, list] = {}
        for slot in range(self.num_pools):
            idx_all = np.flatnonzero((pool_of == slot) & ~plan.straggler)
            for s in range(0, len(idx_all), per_chunk):
                idx = idx_all[s:s + per_chunk]
                report_ref, blob_ref = self.pools[slot].train_round.options(num_returns=2).remote(
                    weights_ref, plan.round, plan.client_ids[idx], plan.bits[idx],
                    plan.local_steps[idx], None if plan.ranks is None else plan.ranks[idx],
                    self.setup_ref)
                calls.setdefault(slot, []).append((report_ref, slot, idx, blob_ref))
        return calls

    def collect(self, plan: RoundPlan, calls: dict[int, list], deadline: float):
        """Hand each report to the server as it arrives, until all are in or the round
        times out. Only each pool's next call is waited on, so a pool's chunks reach the
        server in order and the aggregate stays independent of timing.
        Returns (per-client results, pending server verdicts, failed pool count)."""
        res = ClientResults.start(plan)
        pending = {q[0][0]: q.pop(0) for q in calls.values()}
        verdicts, failed = [], set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            report_ref, slot, idx, blob_ref = pending.pop(ready[0])
            if calls[slot]:
                nxt = calls[slot].pop(0)
                pending[nxt[0]] = nxt
            try:
                report = ray.get(report_ref)
            except RayError as e:
                if isinstance(getattr(e, "cause", None), ClientStateError):
                    raise e.cause from None  # a full disk: stop, resetting no client's state
                res.drop_reason[idx] = "pool_failed"
                failed.add(slot)
                self.suspect.add(slot)
                self.restarted.add(slot)
                continue
            for k in ("loss", "update_norm", "uplink_bytes", "train_s", "encode_s"):
                getattr(res, k)[idx] = getattr(report, k)
            # A new process behind the same actor: its clients' residuals started empty.
            res.state_reset[idx] = self.pool_pid.get(slot, report.pid) != report.pid
            if res.state_reset[idx].any():
                self.restarted.add(slot)
            self.pool_pid[slot] = report.pid
            weights = plan.num_samples[idx].astype(np.float64)
            ranks = None if plan.ranks is None else plan.ranks[idx]
            verdicts.append((idx, self.server.accumulate.remote(slot, report_ref, blob_ref,
                                                                weights, plan.bits[idx], ranks)))
        for report_ref, _, idx, _ in [*pending.values(), *(c for q in calls.values() for c in q)]:
            res.drop_reason[idx] = "timeout"  # past the round timeout
            # Queued calls are dropped; a running one stops at its next client (the pool
            # checks), so the next round does not wait behind a straggler's leftovers.
            ray.cancel(report_ref)
        return res, verdicts, len(failed)

    def aggregate(self, plan: RoundPlan, res: ClientResults, verdicts: list
                  ) -> tuple[RoundOutcome, dict]:
        """Collect the server's decode verdicts, then let it aggregate; mark rejected and
        screened clients. Returns the outcome and the server's decode/aggregate seconds."""
        timings = {"decode_s": 0.0, "aggregate_s": 0.0}
        for idx, ref in verdicts:
            v = ray.get(ref)
            res.rejected_reason[idx] = v.rejected_reason
            res.screened[idx] = v.screened
            res.sent_bits[idx] = v.sent_bits
            timings["decode_s"] += v.decode_s
            timings["aggregate_s"] += v.aggregate_s
        res.drop_reason[(res.rejected_reason != "") & (res.drop_reason == "")] = "rejected"
        outcome = ray.get(self.server.finish_round.remote())
        pos = {int(c): i for i, c in enumerate(plan.client_ids)}
        for cid, verdict in outcome.verdicts.items():
            i = pos[int(cid)]
            res.screened[i] = True
            if not verdict.kept:
                res.rejected_reason[i] = verdict.reason
                res.drop_reason[i] = "screened"
        return outcome, timings

    def record(self, plan: RoundPlan, res: ClientResults, outcome: RoundOutcome,
               downlink_bytes: int, timings: dict) -> dict:
        """Add the round's rows to the ledger; the planner remembers what clients reported."""
        mean_loss = self.planner.observe(plan, res.loss, res.update_norm)
        clients = client_rows(plan, res, self.prep.population, self.num_pools,
                              self.malicious_ids, downlink_bytes)
        row = round_row(plan, res, mean_loss, outcome.aggregated, outcome.update_norm,
                        downlink_bytes, timings)
        self.ledger.add_round(clients, row)
        self.last_round = plan.round
        return row

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

    # --- evaluation, checkpoints, outputs -------------------------------------------------
    def evaluate(self, r: int, untrained: bool = False) -> dict:
        """Evaluate on the server (it borrows the idle cores); write the sample grid."""
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

    def checkpoint(self) -> dict:
        """Server, pools' client state, planner memory and ledger, as of ``last_round``.
        Client state is written incrementally: only what changed since the last checkpoint.
        Returns what the client-state part wrote (rows, bytes)."""
        if self.state_file is None:  # a fresh run's first checkpoint
            self.state_file = ClientStateFile(self.prep.run_dir, self.run_id, self.num_params,
                                              self.cfg.clients.state_dtype, create=True)
        rows = nbytes = 0
        for pool in self.pools:  # at most CHUNK_BYTES of rows in the driver at a time
            after = -1
            while batch := _get_while_restarting(
                    lambda p=pool, a=after: p.state_since.remote(self.state_round, a, CHUNK_BYTES)):
                n, b = self.state_file.write(batch, committed=self.state_round)
                rows, nbytes, after = rows + n, nbytes + b, batch[-1][0]
        state = {
            "format": CHECKPOINT_FORMAT, "round": self.last_round, "run_id": self.run_id,
            "server": ray.get(self.server.state_dict.remote()),
            "planner": self.planner.state_dict(), "baseline": self.baseline,
        }
        checkpoint.save(self.prep.run_dir, state, self.last_round, before_commit=self.ledger.flush)
        self.state_round = self.last_round
        return {"state_rows": rows, "state_bytes": nbytes}

    def restore(self, run_dir: Path) -> int:
        """Load the last checkpoint; returns its round (the run continues after it)."""
        state = checkpoint.load(run_dir)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise checkpoint.CheckpointError(
                f"{run_dir / checkpoint.CHECKPOINT}: written by another version of ssdiff "
                "(checkpoint format differs); start the run again")
        ray.get(self.server.load_state_dict.remote(state["server"]))
        self.run_id = state["run_id"]
        self.state_file = ClientStateFile(run_dir, self.run_id, self.num_params,
                                          self.cfg.clients.state_dtype, create=False)
        self._load_client_state(state["round"])
        self.planner.load_state_dict(state["planner"])
        self.baseline = state.get("baseline", {})
        self.ledger = Ledger.load(run_dir)
        self.ledger.truncate(state["round"])
        self.last_round = state["round"]
        return state["round"]

    def _load_client_state(self, through: int) -> None:
        """Hand each client's residual to the pool that now hosts it (client i lives in pool
        i % num_pools; a resumed run may get another pool count), in batches."""
        n = len(self.pools)
        ray.get([p.clear_state.remote() for p in self.pools])
        batches: list[list] = [[] for _ in range(n)]
        sizes = [0] * n
        pending: list = []
        for cid, r, value in self.state_file.read(through):
            i = cid % n
            batches[i].append((cid, r, value))
            sizes[i] += value.nbytes
            if sizes[i] >= CHUNK_BYTES:
                pending.append(self.pools[i].load_state.remote(batches[i]))
                batches[i], sizes[i] = [], 0
                if len(pending) > 2 * n:  # bounded: the object store need not hold it all
                    _, pending = ray.wait(pending, num_returns=len(pending) - n)
        ray.get(pending + [p.load_state.remote(b) for p, b in zip(self.pools, batches) if b])
        self.state_round = through

    def save_model(self) -> Path:
        path = self.prep.run_dir / "model"
        ray.get(self.server.save_model.remote(str(path)))
        return path

    def shutdown(self, keep: bool = False) -> None:
        """Kill the actors; with ``keep`` (the run finished) the server, and the pools Ray
        never restarted, are kept for the next run of this process instead (``driver.warm``)."""
        kept = [i for i in range(len(self.pools)) if keep and i not in self.restarted]
        if keep:
            warm.give(self.server_key, self.server)
            warm.give_pools(self.pool_key, [self.pools[i] for i in kept], self.cfg.ray.keep_pools_s)
        dead = [p for i, p in enumerate(self.pools) if i not in kept]
        try:  # their spill files now, not at the next pool's start-up sweep
            ray.get([p.clear_state.remote() for p in dead], timeout=30)
        except Exception:  # noqa: BLE001 - a dead or busy pool: the sweep removes it later
            pass
        for a in ([] if keep else [self.server]) + dead:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _due(r: int, every: int) -> bool:
    """Round ``r`` is a multiple of ``every`` (0 = never)."""
    return every > 0 and r % every == 0


__all__ = ["Federation", "pool_count", "server_placement"]


def _get_while_restarting(submit, timeout_s: float = 120.0):
    """ray.get(submit()), submitted again while an actor is still restarting: right after a
    pool failure the checkpoint asks the restarted actor for its state, and Ray answers
    ActorUnavailableError until the restart is done (how long depends on the node's load)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(submit())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
