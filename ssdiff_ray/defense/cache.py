"""The defense of one run, computed once and kept in ``RUN/defense/``.

Estimating the trigger and calibrating the output check take minutes; ``ssdiff sample``,
``ssdiff audit`` and ``ssdiff serve`` all load them from here. The cache holds the trigger
estimate (``estimate.npz``), the target check's target image and null scores
(``check.npz``) and the audit verdict (``audit.json``), with a key (``key.json``): the
model file's digest and the defense settings. A model or settings change makes the key
differ and the defense is computed again; so does ``refresh``.

Anyone can recompute the key, so a run directory from elsewhere could carry a forged "clean"
audit for a backdoored model. ``key.json`` therefore also holds the SHA-256 of every cached
file and an HMAC of all of it under a secret kept outside the run directory
(``$SSDIFF_CACHE_DIR/defense.key``, made on first use): a cache this machine did not write,
or changed since, is computed anew.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

from ssdiff_ray.defense.defense import Defense
from ssdiff_ray.defense.estimate import TriggerEstimate

VERSION = 3  # 2: the probe searches under several samplers; 3: signed
FILES = ("estimate.npz", "estimate.json", "check.npz", "audit.json")


def model_digest(model_dir: str | Path) -> str:
    """sha256 of the pipeline's UNet weights (any weights file under ``unet/``)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir, "unet").glob("*.safetensors")) or sorted(
        Path(model_dir, "unet").glob("*.bin"))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(run_dir: str | Path, defense: Defense) -> dict:
    """What the cached state depends on: the weights and every setting of the chain."""
    return {"version": VERSION, "model": model_digest(Path(run_dir) / "model"),
            "estimator": defense.estimator.name, "options": repr(defense.estimator.options),
            "estimate": defense.use_estimate, "target_check": defense.use_target_check,
            "steps": defense.steps, "seed": defense.seed, "shape": list(defense.shape)}


def _plain(v):
    """JSON-safe copy of the estimator's statistics (numpy scalars and arrays included)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "tolist"):  # a torch tensor
        return v.tolist()
    return v


def save(run_dir: str | Path, defense: Defense, audit: dict) -> Path:
    """Write the prepared ``defense`` and its ``audit`` under ``RUN/defense/``."""
    out = Path(run_dir) / "defense"
    out.mkdir(exist_ok=True)
    for f in ("key.json", *FILES):  # a new save replaces the whole cache
        (out / f).unlink(missing_ok=True)
    est = defense.est
    if est is not None:
        np.savez(out / "estimate.npz", tau=est.tau, mu=est.mu)
        (out / "estimate.json").write_text(json.dumps(_plain({
            "gamma": est.gamma, "shift_norm": est.shift_norm, "response": est.response,
            "stats": est.stats}), indent=1))
    if defense.check is not None:
        np.savez(out / "check.npz", target=defense.check.target.numpy(),
                 null=defense.check.null, spread=defense.check.spread)
    (out / "audit.json").write_text(json.dumps(_plain(audit), indent=2))
    # the key last: a directory without it (an interrupted save) is never trusted
    _write_key(out, cache_key(run_dir, defense))
    return out


def _file_digests(d: Path) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES
            if (d / f).is_file()}


def _signing_key() -> bytes:
    """This machine's secret for the caches it writes, made on first use (mode 0600)."""
    from ssdiff_ray.metrics.classifier import default_cache_dir

    path = default_cache_dir() / "defense.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a temporary name, then linked into place: a process that
        # races this one either makes the key or reads a whole one, never an empty file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="defense.key.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp's mode is 0600
                f.write(secrets.token_hex(32))
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first
        finally:
            os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def _mac(manifest: dict) -> str:
    return hmac.new(_signing_key(), json.dumps(manifest, sort_keys=True).encode(),
                    hashlib.sha256).hexdigest()


def _write_key(d: Path, key: dict) -> None:
    manifest = {"key": key, "files": _file_digests(d)}
    (d / "key.json").write_text(json.dumps({**manifest, "hmac": _mac(manifest)}, indent=1))


def sign(run_dir: str | Path) -> None:
    """Sign ``RUN/defense/`` as it is now with this machine's secret: an operator vouching
    for a cache (e.g. one edited by hand) that ``load`` would otherwise compute anew."""
    d = Path(run_dir) / "defense"
    _write_key(d, json.loads((d / "key.json").read_text())["key"])


def _trusted(d: Path, key: dict) -> bool:
    """``key.json`` names ``key``, the files on disk are the ones it hashed, and this
    machine's secret signed it."""
    try:
        stored = json.loads((d / "key.json").read_text())
        manifest = {"key": stored["key"], "files": stored["files"]}
        return (stored["key"] == key and stored["files"] == _file_digests(d)
                and hmac.compare_digest(str(stored["hmac"]), _mac(manifest)))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


def load(run_dir: str | Path, defense: Defense) -> dict | None:
    """Fill ``defense`` from the cache and return the audit (judged by the current rule), or
    None when the cache is missing or was made for other weights or settings."""
    import torch

    from ssdiff_ray.defense.input_tests import TargetCheck, standard_tests

    d = Path(run_dir) / "defense"
    if not _trusted(d, cache_key(run_dir, defense)):
        return None
    est = None
    if (d / "estimate.npz").is_file():
        arrays, meta = np.load(d / "estimate.npz"), json.loads((d / "estimate.json").read_text())
        est = TriggerEstimate(tau=arrays["tau"], mu=arrays["mu"], gamma=meta["gamma"],
                              shift_norm=meta["shift_norm"], response=meta["response"],
                              stats=meta["stats"])
    check = None
    if (d / "check.npz").is_file():
        c = np.load(d / "check.npz")
        check = TargetCheck.from_state(defense.unet, defense.scheduler, torch.from_numpy(c["target"]),
                                       c["null"], float(c["spread"]), steps=defense.steps,
                                       seed=defense.seed,
                                       sampler=est.stats.get("sampler", "ddim") if est else "ddim")
    defense.est, defense.check = est, check
    defense.tests = standard_tests(defense.shape, est, check)
    defense._ready = True
    return rejudge(json.loads((d / "audit.json").read_text()))


def rejudge(audit: dict) -> dict | None:
    """The cached audit's statistics under the current ``AuditRule``: a recalibrated rule
    applies to models audited before it (the statistics do not depend on the rule)."""
    from ssdiff_ray.defense.audit import AuditRule

    rule = AuditRule.load()
    if rule.statistic not in audit:  # saved before the statistic existed: recompute
        return None
    return {**audit, "verdict": rule.verdict(audit), "rule": str(rule)}


def cached_defense(run_dir: str | Path, defense: Defense, refresh: bool = False,
                   log=None) -> tuple[Defense, dict]:
    """(the prepared ``defense``, its audit): from ``RUN/defense/`` when it was made for
    these weights and settings, else computed now (trigger estimate, target check, audit)
    and saved there. ``refresh`` always recomputes."""
    audit = None if refresh else load(run_dir, defense)
    if audit is None:
        if log:
            log(f"estimating the trigger of {run_dir} (once; saved in {Path(run_dir) / 'defense'})")
        defense.prepare()
        audit = defense.audit()
        save(run_dir, defense, audit)
    return defense, audit
