"""Config: typed values, ranges, unknown keys, overrides, TOML round trip, CLI exit code."""

import subprocess
import sys

import pytest

from ssdiff_ray import config as c


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = c.load(None, ["clients.count=1000", "model.preset=tiny", "rounds=2",
                        "devices.class_mix={rpi4=1.0, phone=2}"])
    assert cfg.clients.count == 1000 and cfg.model.preset == "tiny" and cfg.rounds == 2
    path = tmp_path / "cfg.toml"
    c.save(cfg, path)
    assert c.load(path) == cfg


def test_file_plus_override(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text("rounds = 5\n[train]\nlr = 0.002\n[quant]\npolicy = 'time_adaptive'\n")
    cfg = c.load(path, ["train.lr=1e-4", "quant.bits=4"])
    assert cfg.rounds == 5 and cfg.train.lr == 1e-4 and cfg.quant.bits == 4
    assert cfg.quant.policy == "time_adaptive"


@pytest.mark.parametrize("override, needle", [
    ("clients.count=0", "clients.count = 0: must be in [1,"),
    ("clients.per_round=1.5", "clients.per_round = 1.5: must be in (0, 1]"),
    ("quant.bits=9", "quant.bits = 9: must be one of 1, 2, 3"),
    ("model.preset=huge", "model.preset = 'huge': must be one of"),
    ("train.lr=abc", "train.lr = 'abc': must be a number"),
    ("train.local_steps=2.5", "train.local_steps = 2.5: must be an integer"),
    ("eval.baseline=1", "eval.baseline = 1: must be true or false"),
    ("clients.cnt=3", "unknown config key 'clients.cnt'"),
    ("nosuch=3", "unknown config key 'nosuch'"),
    ("devices.class_mix={toaster=1}", "devices.class_mix.toaster: unknown device class"),
    ("quant.min_bits=8", "quant.min_bits = 8: must be <= quant.max_bits"),
    ("data.name=parquet", "data.path = '': must name a Parquet file"),
])
def test_bad_values_name_field_value_and_range(override, needle):
    extra = ["quant.max_bits=4"] if override.startswith("quant.min_bits") else []
    with pytest.raises(c.ConfigError) as e:
        c.load(None, [override, *extra])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [\n")
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.load(bad)
    with pytest.raises(c.ConfigError, match="no such file"):
        c.load(tmp_path / "missing.toml")


def test_cli_config_error_exits_2_before_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ssdiff_ray.cli", "run", "--set", "clients.count=-1",
         "--set", f"out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["ssdiff: error: clients.count = -1: must be in [1, 1e+06]"]
    assert not any(tmp_path.iterdir())  # nothing written, Ray never started


@pytest.mark.parametrize("what", ["data", "profiles", "profile_rows"])
def test_bad_data_or_device_profiles_stop_before_anything_is_created(tmp_path, capsys, what):
    from ssdiff_ray import cli

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    few = tmp_path / "few.csv"
    few.write_text("device_class,x_m,y_m,distance_m\nphone,3,4,5\n")
    extra = {"data": ["data.name=parquet", f"data.path={bad}"],
             "profiles": [f"devices.profiles={bad}"],
             "profile_rows": [f"devices.profiles={few}"]}[what]
    out = tmp_path / "runs"
    args = ["run", "--set", f"out_dir={out}", "--set", "name=x", "--quiet"]
    assert cli.main([*args, *(a for s in extra for a in ("--set", s))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ssdiff: error: ")
    assert not out.exists()  # no run directory, not even an empty one


@pytest.mark.parametrize("ray_running", [False, True], ids=["no-ray", "ray-already-up"])
def test_unreachable_ray_address_fails_fast_with_one_line(tmp_path, request, ray_running):
    """In a fresh process (no Ray), and in one already connected to a Ray (the session's):
    the run must not go ahead on that one when the user named another cluster."""
    import time

    from ssdiff_ray import cli

    argv = ["run", "--address", "127.0.0.1:1", "--set", f"out_dir={tmp_path / 'r'}"]
    t0 = time.perf_counter()
    if ray_running:
        request.getfixturevalue("ray_local")
        capsys = request.getfixturevalue("capsys")
        code = cli.main(argv)
        err = capsys.readouterr().err
    else:  # a process of its own: this one may have a Ray from another test
        r = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", *argv],
                           capture_output=True, text=True, timeout=60)
        code, err = r.returncode, r.stderr
    assert code == 2 and time.perf_counter() - t0 < 15
    err = [line for line in err.splitlines()
           if line.strip() and not line.startswith("Token authentication")]  # Ray's notice
    assert err == ["ssdiff: error: cannot reach the Ray cluster at '127.0.0.1:1': Connection "
                   "refused (is the head node up, and is its GCS port open?)"]
    assert not (tmp_path / "r").exists()
