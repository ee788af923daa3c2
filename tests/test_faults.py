"""Fault injection through real rounds on a real local Ray: one faulty client is rejected
with its reason, and the global weights equal those of a run where that client never took
part (the same run with it as a predicted straggler: planned, not trained)."""

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from ssdiff_ray import api, codec, config
from ssdiff_ray.devices import make_population

pytestmark = pytest.mark.usefixtures("ray_local")

# all 6 clients in every round, 2 pools (0: clients 0, 2, 4; 1: clients 1, 3, 5), 8-bit
# uploads with error feedback, no EMA: the saved model is the aggregate itself
BASE = ["model.preset=tiny", "model.timesteps=50", "clients.count=6", "clients.per_round=1.0",
        "clients.pools=2", "train.local_steps=2", "train.batch_size=8",
        "train.scale_work_by_device=false", "data.image_size=8", "quant.bits=8",
        "server.ema_decay=0", "rounds=1", "eval.samples=10", "eval.steps=2", "eval.grid=0",
        "eval.baseline=false"]
_REFERENCE: dict = {}


def _run(tmp_path, name, extra, **kw):
    cfg = config.load(None, [*BASE, f"out_dir={tmp_path}", f"name={name}", *extra])
    s = api.run(cfg, progress=False, **kw)
    run_dir = s["run_dir"]
    clients = pd.read_parquet(f"{run_dir}/clients.parquet").set_index("client_id")
    rounds = pd.read_parquet(f"{run_dir}/rounds.parquet")
    weights = load_file(f"{run_dir}/model/unet/diffusion_pytorch_model.safetensors")
    return clients, rounds.iloc[0], weights


def _straggler_profiles(path, client: int) -> str:
    """The default population, but ``client``'s compute is so slow that any finite deadline
    makes it a predicted straggler."""
    pop = make_population(6, 0)
    pop.loc[client, "flops_per_cycle"] = 1e-12
    pop.reset_index().to_parquet(path)
    return str(path)


def reference(tmp_path_factory, client: int):
    """The run without ``client`` (a straggler under a deadline), computed once."""
    if client not in _REFERENCE:
        tmp = tmp_path_factory.mktemp(f"ref{client}")
        profiles = _straggler_profiles(tmp / "devices.parquet", client)
        _REFERENCE[client] = _run(tmp, "ref", [f"devices.profiles={profiles}",
                                               "devices.deadline_s=1e6"])
    return _REFERENCE[client]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _honest_rows_unchanged(clients, ref_clients, faulty: int) -> None:
    cols = ["loss", "update_norm", "uplink_bytes", "sent_bits", "dropped", "rejected_reason"]
    honest = [c for c in clients.index if c != faulty]
    pd.testing.assert_frame_equal(clients.loc[honest, cols], ref_clients.loc[honest, cols])


@pytest.mark.parametrize("fault,reason,sent_bits,bytes_delta", [
    ("nan", "non_finite", 0, None),
    ("inf", "non_finite", 0, None),
    ("wrong_bits", "bits_mismatch", 32, "32bit"),
    ("truncate", "truncated", 8, -8),
    ("oversize", "oversized", 8, +16),
])
def test_one_faulty_payload_is_rejected_alone(tmp_path, tmp_path_factory, fault, reason,
                                              sent_bits, bytes_delta):
    k = 3  # pool 1, in the same chunk as clients 1 and 5
    ref_clients, ref_round, ref_weights = reference(tmp_path_factory, k)
    clients, row, weights = _run(tmp_path, fault, [f"faults.inject={{ {k} = \"{fault}\" }}"])
    bad = clients.loc[k]
    assert bad["dropped"] and bad["drop_reason"] == "rejected"
    assert bad["rejected_reason"] == reason and bad["sent_bits"] == sent_bits
    size8 = int(ref_clients.loc[1, "uplink_bytes"])
    n_params = sum(v.size for v in weights.values())
    assert size8 == codec.encoded_size(n_params, 8, 256)
    expected = {None: 0, "32bit": codec.encoded_size(n_params, 32, 256)}.get(
        bytes_delta, size8 + (bytes_delta if isinstance(bytes_delta, int) else 0))
    assert bad["uplink_bytes"] == expected  # the ledger says what was really sent
    assert row["clients_aggregated"] == 5 == ref_round["clients_aggregated"]
    assert row["uplink_bytes"] == ref_round["uplink_bytes"] == 5 * size8
    _honest_rows_unchanged(clients, ref_clients, k)
    assert _same_weights(weights, ref_weights)


def test_client_past_the_deadline_is_planned_not_trained(tmp_path_factory):
    """The reference run itself: the straggler costs energy but no training, bytes or time."""
    clients, row, _ = reference(tmp_path_factory, 3)
    s = clients.loc[3]
    assert s["straggler"] and s["drop_reason"] == "straggler" and np.isnan(s["loss"])
    assert s["uplink_bytes"] == 0 and s["sent_bits"] == 0 and s["energy_j"] > 0
    assert row["stragglers"] == 1 and row["clients_aggregated"] == 5
    assert row["energy_j"] == pytest.approx(clients["energy_j"].sum())
    others = clients.drop(index=3)
    assert row["latency_s"] == pytest.approx(others["compute_s"].add(others["upload_s"])
                                             .add(others["download_s"]).max())
    assert row["uplink_bytes"] == others["uplink_bytes"].sum()


def test_client_past_the_round_timeout_is_left_out(tmp_path, tmp_path_factory, monkeypatch):
    """A slow client (the last of its pool, its own chunk) misses round_timeout_s: it is
    labelled timeout and the round aggregates the others, as if it never took part."""
    from ssdiff_ray.driver import federation

    monkeypatch.setattr(federation, "CHUNK_BYTES", 1)  # one client per call
    k = 5
    ref_clients, ref_round, ref_weights = reference(tmp_path_factory, k)
    clients, row, weights = _run(tmp_path, "slow", [f"faults.inject={{ {k} = \"slow:15\" }}",
                                                    "server.round_timeout_s=8"])
    assert clients.loc[k, "drop_reason"] == "timeout" and np.isnan(clients.loc[k, "loss"])
    assert not clients.drop(index=k)["dropped"].any()
    assert row["clients_aggregated"] == 5 and row["uplink_bytes"] == ref_round["uplink_bytes"]
    _honest_rows_unchanged(clients, ref_clients, k)
    assert _same_weights(weights, ref_weights)


def test_timed_out_call_is_cancelled_and_the_next_round_does_not_wait(tmp_path, monkeypatch):
    """Client 5, the last of pool 1 (1, 3, 5), sleeps 30 s every round against an 8 s round
    timeout. Its call is cancelled at the timeout, so in round 2 clients 1 and 3 train on
    time; without the cancel, pool 1 would sleep on into round 2 and they would time out."""
    from ssdiff_ray.driver import federation

    monkeypatch.setattr(federation, "CHUNK_BYTES", 1)  # one client per call
    cfg = config.load(None, [*BASE, f"out_dir={tmp_path}", "name=cancel", "rounds=2",
                             'faults.inject={ 5 = "slow:30" }', "server.round_timeout_s=8"])
    s = api.run(cfg, progress=False)
    clients = pd.read_parquet(f"{s['run_dir']}/clients.parquet")
    for r in (1, 2):
        dropped = clients[(clients["round"] == r) & clients["dropped"]]
        assert dropped["client_id"].tolist() == [5], (r, dropped)
        assert (dropped["drop_reason"] == "timeout").all()
