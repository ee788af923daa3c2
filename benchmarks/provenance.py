"""What every results file records about the code and the command that made it.

``write_json(path, result, config)`` adds ``"provenance": {"commit", "dirty", "command",
"config", "date"}`` to a benchmark's result, so that ``check_results.py`` can tell whether the
code a figure measures has changed since.
"""

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a dirty tree taints (results files written by an earlier benchmark do not)
CODE = ("ssdiff_ray", "actors", "tuning", "benchmarks", ":!benchmarks/results")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def stamp(config=None) -> dict:
    """The commit (and whether code was edited on top of it), this process's command line
    and the config it ran with."""
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *CODE))
    return {"commit": _git("rev-parse", "HEAD") or None, "dirty": dirty,
            "command": shlex.join(["python", *sys.argv]), "config": config,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def write_json(path: str | Path, result, config=None) -> None:
    """Write ``result`` (a dict, or a list kept under ``"rows"``) with its provenance."""
    if not isinstance(result, dict):
        result = {"rows": result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "provenance": stamp(config)}, indent=1,
                               default=_plain) + "\n")


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def args_config(args) -> dict:
    """An argparse namespace as a JSON-able config record."""
    return {k: _plain(v) if not isinstance(v, (str, int, float, bool, list, type(None))) else v
            for k, v in vars(args).items()}
