"""End to end on a real local Ray: ledgers, saved model, determinism, a killed pool."""

import os
import time

import numpy as np
import pandas as pd
import pytest
import ray
from conftest import TWO_POOLS

from ssdiff_ray import api, config

pytestmark = pytest.mark.usefixtures("ray_local")


def _run(overrides, **kw):
    cfg = config.load(None, overrides)
    return api.run(cfg, progress=False, **kw)


def test_two_rounds_ledgers_and_model(tiny_overrides):
    s = _run([*tiny_overrides, "rounds=2", "name=e2e", "eval.every=1"])
    run_dir = s["run_dir"]
    rounds = pd.read_parquet(f"{run_dir}/rounds.parquet")
    clients = pd.read_parquet(f"{run_dir}/clients.parquet")
    assert list(rounds["round"]) == [1, 2]
    for col in ["round", "wall_s", "uplink_bytes", "clients_selected", "clients_aggregated",
                "fid", "energy_j", "latency_s"]:
        assert col in rounds.columns
    assert (rounds["clients_selected"] == 6).all() and (rounds["clients_aggregated"] == 6).all()
    assert np.isfinite(rounds["fid"]).all()
    for col in ["round", "client_id", "device_class", "num_samples", "bits", "uplink_bytes",
                "loss", "dropped"]:
        assert col in clients.columns
    assert len(clients) == 12 and not clients["dropped"].any()
    assert sorted(clients["client_id"].unique()) == list(range(6))
    # FP32 payloads: 4 bytes per parameter plus a small header
    assert (clients["uplink_bytes"] >= 4 * s["num_params"]).all()
    assert rounds["uplink_bytes"].iloc[0] == clients.query("round == 1")["uplink_bytes"].sum()
    # the saved model loads with plain diffusers and holds the final weights
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(f"{run_dir}/model")
    assert pipe.unet.config.sample_size == 16
    # the saved config is the run's, with channels and classes read from the data
    assert config.load(f"{run_dir}/config.toml") == config.load(None, [
        *tiny_overrides, "rounds=2", "name=e2e", "eval.every=1", "data.channels=1",
        "data.num_classes=10"])
    import glob

    assert glob.glob(f"{run_dir}/samples/round_0001.png")
    _report_page_is_whole(run_dir, clients)


def _report_page_is_whole(run_dir: str, clients: pd.DataFrame) -> None:
    """``ssdiff report`` writes report.html with everything inside: the run's grids as
    they are on disk, a device-class table row per class, the curves, the config."""
    import base64
    import re
    from pathlib import Path

    from ssdiff_ray.cli import main

    assert main(["report", run_dir]) == 0
    page = (Path(run_dir) / "report.html").read_text()
    for grid in ("round_0001.png", "round_0002.png"):
        png = (Path(run_dir) / "samples" / grid).read_bytes()
        assert base64.b64encode(png).decode() in page, grid
    rows = re.findall(r"<tr>\s*<td>([^<]+)</td>", page.split("Per device class")[1].split("<h2>")[0])
    assert sorted(rows) == sorted(clients["device_class"].unique())
    assert "curves per round" in page and "[train]" in page
    assert not re.search(r"""(src|href)=(?!['"]?data:)""", page)  # nothing to fetch


def test_report_and_compare_pages_open_offline(tiny_overrides, browser):
    """report.html and compare.html open in a headless browser with no request but the
    page itself, and every image in them decodes."""
    from pathlib import Path

    from ssdiff_ray.cli import main

    a = _run([*tiny_overrides, "rounds=1", "name=ra", "eval.samples=10"])["run_dir"]
    b = _run([*tiny_overrides, "rounds=1", "name=rb", "eval.samples=10", "seed=1"])["run_dir"]
    assert main(["report", a]) == 0
    out = Path(a).parent / "both.png"
    assert main(["compare", a, b, "--out", str(out)]) == 0
    for path, runs in ((Path(a) / "report.html", ["ra"]), (out.with_suffix(".html"), ["ra", "rb"])):
        pg = browser.new_page()
        fetched = []
        pg.on("request", lambda r, fetched=fetched: fetched.append(r.url))
        pg.goto(path.as_uri())
        assert [u for u in fetched if not u.startswith("data:")] == [path.as_uri()]
        sizes = pg.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) >= 1 + len(runs) and all(w > 0 for w in sizes), sizes
        assert all(r in pg.text_content("h1") for r in runs)
        pg.close()


