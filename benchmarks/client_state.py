"""Client state at scale: resume exactness at 10,000 clients and memory once everyone uploaded.

In one embedded local Ray session, same stress setup as ``ssdiff stress`` (tiny preset, 8x8,
one local step, 8-bit uploads with error feedback, a small RAM cache so most residuals are
spilled to disk):

(a) resume: a run of CLIENTS clients checkpointing every round, stopped after round STOP and
    resumed, against the same run never stopped: final weights and every client's residual
    must be bit-identical; each checkpoint's time is compared with its round's time;
(b) plateau: a run of PLATEAU_CLIENTS clients with half of them selected a round until every
    client has uploaded at least once: the RSS of all processes after the last round over the
    RSS after round 1.

    python benchmarks/client_state.py                    # 10,000 clients; plateau at 1,000
    python benchmarks/client_state.py --clients 500 --plateau-clients 200   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from provenance import args_config, write_json  # noqa: E402
from safetensors.numpy import load_file

from ssdiff_ray import api, checkpoint, config
from ssdiff_ray.client_state_file import ClientStateFile
from ssdiff_ray.driver.session import ray_session
from ssdiff_ray.driver.stress import actor_pid, process_memory, stress_overrides

OUT = Path(__file__).parent / "results" / "client_state.json"
MiB = 1 << 20


class Stop(Exception):
    pass


def _cfg(work: Path, name: str, clients: int, per_round: float, rounds: int, cache_mib: float,
         every: int):
    return config.load(None, [*stress_overrides(clients, "tiny", rounds, per_round, every),
                              f"out_dir={work}", f"name={name}",
                              f"clients.state_cache_mib={cache_mib}", "clients.pools=2"])


def _state(run_dir: Path) -> dict[int, np.ndarray]:
    ck = checkpoint.load(run_dir)
    f = ClientStateFile(run_dir, ck["run_id"], None, None, create=False)
    out = {c: v.copy() for c, _, v in f.read(ck["round"])}
    f.close()
    return out


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def resume_check(work: Path, clients: int, rounds: int, stop: int, cache_mib: float) -> dict:
    rows = []

    def keep(fed, r, row):
        rows.append({k: row.get(k, np.nan) for k in ("round", "wall_s", "checkpoint_s",
                                                      "state_rows", "state_bytes")})

    api.run(_cfg(work, "whole", clients, 0.01, rounds, cache_mib, 1), progress=False,
            on_round=keep)

    def stop_after(fed, r, row):
        if r == stop:
            raise Stop

    cut = work / "cut"
    try:
        api.run(_cfg(work, "cut", clients, 0.01, rounds, cache_mib, 1), progress=False,
                on_round=stop_after)
    except Stop:
        pass
    t0 = time.perf_counter()
    api.run(config.load(cut / "config.toml"), progress=False, resume=cut)
    resumed_s = time.perf_counter() - t0
    a, b = _state(work / "whole"), _state(cut)
    wa, wb = _weights(work / "whole"), _weights(cut)
    la = pd.read_parquet(work / "whole" / "clients.parquet")[["round", "client_id", "loss"]]
    lb = pd.read_parquet(cut / "clients.parquet")[["round", "client_id", "loss"]]
    df = pd.DataFrame(rows)
    ck = df.dropna(subset=["checkpoint_s"])
    return {
        "clients": clients, "rounds": rounds, "stopped_after": stop, "cache_mib": cache_mib,
        "residuals": len(a), "residuals_equal": a.keys() == b.keys()
        and all(np.array_equal(a[c], b[c]) for c in a),
        "weights_equal": wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa),
        "client_ledger_equal": la.equals(lb), "resume_run_s": resumed_s,
        "checkpoint_s": ck["checkpoint_s"].tolist(), "round_wall_s": ck["wall_s"].tolist(),
        "checkpoint_over_round_median": float((ck["checkpoint_s"] / ck["wall_s"]).median()),
        "checkpoint_over_round_max": float((ck["checkpoint_s"] / ck["wall_s"]).max()),
        "checkpoint_state_mib_per_round": float(ck["state_bytes"].median() / MiB),
        "state_file_mib": sum(f.stat().st_size for f in (work / "whole").glob(
            "client_state.sqlite*")) / MiB,
    }


def plateau(work: Path, clients: int, max_rounds: int, cache_mib: float) -> dict:
    """Half the clients a round until all have uploaded; RSS per round."""
    rows = []
    seen: set[int] = set()
    pids: dict = {}

    def on_round(fed, r, row):
        if not pids:
            pids.update(server=actor_pid(fed.server), pools={actor_pid(p) for p in fed.pools})
        seen.update(fed.ledger.clients().query("round == @r")["client_id"].tolist())
        mem = process_memory(pids["server"], pids["pools"])
        rows.append({"round": r, "uploaded": len(seen), "rss_total_mib": mem["rss_total"] / MiB,
                     "pss_total_mib": mem["pss_total"] / MiB})
        if len(seen) == clients:
            raise Stop  # everyone has uploaded: the measurement is done

    try:
        api.run(_cfg(work, "plateau", clients, 0.5, max_rounds, cache_mib, 0), progress=False,
                on_round=on_round)
    except Stop:
        pass
    df = pd.DataFrame(rows)
    return {"clients": clients, "per_round": 0.5, "cache_mib": cache_mib,
            "rounds_until_all_uploaded": int(df["round"].iloc[-1]),
            "all_uploaded": bool(df["uploaded"].iloc[-1] == clients),
            "rss_round1_mib": float(df["rss_total_mib"].iloc[0]),
            "rss_last_mib": float(df["rss_total_mib"].iloc[-1]),
            "rss_last_over_round1": float(df["rss_total_mib"].iloc[-1] / df["rss_total_mib"].iloc[0]),
            "pss_last_over_round1": float(df["pss_total_mib"].iloc[-1] / df["pss_total_mib"].iloc[0]),
            "per_round_rows": df.to_dict("records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--stop", type=int, default=4)
    ap.add_argument("--plateau-clients", type=int, default=1000)
    ap.add_argument("--cache-mib", type=float, default=16.0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssdiff-client-state-bench-"))
    try:
        with ray_session():
            res = resume_check(work, args.clients, args.rounds, args.stop, args.cache_mib)
            pl = plateau(work, args.plateau_clients, 40, args.cache_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"resume": res, "plateau": pl, "cpus": os.cpu_count(),
              "targets": {"bit_identical": True, "checkpoint_over_round_le": 2,
                          "rss_last_over_round1_le": 1.1}}
    write_json(Path(args.out), result, args_config(args))
    print(f"resume at {res['clients']} clients ({res['residuals']} residuals): weights equal "
          f"{res['weights_equal']}, residuals equal {res['residuals_equal']}, client ledger "
          f"equal {res['client_ledger_equal']}; checkpoint / round median "
          f"{res['checkpoint_over_round_median']:.2f}, max {res['checkpoint_over_round_max']:.2f}")
    print(f"plateau at {pl['clients']} clients: all uploaded after "
          f"{pl['rounds_until_all_uploaded']} rounds; RSS last / round 1 "
          f"{pl['rss_last_over_round1']:.3f} (PSS {pl['pss_last_over_round1']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
