"""Device classes, seeded populations and user profile tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssdiff_ray.devices import (
    DEFAULT_CLASS_MIX,
    DEVICE_CLASSES,
    POPULATION_COLUMNS,
    SUPPORTED_BITS,
    DeviceProfileError,
    dbm_to_w,
    load_population,
    local_steps,
    make_population,
    validate_population,
)


def test_population_is_seeded_and_has_all_columns():
    a = make_population(200, seed=7)
    pd.testing.assert_frame_equal(a, make_population(200, seed=7))
    assert not a.equals(make_population(200, seed=8))
    assert list(a.columns) == list(POPULATION_COLUMNS)
    assert a.index.name == "client_id" and list(a.index) == list(range(200))
    validate_population(a)


def test_default_class_mix_is_met_exactly():
    pop = make_population(1000, seed=0)
    counts = pop["device_class"].value_counts().to_dict()
    assert counts == {k: round(1000 * w) for k, w in DEFAULT_CLASS_MIX.items()}


def test_custom_class_mix_and_rounding():
    assert set(make_population(30, 1, {"mcu": 1.0})["device_class"]) == {"mcu"}
    counts = make_population(5, 1, {"phone": 1.0, "gateway": 1.0})["device_class"].value_counts()
    assert sorted(counts.tolist()) == [2, 3]
    pop = make_population(10, 1, {"rpi4": 0.0, "jetson_orin": 3.0})
    assert set(pop["device_class"]) == {"jetson_orin"}


def test_unknown_class_in_mix_is_rejected():
    with pytest.raises(DeviceProfileError, match="unknown device class 'toaster'"):
        make_population(10, 0, {"toaster": 1.0})


def test_population_ranges():
    pop = make_population(2000, seed=3, cell_m=400.0)
    assert (pop["distance_m"] >= 10.0).all()
    assert (pop[["x_m", "y_m"]].abs() <= 200.0).all().all()
    assert np.allclose(np.hypot(pop["x_m"], pop["y_m"]), pop["distance_m"])
    assert abs(pop["shadowing_db"].std() - 8.0) < 0.5
    assert (pop["cpu_hz_min"] <= pop["cpu_hz_max"]).all()
    assert (pop["tx_power_w_min"] <= pop["tx_power_w_max"]).all()
    assert pop["preferred_bits"].isin(SUPPORTED_BITS).all()
    assert (pop["preferred_bits"] <= pop["max_bits"]).all()
    mcu = pop[pop["device_class"] == "mcu"]
    assert set(mcu["preferred_bits"]) == {2, 3, 4}
    cpu = pop["accel_power_w"] == 0
    assert (pop.loc[cpu, "kappa"] > 0).all() and (pop.loc[~cpu, "kappa"] == 0).all()
    # +-10 % jitter around each class's nominal FLOP/s
    nominal = pop["device_class"].map(lambda k: DEVICE_CLASSES[k].flops_per_cycle)
    ratio = pop["flops_per_cycle"] / nominal
    assert ratio.between(0.9, 1.1).all() and ratio.std() > 0.03


def test_class_constants():
    assert dbm_to_w(23.0) == pytest.approx(0.19953, rel=1e-4)
    phone = DEVICE_CLASSES["phone"]
    assert phone.kappa == pytest.approx(3.5 / 2.8e9**3)  # P_dyn(f_max) = kappa f_max^3
    nano = DEVICE_CLASSES["jetson_nano"]
    # the f^2 accelerator model reproduces the 5 W nvpmodel mode at the 640 MHz GPU cap
    assert nano.accel_power_w * (nano.cpu_hz_min / nano.cpu_hz_max) ** 2 == pytest.approx(5, 0.05)
    assert DEVICE_CLASSES["mcu"].work_scale == 0.25


def test_local_steps():
    assert local_steps([0.25, 0.5, 1.0, 0.01], 10).tolist() == [2, 5, 10, 1]


def test_load_population_roundtrips_csv_and_parquet(tmp_path):
    pop = make_population(40, seed=2)
    pop.to_csv(tmp_path / "p.csv")
    pop.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        got = load_population(tmp_path / name)
        pd.testing.assert_frame_equal(got, pop, check_exact=False, rtol=1e-12)


def test_load_population_fills_class_defaults(tmp_path):
    pd.DataFrame({
        "device_class": ["phone", "mcu", "gateway"],
        "distance_m": [50.0, 120.0, 300.0],
        "max_bits": [8, None, None],
    }).to_csv(tmp_path / "small.csv", index=False)
    pop = load_population(tmp_path / "small.csv")
    validate_population(pop)
    assert pop["cpu_hz_max"].tolist() == [2.8e9, 480e6, 3.0e9]
    assert pop["max_bits"].tolist() == [8, 8, 32]
    assert pop["shadowing_db"].tolist() == [0.0, 0.0, 0.0]
    assert pop["x_m"].tolist() == [50.0, 120.0, 300.0]


def test_load_population_accepts_custom_class_with_all_columns(tmp_path):
    row = make_population(1, seed=0).iloc[[0]].reset_index()
    row["device_class"] = "my_board"
    row.to_parquet(tmp_path / "custom.parquet")
    assert load_population(tmp_path / "custom.parquet")["device_class"].tolist() == ["my_board"]


def _write_bad(tmp_path, **changes) -> str:
    df = make_population(5, seed=0).reset_index()
    for col, (row, value) in changes.items():
        if value is _DROP:
            df = df.drop(columns=col)
        else:
            df[col] = df[col].astype(object)
            df.loc[row, col] = value
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    return str(path)


_DROP = object()


@pytest.mark.parametrize("changes, message", [
    ({"device_class": (0, _DROP)}, "missing required column 'device_class'"),
    ({"cpu_hz_max": (2, -1.0)}, "column 'cpu_hz_max' row 2: must be > 0"),
    ({"cpu_hz_min": (1, 9e12)}, "column 'cpu_hz_min' row 1: must be <= cpu_hz_max"),
    ({"tx_power_w_max": (3, "loud")}, "column 'tx_power_w_max' row 3: not a number"),
    ({"max_bits": (4, 12)}, "column 'max_bits' row 4: must be one of"),
    ({"preferred_bits": (0, 32), "max_bits": (0, 8)}, "column 'preferred_bits' row 0"),
    ({"device_class": (1, "toaster"), "kappa": (1, None)}, "column 'kappa' row 1: missing"),
    ({"distance_m": (2, 0.0)}, "column 'distance_m' row 2"),
    ({"client_id": (3, 1)}, "column 'client_id': must hold each of 0..n-1"),
])
def test_bad_tables_are_rejected_with_one_line(tmp_path, changes, message):
    with pytest.raises(DeviceProfileError) as err:
        load_population(_write_bad(tmp_path, **changes))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DeviceProfileError, match="no such file"):
        load_population(tmp_path / "nope.csv")
    (tmp_path / "p.txt").write_text("device_class\nphone\n")
    with pytest.raises(DeviceProfileError, match="expected a .parquet or .csv"):
        load_population(tmp_path / "p.txt")
    (tmp_path / "p.parquet").write_bytes(b"not parquet")
    with pytest.raises(DeviceProfileError, match="not readable"):
        load_population(tmp_path / "p.parquet")
    (tmp_path / "empty.csv").write_text("device_class,distance_m\n")
    with pytest.raises(DeviceProfileError, match="no rows"):
        load_population(tmp_path / "empty.csv")
