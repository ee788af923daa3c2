"""A tiny federated run with a malicious client and update screening, on real local Ray."""

import pandas as pd
import pytest

from ssdiff_ray import api, config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_malicious_client_rows_and_attack_metrics(tiny_overrides):
    cfg = config.load(None, [*tiny_overrides, "rounds=2", "name=attack", "clients.pools=1",
                             "attack.kind=baddiffusion", "attack.malicious_fraction=0.2",
                             "attack.poison_rate=0.5", "attack.eval_samples=20",
                             "defense.estimate_trigger=false", "server.aggregator=multi_krum",
                             "log.tensorboard=true"])
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
    # the model-free test alone (no estimate in this run) catches most box-triggered noise
    # at 16 x 16 (measured 0.8 of 20), and clean noise near the 1% target (20 draws: <= 2)
    assert last["detect_tpr"] >= 0.5 and last["detect_fpr"] <= 0.1, last
    assert last["asr_defended"] <= last["asr"] and last["fid_defended"] > 0, last
    # TensorBoard shows the attack's figures too (test_tracking reads the others)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(f"{s['run_dir']}/tb")
    ea.Reload()
    for k in ("asr", "asr_defended", "detect_tpr"):
        assert [e.value for e in ea.Scalars(f"eval/{k}")] == pytest.approx([last[k]]), k

    # ssdiff sample / ssdiff audit on the saved model
    from pathlib import Path

    from ssdiff_ray.inference import audit_run, sample_run

    out = sample_run(s["run_dir"], n=12, trigger="box")
    rec = pd.read_parquet(out["record"])
    assert Path(out["png"]).is_file() and len(rec) == 12 and out["flagged"] == rec["flagged"].sum()
    # the same trigger through ssdiff sample, the model-free test alone: measured 7 of 12
    assert out["flagged"] >= 4
    # this run's config has defense.estimate_trigger = false: no LLR, no target check
    assert "disdet_score" in rec.columns and rec["disdet_score"].notna().all()
    assert "llr_score" not in rec.columns and "target_score" not in rec.columns
    plain = sample_run(s["run_dir"], n=12, trigger="box", defend=False)
    assert plain["flagged"] == 0 and not plain["defended"]
    audit = audit_run(s["run_dir"])
    # two tiny rounds plant no backdoor (ASR measured above): the audit must say clean
    assert last["asr"] < 0.5 and audit["verdict"] == "clean" and 0 < audit["spread_ratio"], audit
    assert (Path(s["run_dir"]) / "audit.json").is_file()


def test_security_benchmark_quick(tmp_path):
    """benchmarks/security.py --quick trains tiny models and writes the table's files."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import security as bench

    out = tmp_path / "sec"
    # Two scenarios (CI time): an attack with the sampling defense, one with a screening rule.
    res = bench.main(["--quick", "--scenarios", "baddiffusion,baddiffusion+krum",
                      "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    rows = {r["scenario"]: r for r in res["rows"]}
    assert set(rows) == {"baddiffusion", "baddiffusion+krum"}
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == 2 and "| baddiffusion |" in out.with_suffix(".md").read_text()
    bd = rows["baddiffusion"]
    for k in ("asr", "asr_defended", "detect_tpr", "detect_fpr", "detect_auroc", "fid",
              "fid_defended", "audit", "cos_tau_trigger"):
        assert k in bd
    # the quick models are barely trained: whether the backdoor took, the audit agrees with
    # the ASR measured beside it; the defense never raises the ASR; FPR near its 1% target
    assert bd["audit"] == ("backdoored" if bd["asr"] >= 0.5 else "clean"), bd
    assert bd["asr_defended"] <= bd["asr"] and bd["detect_fpr"] <= 0.05, bd
    assert not rows["baddiffusion+krum"]["sampling_defense"]
    assert "asr_defended" not in rows["baddiffusion+krum"]
