"""The round planner (selection, power cap, CPU scale), the ledger's energy against the
energy model, the energy-optimal policy end to end, and the quantized downlink."""

import numpy as np
import pandas as pd
import pytest

from ssdiff_ray import codec, config, energy
from ssdiff_ray.planner import RoundPlanner
from ssdiff_ray.run_dir import prepare


def _planner(tmp_path, *sets, pools=3):
    cfg = config.load(None, ["clients.count=30", "clients.per_round=0.5", "data.image_size=8",
                             f"out_dir={tmp_path}", "name=p", *sets])
    prep = prepare(cfg)
    return RoundPlanner(prep.cfg, prep, num_params=50_000, flops_per_sample_step=1e6,
                        num_pools=pools), prep


def test_selection_is_stratified_over_pools_and_seeded(tmp_path):
    planner, _ = _planner(tmp_path)
    for r in (1, 2, 3):
        ids = planner.select(r)
        assert len(ids) == 15 and len(np.unique(ids)) == 15 and (ids < 30).all()
        per_pool = np.bincount(ids % 3, minlength=3)
        assert per_pool.max() - per_pool.min() <= 1  # no pool idles while another works
        assert np.array_equal(ids, planner.select(r))
    assert not np.array_equal(planner.select(1), planner.select(2))


def test_power_cap_and_cpu_scale_reach_the_plan(tmp_path):
    planner, prep = _planner(tmp_path, "devices.tx_power_cap_w=0.05", "devices.cpu_scale=0.5")
    plan = planner.plan(1)
    prof = prep.population.iloc[plan.client_ids]
    assert (plan.tx_power_w <= 0.05 + 1e-12).all()
    assert np.allclose(plan.tx_power_w, np.minimum(prof["tx_power_w_max"], 0.05))
    want = np.maximum(prof["cpu_hz_min"].to_numpy(), 0.5 * prof["cpu_hz_max"].to_numpy())
    assert np.allclose(plan.cpu_hz, want)
    # the costs are the energy model's for that power and frequency
    steps = prep.local_steps[plan.client_ids]
    flops = 1e6 * np.minimum(32, prep.num_samples[plan.client_ids]) * steps
    assert np.allclose(plan.costs["compute_energy_j"],
                       energy.compute_energy_j(prof, flops, plan.cpu_hz))


RUN = ["model.preset=tiny", "model.timesteps=50", "clients.count=8", "clients.per_round=0.5",
       "clients.pools=2", "train.local_steps=2", "train.batch_size=8", "data.image_size=8",
       "eval.samples=10", "eval.steps=2", "eval.grid=0", "eval.baseline=false", "rounds=3"]


def _run(tmp_path, name, *sets):
    from ssdiff_ray import api

    cfg = config.load(None, [*RUN, f"out_dir={tmp_path}", f"name={name}", *sets])
    s = api.run(cfg, progress=False)
    return s, pd.read_parquet(f"{s['run_dir']}/clients.parquet")


@pytest.mark.usefixtures("ray_local")
def test_ledger_energy_is_the_energy_models_figure_for_what_was_recorded(tmp_path):
    from ssdiff_ray.model.unet import flops_per_sample_step, unet_for

    s, c = _run(tmp_path, "energy", "quant.bits=4", "devices.tx_power_cap_w=0.1",
                "devices.cpu_scale=0.7")
    cfg = config.load(f"{s['run_dir']}/config.toml")
    prof = pd.read_parquet(f"{s['run_dir']}/devices.parquet").iloc[c["client_id"]]
    flops = flops_per_sample_step(unet_for(cfg)) * np.minimum(8, c["num_samples"]) * c["local_steps"]
    assert (c["tx_power_w"] <= 0.1 + 1e-12).all()
    np.testing.assert_allclose(c["compute_energy_j"],
                               energy.compute_energy_j(prof, flops.to_numpy(), c["cpu_hz"]),
                               rtol=1e-9)
    sent = codec.encoded_size(s["num_params"], 4, 256)
    assert (c["uplink_bytes"] == sent).all() and (c["sent_bits"] == 4).all()
    np.testing.assert_allclose(c["upload_energy_j"], c["tx_power_w"] * sent * 8 / c["rate_bps"],
                               rtol=1e-9)
    np.testing.assert_allclose(c["energy_j"], c["compute_energy_j"] + c["upload_energy_j"]
                               + c["download_energy_j"], rtol=1e-12)


@pytest.mark.usefixtures("ray_local")
def test_energy_optimal_spends_no_more_than_fixed_bits_end_to_end(tmp_path):
    """Same seed, same selected clients: the energy-optimal policy (variance no worse than
    fixed 8 bits) against fixed 8 bits at full power and clock, both under a deadline."""
    common = ["devices.deadline_s=60", "quant.ref_bits=8"]
    _, fixed = _run(tmp_path, "fixed", *common, "quant.policy=fixed", "quant.bits=8")
    _, opt = _run(tmp_path, "opt", *common, "quant.policy=energy_optimal")
    assert (fixed["client_id"].to_numpy() == opt["client_id"].to_numpy()).all()
    assert opt["energy_j"].sum() <= fixed["energy_j"].sum()
    assert (opt["compute_s"] + opt["upload_s"] + opt["download_s"] <= 60 + 1e-6).all()


def test_quantized_downlink_carries_its_rounding_error_forward(tmp_path):
    """Each broadcast is an 8-bit quantization of weights - what the clients hold; the
    clients' copy is their previous one plus the decoded payload."""
    from actors.parameter_server import ParameterServer

    cfg = config.load(None, ["model.preset=tiny", "data.image_size=8", "quant.downlink_bits=8",
                             "quant.block_size=64", "data.channels=1"])
    server = ParameterServer(cfg, 1)
    rng = np.random.default_rng(0)
    view, nbytes = server.broadcast(1)
    assert nbytes == codec.encoded_size(server.num_params, 8, 64) and np.allclose(view, server.weights)
    for r in range(2, 7):
        before = view.copy()
        server.weights = (server.weights + rng.normal(scale=1e-2, size=server.num_params)
                          ).astype(np.float32)
        x = server.weights - before
        view, _ = server.broadcast(r)
        sent = view - before  # what the payload decoded to
        padded = np.pad(np.abs(x), (0, -len(x) % 64))
        step = np.repeat(padded.reshape(-1, 64).max(1) * 2 / 255, 64)[:len(x)]  # 8-bit grid
        assert (np.abs(sent - x) <= step * (1 + 1e-5)).all()  # one grid step at most
        assert np.linalg.norm(server.weights - view) < 0.05 * np.linalg.norm(x)
    restored = ParameterServer(cfg, 1)
    restored.load_state_dict(server.state_dict())
    assert np.array_equal(restored.client_view, view)


@pytest.mark.usefixtures("ray_local")
def test_quantized_downlink_bytes_in_the_ledger(tmp_path):
    s, c = _run(tmp_path, "down", "quant.downlink_bits=8")
    rounds = pd.read_parquet(f"{s['run_dir']}/rounds.parquet")
    per_client = codec.encoded_size(s["num_params"], 8, 256)
    assert (c["downlink_bytes"] == per_client).all()
    assert (rounds["downlink_bytes"] == per_client * (rounds["clients_selected"]
                                                      - rounds["stragglers"])).all()
