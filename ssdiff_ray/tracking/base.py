"""What every tracker is (``Tracker``: one object behind ``log_round`` and ``finish``) and
the guard that drops a failing one (``Trackers``)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ssdiff_ray.errors import redact


class Tracker:
    """Receives each round's scalars (``group/name`` -> value) and its sample grid."""

    name = "tracker"

    def log_round(self, round_: int, scalars: dict[str, float], grid_png: Path | None) -> None:
        raise NotImplementedError

    def finish(self, run_dir: Path, status: str) -> None:
        """The run ended: ``status`` FINISHED, FAILED (an error) or KILLED (stopped on
        purpose); upload what it wrote, close."""


def round_scalars(row: dict, evaluated: dict) -> dict[str, float]:
    """The round's numbers as tracker tags: ``eval/<key>`` for what the evaluation measured
    (FID, KID, precision, recall, bad_sample_share, ASR...), ``round/<key>`` for the rest
    (loss, bytes, energy, latency, stragglers, timings). Strings and NaN are left out."""
    out = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, (str, bool)) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[f"{'eval' if k in evaluated else 'round'}/{k}"] = float(v)
    return out


class Trackers:
    """The open trackers; each call is guarded so that a failing tracker is dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.log_s = 0.0  # seconds the rounds spent logging (the overhead benchmark reads it)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _guard(self, call) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - logging must never stop the run
                warn(f"{t.name} logging failed ({short_reason(e)}); the run goes on without it")
                self.trackers.remove(t)

    def log_round(self, round_: int, row: dict, evaluated: dict, grid_png: Path | None) -> None:
        t0 = time.perf_counter()
        scalars = round_scalars(row, evaluated)
        self._guard(lambda t: t.log_round(round_, scalars, grid_png))
        self.log_s += time.perf_counter() - t0

    def finish(self, run_dir: Path, status: str) -> None:
        self._guard(lambda t: t.finish(run_dir, status))
        self.trackers = []


def short_reason(e: Exception) -> str:
    text = redact((str(e).strip().splitlines() or [""])[0])[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
