"""Round metrics where users already look: TensorBoard event files and MLflow runs.

``open_trackers(cfg, run_dir, start_round)`` opens the trackers the ``[log]`` section asks
for; the driver calls ``log_round`` after every round and ``finish`` at the end. A tracker
is a small object behind those two methods (``Tracker``), so a new one is one file.

A tracker that fails (an unreachable MLflow server, a log folder that cannot be written)
prints one warning line and is dropped: the run, its ledgers and checkpoints go on as if
logging were off.
"""

from __future__ import annotations

from pathlib import Path

from ssdiff_ray.config import Config
from ssdiff_ray.errors import redact
from ssdiff_ray.tracking.base import Tracker, Trackers, round_scalars, short_reason, warn


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
        warn(f"{name} logging off: {where}: {short_reason(e)}")


__all__ = ["Tracker", "Trackers", "open_trackers", "round_scalars", "warn"]
