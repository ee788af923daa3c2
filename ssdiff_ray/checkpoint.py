"""A run's checkpoint on disk as JSON plus safetensors: numbers, strings and arrays only.

A run directory may come from someone else (``--resume``), so reading a checkpoint must not
be able to run code, as unpickling can. ``checkpoint.json`` holds the state's tree with every
array replaced by a reference into ``checkpoint-r<round>-<hash>.safetensors``, and that file's
SHA-256; the JSON is replaced last (atomically), so a stop at any moment leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ssdiff_ray.errors import UserError

CHECKPOINT = "checkpoint.json"
LEGACY = "checkpoint.pkl"  # earlier versions' pickle: never read


class CheckpointError(UserError):
    """A checkpoint that cannot be read: the message names the file and why."""


def save(run_dir: Path, state: dict, round_: int, before_commit=None) -> None:
    """Write ``state`` (dicts, lists, numbers, strings, None and NumPy arrays);
    ``before_commit()`` runs when all is written but the new checkpoint is not yet the one
    a resume reads (the ledger flushes there)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    tree = _encode(state, tensors)
    tmp = run_dir / "checkpoint-tensors.tmp"
    save_file(tensors, str(tmp))
    digest = _sha256(tmp)
    # named by its content: a second checkpoint of the same round never overwrites the file
    # the current checkpoint.json names (a stop in between would leave it unreadable)
    name = f"checkpoint-r{round_}-{digest[:16]}.safetensors"
    os.replace(tmp, run_dir / name)
    meta = {"tensors": name, "sha256": digest, "state": tree}
    (run_dir / (CHECKPOINT + ".tmp")).write_text(json.dumps(meta))
    if before_commit is not None:
        before_commit()
    os.replace(run_dir / (CHECKPOINT + ".tmp"), run_dir / CHECKPOINT)
    for old in run_dir.glob("checkpoint-r*.safetensors"):
        if old.name != name:
            old.unlink()


def load(run_dir: Path) -> dict:
    """The state ``save`` wrote; a CheckpointError for anything else."""
    path = run_dir / CHECKPOINT
    for attempt in range(3):
        named = _named(path)
        try:
            return _load_once(run_dir, path)
        except CheckpointError:
            # a reader racing a live run: the writer committed a newer checkpoint (and removed
            # the file the JSON we read named) while we read; read the new one
            if attempt == 2 or _named(path) in (None, named):
                raise


def _named(path: Path):
    try:
        name = json.loads(path.read_text()).get("tensors")
        return name if isinstance(name, str) and Path(name).name == name else None
    except (OSError, ValueError, AttributeError, RecursionError):  # any unreadable JSON
        return None


def _load_once(run_dir: Path, path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        meta = json.loads(path.read_text())
        name = meta["tensors"]
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"tensor file {name!r} is not a file beside it")
        if _sha256(run_dir / name) != meta["sha256"]:
            raise ValueError(f"{name} does not match its SHA-256 (changed after it was written)")
        return _decode(meta["state"], load_file(str(run_dir / name)))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a checkpoint this version can read "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_no_legacy(run_dir: Path) -> None:
    """An earlier version's pickled checkpoint is refused, not unpickled."""
    if (run_dir / LEGACY).exists() and not (run_dir / CHECKPOINT).exists():
        raise CheckpointError(f"{run_dir / LEGACY}: a checkpoint of an earlier version, in "
                              "pickle, which can run code when read: not loaded (start the "
                              "run again)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode(x, tensors: dict):
    if isinstance(x, np.ndarray):
        key = str(len(tensors))
        tensors[key] = np.ascontiguousarray(x)
        return {"__tensor__": key}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot checkpoint a {type(x).__name__}")


def _decode(x, tensors: dict):
    if isinstance(x, dict):
        if set(x) == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        if set(x) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in x["__items__"]}
        return {k: _decode(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    return x