def test_same_seed_same_client_ledger(tiny_overrides):
    """Two runs of one seed in one process give the same ledgers and model; the second
    reuses the first's server and pool processes (``driver.warm``) after a run of another
    shape in between, so nothing a reset actor keeps can leak into a run."""
    from safetensors.numpy import load_file

    from ssdiff_ray.driver import warm

    warm.release()  # this test's first run starts its own actors
    pids, pool_pids = [], []

    def server_pid(fed, r, row):
        if r == 1:
            pids.append(ray.get(fed.server.__ray_call__.remote(lambda _: os.getpid())))
            pool_pids.append(ray.get(fed.pools[0].ping.remote()))

    runs = [_run([*tiny_overrides, "rounds=2", f"name={name}", "eval.samples=10", *extra],
                 on_round=server_pid)
            for name, extra in [("a", []), ("other", ["model.preset=small", "seed=5",
                                                       "server.aggregator=fedavgm"]),
                                ("b", [])]]
    assert len(set(pids)) == 1, pids  # one server process served all three
    assert len(set(pool_pids)) == 1, pool_pids  # and one pool process
    a, _, b = (r["run_dir"] for r in runs)
    for name in ("clients.parquet", "rounds.parquet"):
        drop = ["train_s", "encode_s"] if name == "clients.parquet" else None
        ca, cb = pd.read_parquet(f"{a}/{name}"), pd.read_parquet(f"{b}/{name}")
        if drop is None:  # timings differ; the rest must not
            drop = [c for c in ca if c.endswith("_s")]
        pd.testing.assert_frame_equal(ca.drop(columns=drop), cb.drop(columns=drop))
    wa, wb = (load_file(f"{d}/model/unet/diffusion_pytorch_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert runs[0]["fid"] == runs[2]["fid"]
    # a kept server that died meanwhile is replaced by a fresh one
    (_, _, kept), = warm._servers
    ray.kill(kept)
    (_, _, kept_pool), = warm._pools
    ray.kill(kept_pool)
    first, first_pool = pids.pop(), pool_pids.pop()
    pids.clear()
    pool_pids.clear()
    _run([*tiny_overrides, "rounds=1", "name=c", "eval.samples=10"], on_round=server_pid)
    assert len(pids) == 1 and pids[0] != first
    assert len(pool_pids) == 1 and pool_pids[0] != first_pool


def test_kept_pool_that_ray_restarts_trains_for_the_current_run(tiny_overrides):
    """Ray restarts a crashed pool with the arguments it was *created* with: for a kept pool,
    an earlier run's config. Its next call carries the current run's setup, so it trains
    for this run (another model here: the first run's would not even fit the weights);
    and a restarted pool is not kept afterwards."""
    import signal

    from ssdiff_ray.driver import warm

    warm.release()
    _run([*tiny_overrides, "rounds=1", "name=first", "eval.samples=10"])
    assert warm.kept()["pools"] == 1
    pids = []

    def kill_pool(fed, r, row):
        pids.append(ray.get(fed.pools[0].ping.remote()))
        if r == 1:
            os.kill(pids[-1], signal.SIGKILL)  # the process dies; Ray restarts the actor
            while True:  # back, in a new process (a call sent before that would just fail)
                try:
                    if ray.get(fed.pools[0].ping.remote(), timeout=60) != pids[-1]:
                        break
                except ray.exceptions.RayError:
                    time.sleep(0.2)

    s = _run([*tiny_overrides, "rounds=3", "name=second", "model.preset=small",
              "eval.samples=10"], on_round=kill_pool)
    assert pids[1] != pids[0] and pids[2] == pids[1], pids
    clients = pd.read_parquet(f"{s['run_dir']}/clients.parquet")
    later = clients[clients["round"] > 1]
    assert (later["drop_reason"] == "").all(), later["drop_reason"].value_counts()
    assert later.query("round == 2")["state_reset"].all()
    assert warm.kept() == {"servers": 1, "pools": 0}


def test_pool_killed_mid_round_run_survives(tiny_overrides):
    killed = {}

    def on_round(fed, r, row):
        if r != 1:
            return
        dispatch = fed.dispatch

        def dispatch_then_kill(plan, weights_ref):
            fed.dispatch = dispatch
            calls = dispatch(plan, weights_ref)
            # Kill pool 0 while its round-2 call runs: that call does round 1's work, so a
            # third of round 1's training time in, it has started and not finished. (A fixed
            # timer after round 1 raced with it: on a fast machine the call had finished.)
            time.sleep(0.3 * row["train_wall_s"])
            ray.kill(fed.pools[0], no_restart=False)
            killed["at"] = plan.round
            return calls
        fed.dispatch = dispatch_then_kill

    s = _run([*tiny_overrides, TWO_POOLS, "rounds=3", "train.local_steps=20",
              "train.scale_work_by_device=false", "name=kill"], on_round=on_round)
    assert killed.get("at") == 2
    clients = pd.read_parquet(f"{s['run_dir']}/clients.parquet")
    rounds = pd.read_parquet(f"{s['run_dir']}/rounds.parquet")
    r2 = clients.query("round == 2")
    lost = r2[r2["pool"] == 0]
    assert (lost["drop_reason"] == "pool_failed").all() and lost["dropped"].all()
    assert (lost["uplink_bytes"] == 0).all() and lost["loss"].isna().all()
    kept = r2[r2["pool"] == 1]
    assert not kept["dropped"].any() and len(kept) == 3
    # exactly pool 1's clients were aggregated, and only their bytes count
    row2 = rounds.set_index("round").loc[2]
    assert row2["pool_failures"] == 1 and row2["clients_aggregated"] == len(kept)
    assert sorted(r2.loc[~r2["dropped"], "client_id"]) == sorted(kept["client_id"])
    assert row2["uplink_bytes"] == kept["uplink_bytes"].sum()
    # round 3 trains on the restarted actor, which says its client state was reset
    r3 = clients.query("round == 3")
    assert not r3["dropped"].any()
    assert r3[r3["pool"] == 0]["state_reset"].all()
    assert not r3[r3["pool"] == 1]["state_reset"].any()


@pytest.mark.slow
def test_driver_never_imports_torch(tiny_overrides, tmp_path):
    """torch lives in the actors: a driver that imported it would hold ~330 MB and spend
    seconds importing for nothing (the floor benchmark's memory budget counts it). The
    TensorBoard and MLflow loggers run in the driver, so they are on here."""
    import subprocess
    import sys

    logs = ["log.tensorboard=true", f"log.mlflow_uri='sqlite:///{tmp_path}/mlflow.db'"]
    code = (
        "import sys; from ssdiff_ray import api, config; "
        f"api.run(config.load(None, {[*tiny_overrides, 'rounds=1', 'name=notorch', *logs]!r}), "
        "progress=False); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH"
    assert list((tmp_path / "notorch" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "notorch" / "mlflow_run.json").is_file()
