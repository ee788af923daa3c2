"""Kill the driver mid-run, resume with ``ssdiff run --resume``: same ledgers, same model.

Every run here is a real ``ssdiff run`` subprocess with its own embedded Ray, so killing
the driver kills a whole Ray session the way a crash of a login node would.
"""

import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import TINY, TWO_POOLS
from safetensors.numpy import load_file

from ssdiff_ray import checkpoint

pytestmark = pytest.mark.slow

# Quantized uplinks with error feedback, FedAvgM momentum and an adaptive policy: every
# piece of state a resume must carry over (residuals, velocity, loss history) is in play.
RESUME = [*TINY, TWO_POOLS, "rounds=5", "server.checkpoint_every=1", "quant.policy=doubly_adaptive",
          "quant.bits=4", "quant.min_bits=2", "quant.max_bits=8", "server.aggregator=fedavgm",
          "train.local_steps=6", "eval.samples=10",
          "clients.state_cache_mib=0.5"]  # most residuals spilled to disk, checkpointed from there
TIMING = ["train_s", "encode_s"]


def _ssdiff(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ssdiff_ray.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _checkpoint_round(run_dir) -> int:
    if not (run_dir / checkpoint.CHECKPOINT).exists():
        return 0
    return checkpoint.load(run_dir)["round"]


def _kill_tree(proc) -> None:
    """SIGKILL the driver and everything it started (its embedded Ray too)."""
    procs = [psutil.Process(proc.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _weights(run_dir) -> dict:
    return load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_driver_killed_mid_run_resumes_exactly(tmp_path):
    sets = [f"--set={s}" for s in [*RESUME, f"out_dir={tmp_path}"]]
    # The uninterrupted reference runs alongside the one that is cut (the kill waits for a
    # checkpoint, not a time, so sharing cores changes nothing but the wall time).
    ref = _ssdiff("run", *sets, "--set=name=ref", "--quiet", start_new_session=True)
    run_dir = tmp_path / "cut"
    cut = _ssdiff("run", *sets, "--set=name=cut", "--quiet", start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(run_dir) < 2 and cut.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_after = _checkpoint_round(run_dir)
        assert cut.poll() is None, cut.communicate()[0][-3000:]
        _kill_tree(cut)
        cut.communicate()
        assert 2 <= killed_after < 5
        assert not (run_dir / "model").exists()
        out, _ = ref.communicate(timeout=600)
        assert ref.returncode == 0, out
    finally:
        for p in (cut, ref):
            if p.poll() is None:
                _kill_tree(p)
                p.communicate()

    res = _ssdiff("run", "--resume", str(run_dir), "--quiet")
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out

    ref_dir = tmp_path / "ref"
    for name in ("clients.parquet", "rounds.parquet"):
        a = pd.read_parquet(ref_dir / name)
        b = pd.read_parquet(run_dir / name)
        if name == "clients.parquet":
            assert not b.duplicated(["round", "client_id"]).any()
            assert len(b) == 5 * 6
            a, b = a.drop(columns=TIMING), b.drop(columns=TIMING)
        else:
            assert list(b["round"]) == [1, 2, 3, 4, 5]
            keep = ["round", "clients_selected", "clients_aggregated", "uplink_bytes", "loss",
                    "update_norm", "mean_bits", "energy_j", "fid"]
            a, b = a[keep], b[keep]
        pd.testing.assert_frame_equal(a, b)
    wa, wb = _weights(ref_dir), _weights(run_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
