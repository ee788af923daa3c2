"""``run(cfg)``: one federated run from a config to its summary (``ssdiff run``, the public
API's ``run``, tuning trials).

It starts (or joins) Ray, prepares the run directory, lets a ``Federation`` fit and
summarises.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ssdiff_ray import checkpoint
from ssdiff_ray.config import Config
from ssdiff_ray.driver.federation import Federation
from ssdiff_ray.driver.session import check_address, ray_session
from ssdiff_ray.errors import RunStopped
from ssdiff_ray.run_dir import prepare, write_summary
from ssdiff_ray.tracking import open_trackers


def run(cfg: Config, *, address: str | None = None, resume: str | Path | None = None,
        progress: bool = True, on_round=None) -> dict:
    """Run (or resume) a federated training run; returns the summary dict.

    ``on_round(federation, round, row)`` is called after each round (tests, tuning).
    """
    t_start = time.perf_counter()
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)  # before the run directory is made
    if resume:
        checkpoint.check_no_legacy(Path(resume))  # before anything is written
    prep = prepare(cfg, resume)  # shards and population are rebuilt identically on resume
    with ray_session(address):
        fed = Federation(prep)
        trackers, finished = None, False
        try:
            start = 1
            if resume and (prep.run_dir / checkpoint.CHECKPOINT).exists():
                start = fed.restore(prep.run_dir) + 1
            trackers = open_trackers(cfg, prep.run_dir, start)
            fed.fit(start, progress, on_round, trackers)
            summary = summarize(fed, time.perf_counter() - t_start)
            if trackers:
                summary["log_s"] = trackers.log_s
            write_summary(prep.run_dir, summary)
            trackers.finish(prep.run_dir, "FINISHED")
            finished = True
            return summary
        except BaseException as e:
            if trackers:
                stopped = isinstance(e, (RunStopped, KeyboardInterrupt))
                trackers.finish(prep.run_dir, "KILLED" if stopped else "FAILED")
            raise
        finally:
            fed.shutdown(keep=finished)  # the next run of this process reuses its actors


# the final evaluation's figures that go into the summary when the run measured them
QUALITY = ("feature_space", "kid", "precision", "recall", "bad_sample_share", "confidence",
           "class_accuracy")


def summarize(fed: Federation, wall_s: float) -> dict:
    """The run's summary: its size, the final evaluation and the totals of its ledger."""
    rounds = fed.ledger.rounds()
    last = rounds.iloc[-1]
    quality = {k: (v if isinstance(v, str) else float(v)) for k in QUALITY
               if isinstance(v := last.get(k), str) or (v is not None and math.isfinite(v))}
    return {
        "run_dir": str(fed.prep.run_dir), "num_params": fed.num_params, "pools": fed.num_pools,
        "clients": fed.cfg.clients.count, **fed.baseline,
        "rounds": int(fed.cfg.rounds), "wall_s": wall_s,
        "fid": float(last.get("fid", math.nan)), **quality,
        "classes_present": int(last.get("classes_present", 0) or 0),
        "uplink_bytes": int(rounds["uplink_bytes"].sum()),
        "downlink_bytes": int(rounds["downlink_bytes"].sum()),
        "energy_j": float(rounds["energy_j"].sum()),
        "stragglers": int(rounds["stragglers"].sum()),
        "final_loss": float(last["loss"]),
        "placement": fed.placement,
    }
