"""Round metrics where users already look: TensorBoard event files and MLflow runs.

``open_trackers(cfg, run_dir, start_round)`` opens the trackers the ``[log]`` section asks
for; the driver calls ``log_round`` after every round and ``finish`` at the end. A tracker
is a small object behind those two methods (``Tracker``), so a new one is one file.

A tracker that fails (an unreachable MLflow server, a log folder that cannot be written)
prints one warning line and is dropped: the run, its ledgers and checkpoints go on as if
logging were off.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ssdiff_ray.config import Config
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

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _guard(self, call) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - logging must never stop the run
                warn(f"{t.name} logging failed ({_reason(e)}); the run goes on without it")
                self.trackers.remove(t)

    def log_round(self, round_: int, row: dict, evaluated: dict, grid_png: Path | None) -> None:
        scalars = round_scalars(row, evaluated)
        self._guard(lambda t: t.log_round(round_, scalars, grid_png))

    def finish(self, run_dir: Path, status: str) -> None:
        self._guard(lambda t: t.finish(run_dir, status))
        self.trackers = []


def open_trackers(cfg: Config, run_dir: Path, start_round: int = 1) -> Trackers:
    """The trackers ``cfg.log`` asks for; one that cannot open is a warning, not an error."""
    opened: list[Tracker] = []
    log = cfg.log
    if log.tensorboard:
        from ssdiff_ray.tracking.tensorboard import TensorBoardLog

        folder = Path(log.tensorboard_dir) if log.tensorboard_dir else run_dir / "tb"
        _try_open(opened, "TensorBoard", f"log.tensorboard_dir {folder}",
                  lambda: TensorBoardLog(folder, start_round))
    if log.mlflow_uri:
        from ssdiff_ray.tracking.mlflow_run import MLflowLog

        _try_open(opened, "MLflow", f"log.mlflow_uri {redact(log.mlflow_uri)}",
                  lambda: MLflowLog(cfg, run_dir, start_round))
    return Trackers(opened)


def _try_open(opened: list, name: str, where: str, make) -> None:
    try:
        opened.append(make())
    except ImportError as e:
        warn(f"{name} logging off: {e.name or e} is not installed (pip install 'ssdiff-ray[log]')")
    except Exception as e:  # noqa: BLE001 - an unreachable tracker must not stop the run
        warn(f"{name} logging off: {where}: {_reason(e)}")


def _reason(e: Exception) -> str:
    text = redact((str(e).strip().splitlines() or [""])[0])[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ = ["Tracker", "Trackers", "open_trackers", "round_scalars"]
