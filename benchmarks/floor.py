"""Round wall time and peak memory of a real federated run against the no-framework floor.

In one script run: (a) a federated run through ``api.run`` on an embedded local Ray, and
(b) the floor: the same local work (the run's selected clients per round, read back from
its clients.parquet; same seeds, steps, batch, model, data) in as many plain worker
processes as the run had pools (1 torch thread each), then a NumPy weighted average.
Peak resident memory is the sum over each side's whole process tree (RSS, and PSS, which
counts shared pages once), sampled by a thread.

    python benchmarks/floor.py                 # workloads A and B, small model
    python benchmarks/floor.py --workload A    # one of them
    python benchmarks/floor.py --workload 1k,10k --out benchmarks/results/floor_10k.json
    python benchmarks/floor.py --quick         # tiny model, few clients (CI)
    python benchmarks/floor.py --repeat 3      # each workload 3 times, median ratios
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
from provenance import args_config, write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "floor.json"

WORKLOADS = {  # name -> (clients, per_round fraction, local steps, rounds)
    "A": (100, 0.1, 5, 5),
    "B": (1000, 0.1, 1, 5),
    # many registered clients, 1% a round: the same work at 1,000 and 10,000 (issue 41)
    "1k": (1000, 0.01, 5, 6),
    "10k": (10000, 0.01, 5, 6),
}
QUICK = ["model.preset=tiny", "model.timesteps=100", "train.batch_size=8"]


class PeakRSS:
    """Peak of the summed memory of a process and all its descendants, sampled by a thread.

    ``peak`` sums RSS (every 50 ms, from /proc/PID/statm): pages shared between processes
    (libtorch's code, Ray's object store mapped by writer and reader) count once per process.
    ``peak_pss`` sums PSS (every 2 s, from /proc/PID/smaps_rollup): each shared page split
    between its users, so the sum is the memory the tree really holds. The sampler must
    stay cheap: it shares the 2 cores with what it measures (psutil's full smaps parse of
    a Ray tree every 100 ms took a large share of a core, on the run's side only, and
    slowed the run it was measuring), so the process list is refreshed once a second and
    PSS, which costs the kernel a page-table walk per process, is read rarely.
    """

    RSS_EVERY_S, PSS_EVERY_S, PIDS_EVERY_S = 0.05, 2.0, 1.0
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.pids: list[int] = [pid]
        self.peak = 0
        self.peak_pss = 0
        self.cpu_s = 0.0  # this sampler's own CPU, which must not count as the run's
        self.watched_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _refresh_pids(self) -> None:
        import psutil

        try:
            self.pids = [self.root.pid, *(p.pid for p in self.root.children(recursive=True))]
        except psutil.NoSuchProcess:
            pass

    def _sum(self, fname: str, read) -> int:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/{fname}", "rb") as f:
                    total += read(f)
            except (OSError, ValueError, IndexError):
                pass  # the process ended between the listing and the read
        return total

    @classmethod
    def _rss(cls, f) -> int:
        return int(f.read().split()[1]) * cls.PAGE

    @staticmethod
    def _pss(f) -> int:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self, pss: bool) -> None:
        self.peak = max(self.peak, self._sum("statm", self._rss))
        if pss:
            self.peak_pss = max(self.peak_pss, self._sum("smaps_rollup", self._pss))

    def _loop(self) -> None:
        last_pids = last_pss = -1e9
        while not self._stop.is_set():
            t, now = time.thread_time(), time.perf_counter()
            if now - last_pids >= self.PIDS_EVERY_S:
                self._refresh_pids()
                last_pids = now
            pss = now - last_pss >= self.PSS_EVERY_S
            self._sample(pss)
            if pss:
                last_pss = now
            self.cpu_s += time.thread_time() - t
            self._stop.wait(self.RSS_EVERY_S)

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.watched_s = time.perf_counter() - self._t0
        self._refresh_pids()
        self._sample(pss=True)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (load-independent)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# --- the floor: plain processes, shared memory, NumPy average ------------------------------
def _worker(cfg_path: str, shard_dir: str, num_params: int, w_name: str, out_name: str, conn) -> None:
    from actors.client_pool import ClientPool
    from ssdiff_ray import config
    from ssdiff_ray.threads import set_threads
    from ssdiff_ray.train import client_seed, round_lr

    set_threads(1)
    cfg = config.load(cfg_path)
    group = ClientPool(cfg, shard_dir)  # only its trainer and shard cache are used
    w_shm = shared_memory.SharedMemory(w_name)
    o_shm = shared_memory.SharedMemory(out_name)
    weights = np.ndarray((num_params,), np.float32, w_shm.buf)
    out = np.ndarray((num_params,), np.float64, o_shm.buf)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        round_, ids, steps, num_samples = msg
        out[:] = 0.0
        losses = []
        t = cfg.train
        lr = round_lr(t.lr, t.lr_final, t.lr_schedule, round_, cfg.rounds)  # as the pools do
        for cid, k, n in zip(ids, steps, num_samples):
            delta, loss = group.trainer.train(weights, group.images(int(cid)), int(k),
                                              cfg.train.batch_size, client_seed(cfg.seed, int(cid), round_),
                                              lr=lr)
            out += delta.astype(np.float64) * float(n)  # weighted sum, in place
            losses.append(loss)
        conn.send(losses)
    del weights, out
    w_shm.close()
    o_shm.close()


def floor_main(run_dir: str, out_path: str) -> None:
    """The floor for the run in ``run_dir``; writes per-round times and losses to ``out_path``."""
    import pandas as pd

    from ssdiff_ray import config
    from ssdiff_ray.model.unet import get_flat, unet_for

    run = Path(run_dir)
    cfg = config.load(run / "config.toml")
    clients = pd.read_parquet(run / "clients.parquet")
    pools = int(json.loads((run / "summary.json").read_text())["pools"])
    weights = get_flat(unet_for(cfg))
    n = len(weights)
    w_shm = shared_memory.SharedMemory(create=True, size=n * 4)
    outs = [shared_memory.SharedMemory(create=True, size=n * 8) for _ in range(pools)]
    w = np.ndarray((n,), np.float32, w_shm.buf)
    w[:] = weights
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for s in range(pools):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(str(run / "config.toml"), str(run / "shards"), n,
                                              w_shm.name, outs[s].name, b))
        p.start()
        conns.append(a)
        procs.append(p)
    for c in conns:  # start-up (imports, model) is not part of a round, as in the run
        c.recv()
    rows = []
    try:
        for r, grp in clients.groupby("round", sort=True):
            grp = grp[~grp["straggler"]]
            t0, c0 = time.perf_counter(), tree_cpu_s(os.getpid())
            busy = []
            for s in range(pools):
                g = grp[grp["pool"] == s]
                if len(g):
                    conns[s].send((int(r), g["client_id"].to_numpy(), g["local_steps"].to_numpy(),
                                   g["num_samples"].to_numpy()))
                    busy.append(s)
            losses = {s: conns[s].recv() for s in busy}
            total = np.zeros(n, np.float64)
            for s in busy:
                total += np.ndarray((n,), np.float64, outs[s].buf)
            w += (total / grp["num_samples"].sum()).astype(np.float32)  # FedAvg, server lr 1
            wall = time.perf_counter() - t0
            loss = np.concatenate([losses[s] for s in busy])
            ref = np.concatenate([grp[grp["pool"] == s]["loss"].to_numpy() for s in busy])
            rows.append({"round": int(r), "floor_s": wall, "cpu_s": tree_cpu_s(os.getpid()) - c0,
                         "loss_max_abs_diff": float(np.max(np.abs(loss - ref)))})
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join()
        del w
        for m in [w_shm, *outs]:
            m.close()
            m.unlink()
    Path(out_path).write_text(json.dumps(rows))


# --- one workload: run, then floor --------------------------------------------------------
def measure(name: str, count: int, per_round: float, steps: int, rounds: int, sets: list[str],
            tmp: str) -> dict:
    import pandas as pd

    from ssdiff_ray import api, config

    cfg = config.load(None, [
        f"clients.count={count}", f"clients.per_round={per_round}", f"train.local_steps={steps}",
        "train.batch_size=32", "train.scale_work_by_device=false", "quant.policy=fixed",
        "quant.bits=32", f"rounds={rounds}", "eval.every=0", "eval.baseline=false",
        "eval.samples=10", "eval.steps=1", "eval.grid=0", f"out_dir={tmp}", f"name=floor-{name}",
        *sets])
    cpu = []  # the run's CPU seconds at the end of each round (driver + all Ray processes)
    with PeakRSS(os.getpid()) as run_mem:
        summary = api.run(cfg, progress=False,
                          on_round=lambda *_: cpu.append(tree_cpu_s(os.getpid()) - run_mem.cpu_s))
    run_dir = summary["run_dir"]
    rounds_df = pd.read_parquet(Path(run_dir) / "rounds.parquet")
    floor_out = Path(tmp) / f"floor-{name}.json"
    # A fresh interpreter, so the floor's memory is not the run driver's leftovers.
    proc = subprocess.Popen([sys.executable, __file__, "--floor-of", run_dir, "--out", str(floor_out)])
    with PeakRSS(proc.pid) as floor_mem:
        if proc.wait():
            raise RuntimeError(f"floor subprocess failed ({proc.returncode})")
    floor = pd.DataFrame(json.loads(floor_out.read_text()))
    run_s = rounds_df["wall_s"].to_numpy()
    floor_s = floor["floor_s"].to_numpy()
    warm_run, warm_floor = float(np.mean(run_s[1:])), float(np.mean(floor_s[1:]))
    # CPU per warm round, rounds 2..R-1 (the last one also evaluates); robust to other load
    run_cpu = float(np.mean(np.diff(cpu)[:-1])) if rounds >= 4 else float("nan")
    floor_cpu = float(floor["cpu_s"].iloc[1:-1].mean()) if rounds >= 4 else float("nan")
    return {
        "workload": name, "clients": count, "per_round": int(round(count * per_round)),
        "local_steps": steps, "rounds": rounds, "pools": summary["pools"],
        "num_params": summary["num_params"], "overrides": sets,
        "round1_run_s": float(run_s[0]), "round1_floor_s": float(floor_s[0]),
        "warm_run_s": warm_run, "warm_floor_s": warm_floor, "ratio": warm_run / warm_floor,
        "warm_run_cpu_s": run_cpu, "warm_floor_cpu_s": floor_cpu, "cpu_ratio": run_cpu / floor_cpu,
        "run_rounds_s": run_s.tolist(), "floor_rounds_s": floor_s.tolist(),
        "loss_max_abs_diff": float(floor["loss_max_abs_diff"].max()),
        "peak_rss_run_mib": run_mem.peak / 2**20, "peak_rss_floor_mib": floor_mem.peak / 2**20,
        "peak_pss_run_mib": run_mem.peak_pss / 2**20,
        "peak_pss_floor_mib": floor_mem.peak_pss / 2**20,
        # the memory samplers' own CPU, per second of what they watched (they share the cores)
        "sampler_cpu_share_run": run_mem.cpu_s / max(run_mem.watched_s, 1e-9),
        "sampler_cpu_share_floor": floor_mem.cpu_s / max(floor_mem.watched_s, 1e-9),
        "load_avg": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="A,B",
                    help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--rounds", type=int, default=0, help="override the workload's rounds")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--quick", action="store_true", help="tiny model, few clients (CI)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each workload N times and report the median ratios "
                         "(identical runs vary by ~10-20%% on a 2-core machine)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--floor-of", help=argparse.SUPPRESS)  # internal: the floor subprocess
    args = ap.parse_args()
    if args.floor_of:
        floor_main(args.floor_of, args.out)
        return
    names = args.workload.split(",")
    if not set(names) <= set(WORKLOADS):
        ap.error(f"--workload {args.workload}: expected names of {', '.join(WORKLOADS)}")
    work = {n: WORKLOADS[n] for n in names}
    sets = list(args.set)
    if args.quick:
        work = {"quick": (12, 0.5, 2, 3)}
        sets = [*QUICK, *sets]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (count, frac, steps, rounds) in [(n, w) for n, w in work.items()
                                                   for _ in range(args.repeat)]:
            res = measure(name, count, frac, steps, args.rounds or rounds, sets, tmp)
            results.append(res)
            print(f"{name}: {res['clients']} clients, {res['per_round']}/round, {res['local_steps']} "
                  f"steps, {res['pools']} pools | round 1: run {res['round1_run_s']:.3f}s floor "
                  f"{res['round1_floor_s']:.3f}s | warm: run {res['warm_run_s']:.3f}s floor "
                  f"{res['warm_floor_s']:.3f}s ratio {res['ratio']:.3f} | warm CPU: run "
                  f"{res['warm_run_cpu_s']:.2f}s floor {res['warm_floor_cpu_s']:.2f}s ratio "
                  f"{res['cpu_ratio']:.3f} | peak RSS run "
                  f"{res['peak_rss_run_mib']:.0f} MiB floor {res['peak_rss_floor_mib']:.0f} MiB | "
                  f"peak PSS run {res['peak_pss_run_mib']:.0f} MiB floor "
                  f"{res['peak_pss_floor_mib']:.0f} MiB | "
                  f"loss diff {res['loss_max_abs_diff']:.2e} | sampler CPU "
                  f"{res['sampler_cpu_share_run']:.1%} of a core | load {res['load_avg'][0]:.2f}",
                  flush=True)
    median = {}
    for name in work:
        runs = [r for r in results if r["workload"] == name]
        median[name] = {k: float(np.median([r[k] for r in runs]))
                        for k in ("ratio", "cpu_ratio", "warm_run_s", "warm_floor_s",
                                  "peak_rss_run_mib", "peak_rss_floor_mib",
                                  "peak_pss_run_mib", "peak_pss_floor_mib")}
        m = median[name]
        print(f"{name}: median of {len(runs)}: ratio {m['ratio']:.3f}, CPU ratio "
              f"{m['cpu_ratio']:.3f}, PSS above floor "
              f"{(m['peak_pss_run_mib'] - m['peak_pss_floor_mib']) / 1024:.2f} GiB, RSS above "
              f"floor {(m['peak_rss_run_mib'] - m['peak_rss_floor_mib']) / 1024:.2f} GiB")
    write_json(args.out, {"median": median, "results": results}, args_config(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
