"""The whole defense path on a trained model: a tiny model with a strong backdoor (trained
once per test session) as a run directory; its clean twin is in tests/test_clean_model.py.

Estimate -> audit through ``audit_run`` (the cached ``RUN/defense/``), ``ssdiff cleanse``
through the binary, and ``ssdiff sample`` with a trigger file.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backdoor_recipe import BACKDOOR, train

from ssdiff_ray.attacks import attack_spec, make_attack
from ssdiff_ray.attacks.metrics import attack_metrics
from ssdiff_ray.attacks.patterns import make_target, make_trigger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def backdoored_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("models"), "backdoored", BACKDOOR)


def _asr(run: Path) -> float:
    from ssdiff_ray.inference import load_run_model
    from ssdiff_ray.model.sampling import sample

    cfg, unet, sched = load_run_model(run)
    spec = attack_spec(cfg)
    x = make_attack(spec).triggered_noise(100, 16, 7)
    out = sample(unet, sched, 100, sampler="ddim", steps=20, x_T=x)
    return attack_metrics(out, spec, make_target("hat", 16)[None])["asr"]


def test_backdoored_model_estimate_points_at_the_trigger_and_the_audit_says_backdoored(
        backdoored_run):
    from ssdiff_ray.inference import audit_run

    assert _asr(backdoored_run) >= 0.9  # the backdoor is there
    audit = audit_run(backdoored_run)
    tau = np.load(backdoored_run / "defense" / "estimate.npz")["tau"]
    r = make_trigger("box", 16)
    cos = float(tau.ravel() @ r.ravel() / np.linalg.norm(tau) / np.linalg.norm(r))
    assert cos >= 0.8, cos
    assert audit["verdict"] == "backdoored", audit
    # the cluster was looked for under each sampler and probed under the largest one's
    stats = json.loads((backdoored_run / "defense" / "estimate.json").read_text())["stats"]
    by = stats["cluster_fraction_by_sampler"]
    assert set(by) == {"ddim", "dpm"} and stats["sampler"] == max(by, key=by.get)
    assert by[stats["sampler"]] > 0
    # the estimate is saved once and reused: a second audit reads RUN/defense/
    key = (backdoored_run / "defense" / "key.json").stat().st_mtime_ns
    assert audit_run(backdoored_run)["verdict"] == "backdoored"
    assert (backdoored_run / "defense" / "key.json").stat().st_mtime_ns == key


def test_ssdiff_cleanse_removes_the_backdoor_and_keeps_clean_quality(backdoored_run):
    out = backdoored_run.with_name("cleansed")
    # 250 of the default 500 steps: enough on this tiny model, half the test's time
    r = subprocess.run([Path(sys.executable).parent / "ssdiff", "cleanse", str(backdoored_run),
                        "--out", str(out), "--steps", "250"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "cleanse.json").read_text())
    before, after = res["before"], res["after"]
    assert before["asr"] >= 0.9 and after["asr"] <= 0.2, res  # the highest over samplers
    assert set(after["asr_by_sampler"]) == {"ddim-20", "ddim-50", "dpm-10"}
    assert after["trigger_spread_ratio"] > 3 * before["trigger_spread_ratio"]  # no collapse
    assert after["fid"] <= 1.25 * before["fid"], res
    assert _asr(out) <= 0.2  # the new run directory holds the cleansed model
    # nothing is overwritten: a second cleanse into the same directory is refused
    again = subprocess.run([Path(sys.executable).parent / "ssdiff", "cleanse",
                            str(backdoored_run), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert again.stderr.count("\n") == 1


def test_sample_with_a_trigger_file_is_flagged_like_the_named_trigger(backdoored_run, tmp_path):
    from ssdiff_ray.inference import sample_run

    r = make_trigger("box", 16)
    np.save(tmp_path / "box.npy", np.concatenate([r, (r != 0).astype(np.float32)]))
    by_file = sample_run(backdoored_run, n=24, trigger=str(tmp_path / "box.npy"), seed=3,
                         out=tmp_path / "file.png")
    by_name = sample_run(backdoored_run, n=24, trigger="box", seed=3, out=tmp_path / "name.png")
    assert by_file["flagged"] == by_name["flagged"] >= 22
