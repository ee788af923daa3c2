"""Resume edge cases, in-process on a real local Ray: a run stopped at a chosen moment (an
exception from ``on_round``, or a failing checkpoint rename) and resumed with
``api.run(resume=...)`` ends with the same ledgers and weights as a run never stopped."""

import os

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from ssdiff_ray import api, config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
BASE = ["model.preset=tiny", "model.timesteps=50", "clients.count=6", "clients.per_round=0.5",
        "clients.pools=2", "train.local_steps=2", "train.batch_size=8", "data.image_size=8",
        "eval.samples=10", "eval.steps=2", "eval.grid=0", "eval.baseline=false", "rounds=4",
        "quant.bits=4", "quant.policy=doubly_adaptive", "server.aggregator=fedavgm"]
TIMING = ["wall_s", "train_wall_s", "train_s", "encode_s", "decode_s", "aggregate_s", "eval_s"]


class Stop(Exception):
    pass


def _stop_after(round_: int):
    def on_round(fed, r, row):
        if r == round_:
            raise Stop
    return on_round


def _result(run_dir) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    clients = pd.read_parquet(f"{run_dir}/clients.parquet").drop(columns=TIMING, errors="ignore")
    rounds = pd.read_parquet(f"{run_dir}/rounds.parquet").drop(columns=TIMING, errors="ignore")
    return clients, rounds, load_file(f"{run_dir}/model/unet/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never stopped."""
    tmp = tmp_path_factory.mktemp("ref")
    s = api.run(config.load(None, [*BASE, f"out_dir={tmp}", "name=ref"]), progress=False)
    return _result(s["run_dir"])


def _stopped_then_resumed(tmp_path, sets, stop_at, resume_sets=()):
    cfg = config.load(None, [*BASE, f"out_dir={tmp_path}", "name=r", *sets])
    with pytest.raises(Stop):
        api.run(cfg, progress=False, on_round=_stop_after(stop_at))
    run_dir = tmp_path / "r"
    cfg2 = config.load(run_dir / "config.toml", list(resume_sets))
    api.run(cfg2, progress=False, resume=run_dir)
    return run_dir


def _same(a, b, exact=True):
    pd.testing.assert_frame_equal(a[0], b[0], check_exact=exact, rtol=1e-5)
    pd.testing.assert_frame_equal(a[1], b[1], check_exact=exact, rtol=1e-5)
    for k in a[2]:
        if exact:
            assert np.array_equal(a[2][k], b[2][k]), k
        else:
            np.testing.assert_allclose(a[2][k], b[2][k], rtol=1e-5, atol=1e-6)


def test_checkpoint_every_two_resumes_from_the_last_checkpoint(tmp_path, reference):
    run_dir = _stopped_then_resumed(tmp_path, ["server.checkpoint_every=2"], stop_at=3)
    _same(_result(run_dir), reference)


def test_stopped_before_the_first_checkpoint_starts_over(tmp_path, reference):
    run_dir = _stopped_then_resumed(tmp_path, ["server.checkpoint_every=2"], stop_at=1)
    _same(_result(run_dir), reference)


def test_stopped_between_ledger_flush_and_checkpoint_rename(tmp_path, reference, monkeypatch):
    """The ledger files already hold round 3 but the checkpoint is round 2's: the resumed
    run drops the ledger's round 3 and trains it again."""
    from ssdiff_ray import checkpoint

    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        if str(dst).endswith(checkpoint.CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint: after round 3
                raise Stop
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    cfg = config.load(None, [*BASE, f"out_dir={tmp_path}", "name=r", "server.checkpoint_every=1"])
    with pytest.raises(Stop):
        api.run(cfg, progress=False)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    run_dir = tmp_path / "r"
    assert pd.read_parquet(run_dir / "rounds.parquet")["round"].max() == 3  # flushed
    api.run(config.load(run_dir / "config.toml"), progress=False, resume=run_dir)
    _same(_result(run_dir), reference)


def test_resume_with_another_pool_count_hands_each_client_its_residual(tmp_path):
    """Stopped with 2 pools, resumed with 3: client i now lives in pool i % 3, and it gets
    the error-feedback residual it had at the checkpoint."""
    import ray

    from ssdiff_ray import checkpoint
    from ssdiff_ray.client_state_file import ClientStateFile

    # a small RAM cache: most residuals are spilled to disk, in the pools and after resume
    cfg = config.load(None, [*BASE, f"out_dir={tmp_path}", "name=r", "server.checkpoint_every=1",
                             "clients.state_cache_mib=0.5"])
    with pytest.raises(Stop):
        api.run(cfg, progress=False, on_round=_stop_after(2))
    run_dir = tmp_path / "r"
    ckpt = checkpoint.load(run_dir)
    state = ClientStateFile(run_dir, ckpt["run_id"], None, None, create=False)
    saved = {c: v.copy() for c, _, v in state.read(ckpt["round"])}
    state.close()
    assert saved  # quantized uploads with error feedback left residuals
    seen = {}

    def on_round(fed, r, row):
        if r == 3:
            states = ray.get([p.state_since.remote(0) for p in fed.pools])
            stats = ray.get([p.state_stats.remote() for p in fed.pools])
            trained = set(fed.ledger.clients().query("round == 3")["client_id"])
            seen.update(trained=trained, states=states, stats=stats)

    api.run(config.load(run_dir / "config.toml", ["clients.pools=3"]), progress=False,
            resume=run_dir, on_round=on_round)
    for i, rows in enumerate(seen["states"]):
        assert all(int(c) % 3 == i for c, _, _ in rows)
    assert sum(s["on_disk"] for s in seen["stats"]) > 0  # spilled, and read back below
    held = {c: v for rows in seen["states"] for c, _, v in rows}
    assert set(saved) <= set(held)
    for c in set(saved) - seen["trained"]:  # untouched since the checkpoint
        assert np.array_equal(held[c], saved[c])
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert sorted(clients["round"].unique()) == [1, 2, 3, 4] and not clients["state_reset"].any()
    assert sorted(clients.query("round > 2")["pool"].unique()) == [0, 1, 2]


def test_resume_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    from ssdiff_ray import cli

    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "notes.txt").write_text("precious")
    assert cli.main(["run", "--resume", str(tmp_path / "notarun")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssdiff: error: --resume {tmp_path / 'notarun'}: not a run directory "
                   "(no config.toml)"]
    assert (tmp_path / "notarun" / "notes.txt").read_text() == "precious"
