"""Device classes of a heterogeneous AIoT fleet, seeded client populations, and profile tables.

A population is a pandas DataFrame with one row per client (index ``client_id`` = 0..n-1);
see ``POPULATION_COLUMNS``. Core module: no ray, no optuna.

Compute model (used by ``ssdiff_ray.energy``):

* ``cycles = FLOPs / flops_per_cycle`` and ``compute_s = cycles / f``.
* CPU classes (``accel_power_w == 0``): ``compute_energy_j = kappa * cycles * f**2``, i.e. dynamic
  power ``kappa * f**3`` (Mo et al., "Energy-efficient federated edge learning with joint
  communication and computation design", 2021; Yang et al., "Energy efficient federated learning
  over wireless communication networks", IEEE TWC 2021, use kappa = 1e-28). Here kappa is
  calibrated per class as ``P_dyn(f_max) / f_max**3`` from measured active power, which lands
  between ~1e-28 (phone) and ~3e-27 (MCU).
* Accelerator classes (Jetson, ``accel_power_w > 0``): module power at the GPU clock f is
  ``accel_power_w * (f / f_max)**2`` (exponent 2 fits the two nvpmodel points, see below), so
  ``compute_energy_j = accel_power_w * (f / f_max)**2 * compute_s``. For these classes the
  ``cpu_hz_*`` columns hold the GPU clock range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssdiff_ray.errors import UserError

# Bit-widths the codec supports; kept here as a literal so this module never imports the codec.
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)

MIN_DISTANCE_M = 10.0        # no client closer than this to the access point (near-field cut-off)
SHADOWING_SIGMA_DB = 8.0     # log-normal shadowing std (3GPP TR 36.814 macro cell: 8 dB)
FLOPS_JITTER = 0.10          # per-client +-10 % on effective FLOP/s (binning, thermals, firmware)


class DeviceProfileError(UserError):
    """A device profile table that cannot be used; the message names the column and row."""


def dbm_to_w(dbm):
    """Decibel-milliwatts to watts (vectorised)."""
    return 10.0 ** ((np.asarray(dbm, dtype=float) - 30.0) / 10.0)


@dataclass(frozen=True)
class DeviceClass:
    """Nominal hardware profile of one device class (per-client jitter is added on top)."""

    name: str
    cpu_hz_min: float          # lowest DVFS frequency (GPU clock for accelerator classes)
    cpu_hz_max: float          # highest DVFS frequency
    flops_per_s_max: float     # effective FLOP/s of a small conv-net training step at cpu_hz_max
    compute_power_w: float     # dynamic (CPU) or whole-module (accelerator) power at cpu_hz_max
    accelerator: bool          # True: power model accel_power_w * (f/f_max)^2; False: kappa f^3
    tx_power_dbm_min: float
    tx_power_dbm_max: float
    memory_bytes: int
    energy_budget_j: float     # energy a client of this class may spend per round
    work_scale: float          # local steps = max(1, round(nominal * work_scale))
    max_bits: int              # largest upload bit-width the device accepts
    preferred_bits: tuple[int, ...]  # the device's own on-demand demand (drawn uniformly)

    @property
    def flops_per_cycle(self) -> float:
        return self.flops_per_s_max / self.cpu_hz_max

    @property
    def kappa(self) -> float:
        """Switched capacitance (CPU classes); 0 for accelerator classes."""
        return 0.0 if self.accelerator else self.compute_power_w / self.cpu_hz_max**3

    @property
    def accel_power_w(self) -> float:
        """Module power at cpu_hz_max (accelerator classes); 0 for CPU classes."""
        return self.compute_power_w if self.accelerator else 0.0

    @property
    def tx_power_w_min(self) -> float:
        return float(dbm_to_w(self.tx_power_dbm_min))

    @property
    def tx_power_w_max(self) -> float:
        return float(dbm_to_w(self.tx_power_dbm_max))


_MIB = 1 << 20
_GIB = 1 << 30

DEVICE_CLASSES: dict[str, DeviceClass] = {
    # Microcontroller sensor hub, STM32H7-class Cortex-M7 @ 480 MHz (DVFS down to 64 MHz HSI).
    # Run mode ~100 mA @ 3.3 V ~ 0.3 W at 480 MHz (STM32H743 datasheet, order of magnitude).
    # Scalar FPU, fp32 training ~0.3 FLOP/cycle. 32 MiB: external SDRAM of e.g. STM32H747I-DISCO.
    # Radio: NB-IoT / LTE-M module, power class 5 = 20 dBm (3GPP TS 36.101).
    # Budget: 0.1 % of a 1000 mAh 3.7 V LiPo (13.3 kJ) per round.
    "mcu": DeviceClass(
        name="mcu", cpu_hz_min=64e6, cpu_hz_max=480e6, flops_per_s_max=1.5e8,
        compute_power_w=0.3, accelerator=False, tx_power_dbm_min=0.0, tx_power_dbm_max=20.0,
        memory_bytes=32 * _MIB, energy_budget_j=13.0, work_scale=0.25, max_bits=8,
        preferred_bits=(2, 3, 4),
    ),
    # Raspberry Pi 4 B: 4x Cortex-A72 @ 1.5 GHz (1.8 GHz on rev 1.4+ firmware), ondemand governor
    # floor 600 MHz. Measured ~2.7 W idle, ~5-6.4 W under all-core load (Raspberry Pi
    # Foundation / Tom's Hardware / Jeff Geerling power measurements) -> ~3 W dynamic.
    # PyTorch fp32 conv training ~4 GFLOP/s (NEON peak ~24 GFLOP/s). LTE HAT: UE class 3 23 dBm.
    "rpi4": DeviceClass(
        name="rpi4", cpu_hz_min=600e6, cpu_hz_max=1.5e9, flops_per_s_max=4e9,
        compute_power_w=3.0, accelerator=False, tx_power_dbm_min=0.0, tx_power_dbm_max=23.0,
        memory_bytes=4 * _GIB, energy_budget_j=500.0, work_scale=0.5, max_bits=8,
        preferred_bits=(4,),
    ),
    # Jetson Nano 4 GB: nvpmodel 10 W (MAXN, GPU 921.6 MHz) and 5 W (GPU capped 640 MHz).
    # 10 W * (640/921.6)^2 = 4.8 W, so the exponent-2 power model matches both modes.
    # 128-core Maxwell, 472 GFLOP/s fp16 peak; ~50 GFLOP/s effective for small-batch training.
    "jetson_nano": DeviceClass(
        name="jetson_nano", cpu_hz_min=640e6, cpu_hz_max=921.6e6, flops_per_s_max=5e10,
        compute_power_w=10.0, accelerator=True, tx_power_dbm_min=0.0, tx_power_dbm_max=23.0,
        memory_bytes=4 * _GIB, energy_budget_j=1000.0, work_scale=1.0, max_bits=32,
        preferred_bits=(8,),
    ),
    # Jetson Orin NX 16 GB: nvpmodel 25 W (GPU 918 MHz) and 15 W; f_min = 918 MHz * sqrt(15/25)
    # = 711 MHz so the exponent-2 model gives 15 W there. 1024-core Ampere, ~1.9 TFLOP/s fp32
    # peak; ~400 GFLOP/s effective.
    "jetson_orin": DeviceClass(
        name="jetson_orin", cpu_hz_min=711e6, cpu_hz_max=918e6, flops_per_s_max=4e11,
        compute_power_w=25.0, accelerator=True, tx_power_dbm_min=0.0, tx_power_dbm_max=23.0,
        memory_bytes=16 * _GIB, energy_budget_j=2500.0, work_scale=1.0, max_bits=32,
        preferred_bits=(8,),
    ),
    # Smartphone, Snapdragon 8-class big cores 0.8-2.8 GHz, ~3.5 W sustained CPU power
    # (kappa ~1.6e-28, close to the 1e-28 of the FL literature); on-device CPU training
    # ~15 GFLOP/s. LTE UE power class 3: 23 dBm max (3GPP TS 36.101).
    # Budget: 0.5 % of a 15 Wh battery (54 kJ) per round.
    "phone": DeviceClass(
        name="phone", cpu_hz_min=800e6, cpu_hz_max=2.8e9, flops_per_s_max=1.5e10,
        compute_power_w=3.5, accelerator=False, tx_power_dbm_min=0.0, tx_power_dbm_max=23.0,
        memory_bytes=6 * _GIB, energy_budget_j=270.0, work_scale=1.0, max_bits=16,
        preferred_bits=(6,),
    ),
    # Edge gateway, x86 mini-PC (8 cores, 0.8-3.0 GHz), ~25 W dynamic at full load,
    # AVX2 fp32 training ~80 GFLOP/s. Cellular CPE with HPUE power class 2: 26 dBm. Mains powered.
    "gateway": DeviceClass(
        name="gateway", cpu_hz_min=800e6, cpu_hz_max=3.0e9, flops_per_s_max=8e10,
        compute_power_w=25.0, accelerator=False, tx_power_dbm_min=0.0, tx_power_dbm_max=26.0,
        memory_bytes=16 * _GIB, energy_budget_j=5000.0, work_scale=1.0, max_bits=32,
        preferred_bits=(8,),
    ),
}

# Default fleet: mostly cheap sensors, single-board computers and phones, a few accelerators.
DEFAULT_CLASS_MIX: dict[str, float] = {
    "mcu": 0.20,
    "rpi4": 0.25,
    "jetson_nano": 0.15,
    "jetson_orin": 0.05,
    "phone": 0.25,
    "gateway": 0.10,
}

# Per-class columns: filled from DEVICE_CLASSES when a user table leaves them out.
CLASS_COLUMNS: tuple[str, ...] = (
    "cpu_hz_min", "cpu_hz_max", "flops_per_cycle", "kappa", "accel_power_w",
    "tx_power_w_min", "tx_power_w_max", "memory_bytes", "energy_budget_j", "work_scale",
    "max_bits", "preferred_bits",
)
POSITION_COLUMNS: tuple[str, ...] = ("x_m", "y_m", "distance_m", "shadowing_db")
POPULATION_COLUMNS: tuple[str, ...] = ("device_class", *CLASS_COLUMNS, *POSITION_COLUMNS)
_INT_COLUMNS = ("memory_bytes", "max_bits", "preferred_bits")


def _class_value(cls: DeviceClass, column: str) -> float:
    """Nominal value of one per-class column (preferred_bits: the class's middle choice)."""
    if column == "preferred_bits":
        return cls.preferred_bits[len(cls.preferred_bits) // 2]
    return getattr(cls, column)


def local_steps(work_scale, nominal_steps: int) -> np.ndarray:
    """Local optimiser steps per client: max(1, round(nominal_steps * work_scale))."""
    steps = np.rint(np.asarray(work_scale, dtype=float) * nominal_steps)
    return np.maximum(1, steps).astype(np.int64)


def _class_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation, so the mix is met exactly up to rounding."""
    total = sum(mix.values())
    quotas = {k: n * v / total for k, v in mix.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    rest = n - sum(counts.values())
    by_remainder = sorted(mix, key=lambda k: (counts[k] - quotas[k], list(mix).index(k)))
    for k in by_remainder[:rest]:
        counts[k] += 1
    return counts


def _check_mix(mix: dict[str, float]) -> None:
    unknown = sorted(set(mix) - set(DEVICE_CLASSES))
    if unknown:
        raise DeviceProfileError(
            f"class_mix: unknown device class {unknown[0]!r} (known: {', '.join(DEVICE_CLASSES)})"
        )
    if any(not np.isfinite(v) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise DeviceProfileError("class_mix: weights must be finite, >= 0 and not all zero")


def _place_clients(n: int, rng: np.random.Generator, cell_m: float) -> tuple[np.ndarray, ...]:
    """Uniform positions in a cell_m x cell_m square around the AP, at least MIN_DISTANCE_M away."""
    if cell_m / 2 <= MIN_DISTANCE_M:
        raise DeviceProfileError(f"cell_m: {cell_m} m leaves no room outside {MIN_DISTANCE_M} m")
    x = np.empty(n)
    y = np.empty(n)
    todo = np.arange(n)
    while todo.size:  # rejection sampling; the excluded disc is tiny, so this ends fast
        x[todo] = rng.uniform(-cell_m / 2, cell_m / 2, todo.size)
        y[todo] = rng.uniform(-cell_m / 2, cell_m / 2, todo.size)
        todo = todo[np.hypot(x[todo], y[todo]) < MIN_DISTANCE_M]
    return x, y, np.hypot(x, y)


def make_population(
    n: int,
    seed: int,
    class_mix: dict[str, float] | None = None,
    cell_m: float = 500.0,
) -> pd.DataFrame:
    """Seeded population of n clients; class counts follow class_mix (default DEFAULT_CLASS_MIX)."""
    if n < 1:
        raise DeviceProfileError(f"n: need at least one client, got {n}")
    mix = dict(DEFAULT_CLASS_MIX if class_mix is None else class_mix)
    _check_mix(mix)
    rng = np.random.default_rng(seed)
    counts = _class_counts(n, mix)
    classes = np.concatenate([np.full(c, k, dtype=object) for k, c in counts.items()])
    classes = classes[rng.permutation(n)]

    df = pd.DataFrame({"device_class": classes.astype(str)})
    for col in CLASS_COLUMNS:
        df[col] = df["device_class"].map(lambda k, c=col: _class_value(DEVICE_CLASSES[k], c))
    df["flops_per_cycle"] *= rng.uniform(1 - FLOPS_JITTER, 1 + FLOPS_JITTER, n)
    for name, cls in DEVICE_CLASSES.items():  # each device's own on-demand bit preference
        rows = np.flatnonzero(classes == name)
        df.loc[rows, "preferred_bits"] = rng.choice(cls.preferred_bits, rows.size)
    df["x_m"], df["y_m"], df["distance_m"] = _place_clients(n, rng, cell_m)
    df["shadowing_db"] = rng.normal(0.0, SHADOWING_SIGMA_DB, n)
    for col in _INT_COLUMNS:
        df[col] = df[col].astype(np.int64)
    df.index = pd.RangeIndex(n, name="client_id")
    return df[list(POPULATION_COLUMNS)]


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DeviceProfileError(f"device profiles {path}: no such file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a user-file problem
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeviceProfileError(f"device profiles {path}: not readable ({msg})") from None
    raise DeviceProfileError(f"device profiles {path}: expected a .parquet or .csv file")


def _set_client_index(df: pd.DataFrame) -> pd.DataFrame:
    """Use a client_id column (must be exactly 0..n-1) as the index, sorted."""
    if "client_id" not in df.columns:
        return df.reset_index(drop=True).rename_axis("client_id")
    ids = pd.to_numeric(df["client_id"], errors="coerce")
    if ids.isna().any() or (ids != np.floor(ids)).any():
        row = int(np.flatnonzero(ids.isna() | (ids != np.floor(ids)))[0])
        raise DeviceProfileError(f"column 'client_id' row {row}: not an integer")
    if sorted(ids.astype(np.int64)) != list(range(len(df))):
        raise DeviceProfileError("column 'client_id': must hold each of 0..n-1 exactly once")
    df = df.assign(client_id=ids.astype(np.int64)).set_index("client_id").sort_index()
    return df


def _fill_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Fill missing per-class columns / cells from DEVICE_CLASSES; positions from x/y/distance."""
    df = df.copy()
    if "device_class" not in df.columns:
        raise DeviceProfileError("missing required column 'device_class'")
    df["device_class"] = df["device_class"].astype(str)
    known = df["device_class"].isin(list(DEVICE_CLASSES))
    for col in CLASS_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
        numeric = pd.to_numeric(df[col], errors="coerce")
        _fail_where(df, (numeric.isna() & df[col].notna()).to_numpy(), col, "not a number")
        df[col] = numeric
        default = df["device_class"].map(
            lambda k, c=col: _class_value(DEVICE_CLASSES[k], c) if k in DEVICE_CLASSES else np.nan
        )
        missing = df[col].isna()
        if (missing & ~known).any():
            row = df.index[np.flatnonzero(missing & ~known)[0]]
            cls = df.at[row, "device_class"]
            raise DeviceProfileError(
                f"column {col!r} row {row}: missing, and device class {cls!r} has no defaults"
            )
        df[col] = df[col].where(~missing, default).astype(float)
    has_xy = {"x_m", "y_m"} <= set(df.columns)
    if "distance_m" not in df.columns:
        if not has_xy:
            raise DeviceProfileError("missing required column 'distance_m' (or both 'x_m', 'y_m')")
        df["distance_m"] = np.hypot(df["x_m"].astype(float), df["y_m"].astype(float))
    if not has_xy:  # only a distance is known: put the client on the x axis
        df["x_m"], df["y_m"] = df["distance_m"], 0.0
    if "shadowing_db" not in df.columns:
        df["shadowing_db"] = 0.0
    return df


def _check_numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        row = df.index[np.flatnonzero(bad)[0]]
        raise DeviceProfileError(f"column {col!r} row {row}: not a finite number ({df.at[row, col]!r})")
    return values


def _fail_where(df: pd.DataFrame, bad: np.ndarray, col: str, what: str) -> None:
    """Raise for the first row where bad holds, quoting that row's value."""
    if bad.any():
        row = df.index[np.flatnonzero(bad)[0]]
        raise DeviceProfileError(f"column {col!r} row {row}: {what} (got {df.at[row, col]!r})")


def validate_population(df: pd.DataFrame) -> None:
    """Raise DeviceProfileError (one line, naming column and row) unless df is a usable population."""
    missing = [c for c in POPULATION_COLUMNS if c not in df.columns]
    if missing:
        raise DeviceProfileError(f"missing required column {missing[0]!r}")
    if len(df) == 0:
        raise DeviceProfileError("device profiles: the table has no rows")
    if list(df.index) != list(range(len(df))):
        raise DeviceProfileError("index 'client_id': must be 0..n-1 in order")
    v = {c: _check_numeric(df, c) for c in POPULATION_COLUMNS if c != "device_class"}
    positive = ("cpu_hz_min", "cpu_hz_max", "flops_per_cycle", "tx_power_w_min",
                "tx_power_w_max", "memory_bytes", "energy_budget_j", "work_scale", "distance_m")
    for col in positive:
        _fail_where(df, v[col] <= 0, col, "must be > 0")
    for col in ("kappa", "accel_power_w"):
        _fail_where(df, v[col] < 0, col, "must be >= 0")
    _fail_where(df, (v["kappa"] == 0) & (v["accel_power_w"] == 0), "kappa",
                "kappa and accel_power_w are both 0 (need a compute power model)")
    for lo, hi in (("cpu_hz_min", "cpu_hz_max"), ("tx_power_w_min", "tx_power_w_max")):
        _fail_where(df, v[lo] > v[hi], lo, f"must be <= {hi}")
    for col in ("max_bits", "preferred_bits"):
        _fail_where(df, ~np.isin(v[col], SUPPORTED_BITS), col,
                    f"must be one of {SUPPORTED_BITS}")
    _fail_where(df, v["preferred_bits"] > v["max_bits"], "preferred_bits", "must be <= max_bits")
    off = ~np.isclose(np.hypot(v["x_m"], v["y_m"]), v["distance_m"], rtol=1e-6, atol=1e-3)
    _fail_where(df, off, "distance_m", "does not match hypot(x_m, y_m)")


def load_population(path: str | Path) -> pd.DataFrame:
    """Read a Parquet or CSV device profile table, fill class defaults, validate it.

    Required: ``device_class`` and either ``distance_m`` or both ``x_m``/``y_m``. Per-class
    columns (``CLASS_COLUMNS``) may be left out or empty for known classes; ``shadowing_db``
    defaults to 0. An optional ``client_id`` column (exactly 0..n-1) becomes the index.
    """
    path = Path(path)
    df = _read_table(path)
    if len(df) == 0:
        raise DeviceProfileError(f"device profiles {path}: the table has no rows")
    df = _fill_defaults(_set_client_index(df))
    for col in POPULATION_COLUMNS[1:]:
        df[col] = _check_numeric(df, col)
    validate_population(df)
    for col in _INT_COLUMNS:
        df[col] = df[col].astype(np.int64)
    extra = [c for c in df.columns if c not in POPULATION_COLUMNS]
    return df[list(POPULATION_COLUMNS) + extra]
