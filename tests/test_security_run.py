"""A tiny federated run with a malicious client and update screening, on real local Ray."""

import pandas as pd
import pytest

from ssdiff_ray import api, config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_malicious_client_rows_and_attack_metrics(tiny_overrides):
    cfg = config.load(None, [*tiny_overrides, "rounds=2", "name=attack",
                             "attack.kind=baddiffusion", "attack.malicious_fraction=0.2",
                             "attack.poison_rate=0.5", "attack.eval_samples=20",
                             "defense.estimate_trigger=false", "server.screening=krum"])
    s = api.run(cfg, progress=False)
    clients = pd.read_parquet(f"{s['run_dir']}/clients.parquet")
    rounds = pd.read_parquet(f"{s['run_dir']}/rounds.parquet")
    bad = clients[clients["malicious"]]
    assert set(bad["client_id"]) and len(set(bad["client_id"])) == 1  # round(0.2 * 6) = 1
    assert (~clients[~clients["malicious"]]["malicious"]).all()
    # krum keeps k - f updates per round and records why the others were left out
    assert clients["screened"].any()
    assert (clients.loc[clients["drop_reason"] == "screened", "rejected_reason"] != "").all()
    last = rounds.iloc[-1]
    for col in ("asr", "asr_defended", "detect_tpr", "detect_fpr", "fid_defended"):
        assert col in rounds.columns and 0 <= last[col] or col == "fid_defended"
    assert last["fid_defended"] > 0
