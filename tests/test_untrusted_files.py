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
    names = sorted(p.name for p in tmp_path.glob("checkpoint*"))
    assert len(names) == 2 and names[0].startswith("checkpoint-r3-") and names[1] == "checkpoint.json"


def test_a_reader_beside_a_live_run_always_gets_a_whole_checkpoint(tmp_path):
    # a status poll reads while the run commits newer checkpoints and removes the older files
    # (CI once saw the JSON it had read name a file already gone)
    import threading
    import time

    checkpoint.save(tmp_path, {"round": 0, "w": np.zeros(100_000)}, 0)
    done = threading.Event()

    def run():
        for r in range(1, 10_000):
            if done.is_set():
                return
            checkpoint.save(tmp_path, {"round": r, "w": np.full(100_000, float(r))}, r)
            time.sleep(0.005)

    writer = threading.Thread(target=run)
    writer.start()
    try:
        rounds = []
        for _ in range(200):
            state = checkpoint.load(tmp_path)
            assert (state["w"] == state["round"]).all()
            rounds.append(state["round"])
    finally:
        done.set()
        writer.join()
    assert rounds[-1] > rounds[0]   # it did read while the writer went on


def test_a_changed_tensor_file_or_a_path_outside_the_run_is_refused(tmp_path):
    checkpoint.save(tmp_path, {"w": np.zeros(4, dtype=np.float32)}, 1)
    (f,) = tmp_path.glob("checkpoint-r1-*.safetensors")
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


def test_a_defense_cache_is_trusted_only_as_this_machine_signed_it(tmp_path, monkeypatch):
    """The cache's key anyone can recompute; the signature only this machine's secret makes.
    (Unit test of the check ``cache.load`` runs before it uses a cache.)"""
    from ssdiff_ray.defense import cache

    monkeypatch.setenv("SSDIFF_CACHE_DIR", str(tmp_path / "secret-here"))
    d = tmp_path / "defense"
    d.mkdir()
    key = {"version": cache.VERSION, "model": "ab" * 32}
    (d / "audit.json").write_text(json.dumps({"verdict": "backdoored", "stat": 0.9}))
    cache._write_key(d, key)
    assert cache._trusted(d, key)
    assert not cache._trusted(d, {**key, "model": "cd" * 32})     # other weights
    (d / "audit.json").write_text(json.dumps({"verdict": "clean", "stat": 0.0}))   # forged
    assert not cache._trusted(d, key)
    stored = json.loads((d / "key.json").read_text())               # hashes recomputed too
    stored["files"] = cache._file_digests(d)
    (d / "key.json").write_text(json.dumps(stored))
    assert not cache._trusted(d, key)
    cache._write_key(d, key)
    assert cache._trusted(d, key)
    monkeypatch.setenv("SSDIFF_CACHE_DIR", str(tmp_path / "another-machine"))
    assert not cache._trusted(d, key)
    assert oct((tmp_path / "secret-here" / "defense.key").stat().st_mode & 0o777) == "0o600"


def test_a_distilled_set_names_no_judge_and_its_data_must_match_its_hash(tmp_path, capsys):
    from ssdiff_ray.distill import DistillError
    from ssdiff_ray.distill.distilled_set import read_set, write_set
    from ssdiff_ray.distill.scan_set import scan_path

    x = np.zeros((4, 1, 8, 8), np.float32)
    m = write_set(tmp_path / "set", x, np.arange(4), {"source_run": str(tmp_path / "theirs")})
    with pytest.raises(DistillError, match="name the run whose model made the set"):
        scan_path(tmp_path / "set", None)
    with pytest.raises(SystemExit) as e:                                # --run is required
        cli.main(["distill-scan", str(tmp_path / "set")])
    assert e.value.code == 2 and "required: --run" in capsys.readouterr().err
    data = tmp_path / "set" / "data.parquet"
    other = write_set(tmp_path / "other", x + 1, np.arange(4), {})
    assert other["data_sha256"] != m["data_sha256"]
    data.write_bytes((tmp_path / "other" / "data.parquet").read_bytes())   # swapped images
    with pytest.raises(DistillError, match="does not match the manifest's data_sha256"):
        read_set(tmp_path / "set")


def test_an_image_struct_path_stays_in_the_tables_folder(tmp_path):
    """A Parquet file from someone else names image files by path: only regular files
    beside it are read, never /dev/zero or a file elsewhere on the host."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ssdiff_ray.data import DataError, load_dataset

    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "sub").mkdir()

    def load(path):
        pq.write_table(pa.table({"image": [{"bytes": None, "path": path}]}),
                       tmp_path / "t.parquet")
        return load_dataset(config.load(None, ["data.name=parquet",
                                               f"data.path={tmp_path / 't.parquet'}"]).data)

    assert load("ok.png").images.shape == (1, 1, 16, 16)
    for path, words in (("/dev/zero", "outside the table's folder"),
                        ("../../etc/hostname", "outside the table's folder"),
                        ("sub", "not a regular file")):
        with pytest.raises(DataError, match=words):
            load(path)


def test_a_storage_url_is_shown_without_its_password():
    from ssdiff_ray.errors import redact

    assert redact("postgresql+psycopg://me:s3cret@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
