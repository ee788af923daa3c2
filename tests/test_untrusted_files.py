"""Files a user may get from someone else never run code when read: a run directory's
checkpoint is JSON + safetensors with its hash checked, and an earlier version's pickled
checkpoint is refused unread."""

import json
import os
import pickle

import numpy as np
import pytest

from ssdiff_ray import checkpoint, cli, config


class Payload:
    """Unpickling this writes ``marker``: what a tampered pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_roundtrip_keeps_arrays_int_keys_and_nan(tmp_path):
    state = {"format": 3, "round": 2, "server": {"weights": np.arange(5, dtype=np.float32),
             "ema": None}, "pools": [{"residuals": {3: np.ones(2), 7: np.zeros(2)}}],
             "planner": {"loss_history": [1.0, float("nan")]}, "baseline": {}}
    checkpoint.save(tmp_path, state, 2)
    back = checkpoint.load(tmp_path)
    assert back["round"] == 2 and back["server"]["ema"] is None
    np.testing.assert_array_equal(back["server"]["weights"], state["server"]["weights"])
    assert set(back["pools"][0]["residuals"]) == {3, 7}
    assert np.isnan(back["planner"]["loss_history"][1])
    checkpoint.save(tmp_path, {**state, "round": 3}, 3)   # the next one replaces the files
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == [
        "checkpoint-r3.safetensors", "checkpoint.json"]


def test_a_changed_tensor_file_or_a_path_outside_the_run_is_refused(tmp_path):
    checkpoint.save(tmp_path, {"w": np.zeros(4, dtype=np.float32)}, 1)
    f = tmp_path / "checkpoint-r1.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + np.float32(9).tobytes())
    with pytest.raises(checkpoint.CheckpointError, match="does not match its SHA-256"):
        checkpoint.load(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["tensors"] = "../elsewhere.safetensors"
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="not a file beside it"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text("[" * 100_000)   # a JSON depth bomb
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.load(tmp_path)


def test_resume_never_unpickles_a_planted_checkpoint(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config.save(config.load(None, tiny_overrides), run / "config.toml")
    marker = tmp_path / "pwned"
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does work
    assert (tmp_path / "control").exists()
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssdiff: error: {run / 'checkpoint.pkl'}: a checkpoint of an earlier "
                   "version, in pickle, which can run code when read: not loaded (start the "
                   "run again)"]
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == before   # nothing written


def test_a_weights_file_with_code_is_refused_unread(tmp_path):
    """eval.inception_weights names a file torch-fidelity would unpickle in full: it must
    first load as plain tensors, so a planted payload never runs."""
    from ssdiff_ray.metrics.inception import WEIGHTS_FILE, InceptionFeatures, InceptionWeightsError

    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps({"conv.weight": Payload(marker)}))
    with pytest.raises(InceptionWeightsError, match="not a plain weights file, refused unread"):
        InceptionFeatures(evil)
    assert not marker.exists()
    named = tmp_path / WEIGHTS_FILE   # a file that claims to be the published weights
    named.write_bytes(b"\0" * 64)
    with pytest.raises(InceptionWeightsError, match="SHA-256 is not the published file's"):
        InceptionFeatures(named)
