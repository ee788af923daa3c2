"""A search space read from TOML and checked against the config schema before any trial.

Each entry of ``[params]`` names a config field (``section.key``) and its distribution:
``{ choices = [...] }`` (categorical; ``choices = "all"`` takes every choice the config field
registers, so a new policy joins the default space), or ``{ low = .., high = .. }`` with optional
``log = true`` / ``step = ..``, typed (int or float) by the field. Every value is checked
with the same rules as ``ssdiff run`` uses, so a bad entry fails with its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssdiff_ray import config as config_mod
from ssdiff_ray.config import ConfigError, read_toml

DEFAULT_SPACE = Path(__file__).with_name("default_space.toml")
# Fields the tuner sets itself (where each trial's run goes).
RESERVED = {"out_dir", "name"}


@dataclass(frozen=True)
class Param:
    name: str            # config path, e.g. "quant.bits"; also the Optuna parameter name
    kind: str            # "categorical" | "int" | "float"
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and self.low <= value <= self.high


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    source: str

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}


def _param(name: str, spec: Any, schema: dict) -> Param:
    where = f"search space entry {name!r}"
    if name in RESERVED:
        raise ConfigError(f"{where}: set by the tuner, cannot be searched")
    if name not in schema:
        sec = name.split(".")[0]
        near = [k for k in schema if k.startswith(sec + ".")]
        hint = f" (known in [{sec}]: {', '.join(k.split('.', 1)[1] for k in near)})" if near else ""
        raise ConfigError(f"{where}: unknown config field{hint}")
    typ, meta = schema[name]
    if typ is dict:
        raise ConfigError(f"{where}: a table field cannot be searched")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table like {{ choices = [...] }} or "
                          f"{{ low = .., high = .. }}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          f"(known: choices, low, high, log, step)")

    def check(value: Any) -> Any:
        try:
            value = config_mod.check_value(name, value, typ, meta)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return value

    if "choices" in spec:
        return _categorical(name, where, spec, meta, check)
    return _numeric(name, where, spec, typ, check)


def _categorical(name: str, where: str, spec: dict, meta: dict, check) -> Param:
    if set(spec) - {"choices"}:
        raise ConfigError(f"{where}: give either choices or low/high, not both")
    choices = spec["choices"]
    if choices == "all":
        if not meta.get("choices"):
            raise ConfigError(f"{where}: choices = \"all\" needs a field with a choice list")
        choices = list(meta["choices"])
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices must be a non-empty list")
    values = tuple(check(c) for c in choices)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: choices has duplicates")
    return Param(name, "categorical", choices=values)


def _numeric(name: str, where: str, spec: dict, typ: type, check) -> Param:
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: needs choices, or both low and high")
    if typ not in (int, float):
        raise ConfigError(f"{where}: a {typ.__name__} field takes choices, not low/high")
    low, high = check(spec["low"]), check(spec["high"])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: low and high must be finite")
    if low >= high:
        raise ConfigError(f"{where}: low = {low!r} must be < high = {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log = {log!r}: must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: log = true needs low > 0")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                or (typ is int and not isinstance(step, int)):
            raise ConfigError(f"{where}: step = {step!r}: must be a positive "
                              f"{'integer' if typ is int else 'number'}")
        if log:
            raise ConfigError(f"{where}: step and log = true cannot be combined")
    return Param(name, "int" if typ is int else "float", low=low, high=high, log=log,
                 step=None if step is None else (int(step) if typ is int else float(step)))


def parse_space(raw: dict, source: str = "<space>") -> Space:
    """Validate a parsed space table (``{"params": {name: spec}}``)."""
    unknown = set(raw) - {"params"}
    if unknown:
        raise ConfigError(f"search space {source}: unknown top-level key {sorted(unknown)[0]!r} "
                          f"(expected a [params] table)")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"search space {source}: needs a non-empty [params] table")
    schema = config_mod.schema()
    return Space(tuple(_param(n, s, schema) for n, s in params.items()), source)


def load_space(path: str | Path | None = None) -> Space:
    """Read and validate a search-space TOML file (the packaged default when None)."""
    p = Path(path) if path else DEFAULT_SPACE
    return parse_space(read_toml(p, "search space"), str(p))


def overrides(params: dict[str, Any]) -> list[str]:
    """Trial parameters as ``--set``-style overrides, so ``config.load`` validates them."""
    return [f"{k}={config_mod.toml_value(v)}" for k, v in params.items()]
