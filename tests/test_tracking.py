"""[log]: round scalars and grids in TensorBoard event files and an MLflow store, read back
with TensorBoard's EventAccumulator and MLflow's client, on real tiny runs."""

import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssdiff_ray import api, config
from ssdiff_ray.errors import redact
from ssdiff_ray.tracking.mlflow_run import RUN_FILE

pytestmark = pytest.mark.usefixtures("ray_local")

# what the issue asks TensorBoard to show for every run (ASR: see test_security_run)
SCALARS = ["round/loss", "eval/fid", "eval/kid", "eval/precision", "eval/recall",
           "eval/bad_sample_share", "round/uplink_bytes", "round/downlink_bytes",
           "round/energy_j", "round/latency_s", "round/stragglers"]


def _tb(run_dir) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


class Stop(Exception):
    pass


def test_stopped_and_resumed_run_logs_each_round_once(tiny_overrides, tmp_path):
    """A run logging to both trackers is stopped after round 3 (its checkpoint is round 2),
    then resumed: TensorBoard shows rounds 1-4 once each with the ledger's values, MLflow
    holds one run (failed, then continued and finished) with params, metrics, artifacts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*tiny_overrides, "rounds=4", "name=tracked", "eval.every=1", "server.checkpoint_every=2",
            "log.tensorboard=true", f"log.mlflow_uri={json.dumps(uri)}"]
    cfg = config.load(None, sets)

    def stop_after_3(fed, r, row):
        if r == 3:
            raise Stop

    with pytest.raises(Stop):
        api.run(cfg, progress=False, on_round=stop_after_3)
    run_dir = tmp_path / "tracked"
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"

    api.run(cfg, resume=run_dir, progress=False)
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    ea = _tb(run_dir)
    assert set(SCALARS) <= set(ea.Tags()["scalars"])
    for tag in SCALARS:
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag  # round 3 of the stopped run purged
        assert [e.value for e in events] == pytest.approx(rounds[tag.split("/")[1]].tolist(),
                                                          rel=1e-6), tag
    assert [e.step for e in ea.Images("samples")] == [1, 2, 3, 4]
    grid = (run_dir / "samples" / "round_0004.png").read_bytes()
    assert ea.Images("samples")[-1].encoded_image_string == grid

    run = client.get_run(run_id)  # the resumed run continued the same MLflow run
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["rounds"] == "4"
    fid = client.get_metric_history(run_id, "eval/fid")
    assert {m.step for m in fid} == {1, 2, 3, 4}
    last = max(fid, key=lambda m: (m.step, m.timestamp))
    assert last.value == pytest.approx(rounds["fid"].iloc[-1], rel=1e-6)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.toml", "summary.json", "rounds.parquet", "clients.parquet", "model",
            "samples"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "samples")} >= {"samples/round_0004.png"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_tracker_and_unwritable_folder_are_warnings(tiny_overrides, tmp_path):
    """Both trackers fail to open: two warning lines, and the run is whole all the same."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sets = [*tiny_overrides, "rounds=1", "name=untracked", "log.tensorboard=true",
            f"log.tensorboard_dir={json.dumps(str(blocker / 'tb'))}",
            'log.mlflow_uri="http://user:secret@127.0.0.1:9"']  # port 9: nothing listens
    out = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", "run", "--quiet",
                          *(a for s in sets for a in ("--set", s))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, out.stderr[-3000:]
    assert any("TensorBoard logging off" in w and "a-file" in w for w in warnings), warnings
    assert any("MLflow logging off" in w and "127.0.0.1:9" in w for w in warnings), warnings
    assert "secret" not in out.stderr  # the URI's password is never printed
    run_dir = tmp_path / "untracked"
    assert (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir()
    assert not (run_dir / RUN_FILE).exists()


@pytest.mark.parametrize("bad, message", [
    ("log.tensorbord=true", "unknown config key 'log.tensorbord'"),
    ('log.mlflow_uri="mlruns"', "log.mlflow_uri = 'mlruns': must start with"),
])
def test_bad_log_section_is_one_line_before_ray(tmp_path, bad, message):
    out = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", "run", "--set",
                          f"out_dir={tmp_path}", "--set", bad], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_redact_hides_the_password():
    assert redact("http://me:pw@host:5000") == "http://me:***@host:5000"
    assert redact("postgresql://me:pw@db/mlflow") == "postgresql://me:***@db/mlflow"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
