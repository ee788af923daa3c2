"""ssdiff tune: search-space validation, studies on SQLite and a real PostgreSQL server,
resume after the study process is killed, pruning on per-round values."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import TINY

from ssdiff_ray import cli, config
from ssdiff_ray.config import ConfigError
from tuning.space import load_space, overrides, parse_space
from tuning.storage import open_storage
from tuning.study import TuneOptions, open_study, run_study, setup_study


def storage_url(url: str):
    """What optuna.load_study takes for one of ``ssdiff tune``'s storage URLs."""
    return open_storage(url) if url.startswith("journal:") else url

# One pool per trial run: the studies are what is tested, and each actor process costs
# seconds of start-up (torch, diffusers) on a 2-core CI.
BASE = [*TINY, "clients.pools=1", "rounds=1", "eval.samples=20", "eval.grid=0"]
SPACE = """
[params]
"quant.policy" = { choices = ["fixed", "time_adaptive"] }
"quant.bits" = { choices = [4, 8] }
"devices.cpu_scale" = { low = 0.3, high = 1.0 }
"""


def _space(tmp_path, text=SPACE) -> str:
    p = tmp_path / "space.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("entry, needle", [
    ('"quant.bitz" = { choices = [4] }', "quant.bitz"),
    ('"quant.bits" = { choices = [3.5] }', "quant.bits"),
    ('"quant.bits" = { choices = [5, 9] }', "quant.bits"),
    ('"quant.policy" = { choices = ["fixd"] }', "quant.policy"),
    ('"clients.per_round" = { low = 0.1, high = 2.0 }', "clients.per_round"),
    ('"quant.error_feedback" = { low = 0, high = 1 }', "quant.error_feedback"),
    ('"train.local_steps" = { low = 1.5, high = 4 }', "train.local_steps"),
    ('"server.lr" = { low = 2.0, high = 1.0 }', "server.lr"),
    ('"server.lr" = { lo = 0.5, high = 1.0 }', "server.lr"),
    ('"devices.class_mix" = { choices = [1] }', "devices.class_mix"),
    ('"nosection.key" = { choices = [1] }', "nosection.key"),
    ('"out_dir" = { choices = ["a"] }', "out_dir"),
])
def test_bad_space_entry_names_it(entry, needle):
    with pytest.raises(ConfigError) as e:
        parse_space({"params": dict([_one(entry)])})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def _one(entry: str):
    import tomllib

    (k, v), = tomllib.loads(entry).items()
    return k, v


def test_default_space_is_valid_and_overrides_load():
    space = load_space()
    assert {"quant.policy", "quant.block_size", "quant.error_feedback", "clients.per_round",
            "train.local_steps", "devices.deadline_s", "devices.tx_power_cap_w",
            "devices.cpu_scale", "server.lr"} <= set(space.names)
    trial = optuna.trial.FixedTrial({p.name: (p.choices[-1] if p.kind == "categorical" else p.high)
                                     for p in space.params})
    params = space.suggest(trial)
    cfg = config.load(None, overrides(params))
    assert cfg.quant.policy == "energy_optimal" and cfg.server.lr == 2.0


def test_cli_rejects_bad_space_before_anything_starts(tmp_path, capsys):
    bad = _space(tmp_path, '[params]\n"quant.bits" = { choices = ["eight"] }\n')
    out = tmp_path / "study"
    rc = cli.main(["tune", "--space", bad, "--out", str(out), "--trials", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("ssdiff: error:") and "quant.bits" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()   # no storage, no trial
    rc = cli.main(["tune", "--objectives", "energy,asr", "--out", str(out)])
    assert rc == 2 and "asr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="quant.bits"):
        setup_study(TuneOptions(space=_space(tmp_path), reference=["quant.bits=6"]))


@pytest.mark.parametrize("given, message", [
    ({"sampler": "cmaes"}, "--sampler 'cmaes': must be tpe, nsga2 or random"),
    ({"pruner": "sha"}, "--pruner 'sha': must be auto, median, hyperband or none"),
    ({"pruner": "hyperband"}, "--pruner hyperband: pruning needs a single objective (--objectives energy)"),
])
def test_bad_sampler_or_pruner_names_the_choices(given, message):
    with pytest.raises(ConfigError) as e:
        setup_study(TuneOptions(**given))
    assert str(e.value) == message


def test_auto_pruner_is_median_for_one_objective_and_none_for_several():
    assert setup_study(TuneOptions(objectives=["fid"])).pruner == "median"
    assert setup_study(TuneOptions()).pruner == "none"


def _study_checks(res: dict, out: Path, storage: str, n: int) -> None:
    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == n, states
    df = pd.read_parquet(out / "trials.parquet")
    assert {"energy", "fid", "param.quant.policy", "param.devices.cpu_scale", "run_dir"} <= set(df.columns)
    assert (df[df.state == "COMPLETE"]["energy"] > 0).all()
    ref = df[df["reference"]]
    assert len(ref) == 1 and ref.iloc[0]["param.quant.bits"] == 8 \
        and ref.iloc[0]["param.quant.policy"] == "fixed"
    front = pd.read_parquet(out / "pareto.parquet")
    assert 1 <= len(front) <= n
    assert (out / "pareto.png").is_file() and (out / "best.toml").is_file()
    # Every exported config is the trial's resolved config, ready for `ssdiff run`.
    for p in res["configs"]:
        num = int(Path(p).stem.split("_")[1])
        t = study.trials[num]
        exported = config.load(p).to_dict()
        ran = config.load(Path(t.user_attrs["run_dir"]) / "config.toml").to_dict()
        for d in (exported, ran):  # where it ran, and what the run read from its data
            d.update(out_dir="", name="")
            d["data"].update(channels=0, num_classes=0)
        assert exported == ran
        assert exported["quant"]["policy"] == t.params["quant.policy"]


@pytest.mark.slow
def test_three_trials_on_sqlite(ray_local, tmp_path):
    out = tmp_path / "tune"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    opts = TuneOptions(overrides=BASE, space=_space(tmp_path), trials=3, parallel=2, storage=storage,
                       study="s", out=str(out), reference=["quant.policy=fixed", "quant.bits=8"],
                       startup_trials=2, confirm_seeds=1)
    res = run_study(opts, progress=False)
    assert res["complete"] == 3 and res["failed"] == 0
    _study_checks(res, out, storage, 3)
    _confirm_checks(res, out, storage, 1)
    # Rerunning with a second confirmation seed runs only that seed's runs; the search
    # itself does no more work.
    opts.confirm_seeds = 2
    res2 = run_study(opts, progress=False)
    assert res2["trials"] == 3
    _confirm_checks(res2, out, storage, 2)


def _confirm_checks(res, out, storage, seeds: int):
    """The reference and each front member ran again on ``seeds`` fresh seeds, each run its
    own seed's (data split, sampling, init: other figures than the search's)."""
    from tuning.confirm import verdict

    c = res["confirmed"]
    members = c["members"]
    assert members[0]["reference"] and {m["number"] for m in members[1:]} <= {
        f["number"] for f in res["front"]}
    conf = optuna.load_study(study_name="s:confirm", storage=storage).trials
    assert len(conf) == seeds * len(members)  # no run repeated, none missing
    assert all(t.state.name == "COMPLETE" for t in conf)
    base = config.load(None, BASE).seed
    for m in members:
        assert m["seeds"] == [base + 1000 * (k + 1) for k in range(seeds)]
        fid = m["objectives"]["fid"]
        assert len(fid["values"]) == seeds and fid["values"][0] != m["search"]["fid"]
        if seeds >= 2:
            assert fid["low"] <= fid["mean"] <= fid["high"]
            if not m["reference"]:
                assert set(m["per_objective"]) == {"energy", "fid"}
                assert m["verdict"] == verdict(m["per_objective"])
    ran = {config.load(Path(t.user_attrs["run_dir"]) / "config.toml", []).seed for t in conf}
    assert ran == set(members[0]["seeds"])
    text = (out / "report.md").read_text()
    assert f"on {seeds} fresh seeds" in text and all(f"| #{m['number']} |" in text for m in members)
    if seeds >= 2:
        assert (out / "pareto_confirmed.png").stat().st_size > 1000


def _pg_binaries() -> tuple[str, str] | None:
    for name in ("initdb",):
        found = shutil.which(name)
        if found:
            d = Path(found).parent
            return str(d / "initdb"), str(d / "pg_ctl")
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if cands:
        return cands[-1], str(Path(cands[-1]).with_name("pg_ctl"))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A real PostgreSQL server on loopback in a temp dir, stopped afterwards."""
    import tempfile

    bins = _pg_binaries()
    if bins is None:
        why = "no PostgreSQL server binaries (initdb/pg_ctl) on PATH or in /usr/lib/postgresql"
        if os.environ.get("SSDIFF_REQUIRE_POSTGRES"):  # CI installs them: never skip there
            pytest.fail(why)
        pytest.skip(why)
    initdb, pg_ctl = bins
    # Directly under the system temp dir: pytest's own is private to the current user.
    root = Path(tempfile.mkdtemp(prefix="ssdiff-pg-"))
    data = root / "data"
    # initdb refuses to run as root: run the server as an unprivileged user then.
    as_user: list[str] = []
    if os.getuid() == 0:
        as_user = ["runuser", "-u", "nobody", "--"]
        shutil.chown(root, "nobody")
        os.chmod(root, 0o700)
    port = _free_port()
    r = subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", opts,
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_trials_on_postgres(ray_local, tmp_path, postgres):
    # Two trials in one parallel wave, then a third on resume: the storage is what is tested
    # here (the SQLite test covers a study of several waves).
    out = tmp_path / "tune"
    opts = TuneOptions(overrides=BASE, space=_space(tmp_path), trials=2, parallel=2, storage=postgres,
                       confirm_seeds=0,
                       study="s", out=str(out), reference=["quant.policy=fixed", "quant.bits=8"],
                       startup_trials=2)
    res = run_study(opts, progress=False)
    assert res["complete"] == 2 and res["storage"].startswith("postgresql")
    _study_checks(res, out, postgres, 2)
    _resume_adds_trials(opts, postgres, 2)


def _resume_adds_trials(opts: TuneOptions, storage: str, done: int) -> None:
    """The same study, asked for one trial more, keeps what it has and runs one (which
    may finish complete or pruned)."""
    def finished():
        return {t.number: t.values for t in optuna.load_study(study_name="s", storage=storage)
                .get_trials() if t.state.name in ("COMPLETE", "PRUNED")}

    before = finished()
    opts.trials = done + 1
    res = run_study(opts, progress=False)
    after = finished()
    assert res["complete"] + res["pruned"] == done + 1 == len(after) and res["failed"] == 0
    assert all(after[k] == v for k, v in before.items())


@pytest.mark.slow
def test_journal_storage_resumes_and_records_constraints(ray_local, tmp_path):
    """--constraint: a bound no trial meets makes every trial infeasible, recorded in the
    study and in trials.parquet; with the journal storage, a resumed study keeps them."""
    out = tmp_path / "tune"
    storage = f"journal:///{tmp_path / 'study.log'}"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs = ["log.tensorboard=true", f"log.mlflow_uri='{mlflow_uri}'"]
    opts = TuneOptions(overrides=[*BASE, *logs], space=_space(tmp_path), trials=2, parallel=1,
                       confirm_seeds=0,
                       storage=storage, study="s", out=str(out), objectives=["energy"],
                       constraints=["energy<=1e-9"], sampler="random")
    res = run_study(opts, progress=False)
    assert res["complete"] == 2
    _mlflow_trials(mlflow_uri, out, storage_url(storage))
    study = optuna.load_study(study_name="s", storage=storage_url(storage))
    for t in study.get_trials():
        assert t.constraints == {"energy<=1e-09": pytest.approx(t.values[0] - 1e-9)}
    df = pd.read_parquet(out / "trials.parquet")
    assert not df["feasible"].any() and "best" not in res  # nothing feasible to export
    _resume_adds_trials(opts, storage_url(storage), 2)
    _mlflow_trials(mlflow_uri, out, storage_url(storage))  # the resumed study found its run


def _mlflow_trials(uri: str, out: Path, storage: str) -> None:
    """One MLflow run for the study and every trial a run nested under it: complete trials
    FINISHED with their round metrics, pruned ones KILLED; a TensorBoard folder per trial."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ssdiff").experiment_id])
    studies = [r for r in runs if r.data.tags.get("ssdiff.study") == "s"]
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == studies[0].info.run_id]
    assert len(trials) == len(runs) - 1
    state = {f"t{t.number:04d}": t.state.name
             for t in optuna.load_study(study_name="s", storage=storage).get_trials()}
    assert {r.info.run_name: r.info.status for r in trials} == {
        name: {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[s] for name, s in state.items()}
    assert all("round/energy_j" in r.data.metrics for r in trials)
    assert sorted(state) == sorted(p.name for p in (out / "trials").iterdir() if (p / "tb").is_dir())


def _trial_states(db: Path) -> list[str]:
    """Trial states read straight from the SQLite file, read-only: optuna.load_study would
    create the schema itself and race the study process doing the same."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return [r[0] for r in con.execute("select state from trials")]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or being written
        return []


@pytest.mark.slow
def test_resume_after_killing_the_study_process(tmp_path):
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    cmd = [sys.executable, "-m", "ssdiff_ray.cli", "tune", "--space", _space(tmp_path),
           "--trials", "2", "--parallel", "1", "--storage", storage, "--study", "s",
           "--out", str(tmp_path / "tune"), "--quiet", "--startup-trials", "2",
           "--confirm-seeds", "0", *[a for s in [*BASE, "rounds=2"] for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1.0)
            states = _trial_states(db)
            if states.count("COMPLETE") >= 1 and "RUNNING" in states:
                time.sleep(3)  # inside the second run
                os.killpg(proc.pid, signal.SIGKILL)
                killed = next(t for t in optuna.load_study(study_name="s", storage=storage)
                              .get_trials() if t.state.name == "RUNNING")
                break
    finally:
        if proc.poll() is None and killed is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed is not None, proc.stderr.read().decode()[-2000:]
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).get_trials()]
    assert states.count("RUNNING") == 1 and states.count("COMPLETE") < 2
    # The same command resumes: the interrupted trial fails and is retried.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "interrupted" in r.stdout
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1 and "RUNNING" not in states
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert failed.number == killed.number and "interrupted" in failed.user_attrs["error"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params


@pytest.mark.slow
def test_bad_intermediate_values_are_pruned(ray_local, tmp_path):
    space = _space(tmp_path, '[params]\n"train.local_steps" = { choices = [1, 6] }\n')
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    opts = TuneOptions(overrides=[*BASE, "rounds=2", "eval.every=1"], space=space, trials=2,
                       confirm_seeds=0,
                       parallel=1, storage=storage, study="s", out=str(tmp_path / "tune"),
                       objectives=["energy"], pruner="median", pruner_startup=1, sampler="random")
    study = open_study(setup_study(opts), open_storage(storage))
    # A cheap trial first, then one whose energy after round 1 is far above it.
    study.enqueue_trial({"train.local_steps": 1})
    study.enqueue_trial({"train.local_steps": 6})
    res = run_study(opts, progress=False)
    assert res["complete"] == 1 and res["pruned"] == 1
    good, bad = optuna.load_study(study_name="s", storage=storage).trials
    assert good.state.name == "COMPLETE" and sorted(good.intermediate_values) == [1, 2]
    assert bad.state.name == "PRUNED" and sorted(bad.intermediate_values) == [1]
    assert bad.intermediate_values[1] > good.intermediate_values[1]
    assert len(bad.user_attrs["rounds"]) == 1   # the run stopped after round 1
    assert res["best"]["number"] == good.number


def _frozen(values, **attrs):
    from optuna.distributions import CategoricalDistribution

    return optuna.trial.create_trial(values=values, params={"quant.bits": 8},
                                     distributions={"quant.bits": CategoricalDistribution([4, 8])},
                                     user_attrs=attrs)


def test_confirmation_verdicts_come_from_paired_intervals():
    """summarize on real Optuna studies: a member better than the reference on energy on
    every seed and level on fid dominates; one whose fid difference straddles 0 on energy
    too ties; one worse on fid on every seed is worse; intervals bracket the means."""
    from tuning import confirm

    search = optuna.create_study(directions=["minimize", "minimize"])
    search.add_trials([_frozen([100.0, 50.0], reference=True), _frozen([70.0, 50.0]),
                       _frozen([100.0, 49.0]), _frozen([60.0, 60.0])])
    conf = optuna.create_study(directions=["minimize", "minimize"])
    seeds = [1000, 2000, 3000]
    runs = {0: [(100, 50), (104, 53), (98, 49)],
            1: [(70, 50.5), (75, 52.5), (68, 49.5)],   # energy -30 on every seed, fid ~level
            2: [(101, 51), (103, 52), (99, 50)],       # within noise on both
            3: [(60, 58), (64, 61), (59, 57)]}         # fid +8 on every seed, energy -40
    for of, vals in runs.items():
        conf.add_trials([_frozen(list(v), confirm_of=of, confirm_seed=s)
                         for v, s in zip(vals, seeds)])
    s = confirm.summarize(search, conf, ["energy", "fid"])
    by = {r["number"]: r for r in s["members"]}
    assert by[0]["reference"] and "verdict" not in by[0]
    for r in s["members"]:
        for o in ("energy", "fid"):
            x = r["objectives"][o]
            assert x["low"] < x["mean"] < x["high"] and len(x["values"]) == 3
    assert sorted(by) == [0, 1, 2, 3]  # the reference and the search's front (#1, #2, #3)
    assert by[1]["per_objective"] == {"energy": "better", "fid": "tie"}
    assert by[1]["verdict"] == "dominates"
    assert by[2]["verdict"] == "ties", by[2]
    assert by[3]["per_objective"] == {"energy": "better", "fid": "worse"}
    assert by[3]["verdict"] == "trade-off"
    assert confirm.best_confirmed(s, ["energy", "fid"])["number"] == 1
    z = s["noise"]["energy"]
    assert z["seed_sd"] == pytest.approx(np.std([100, 104, 98], ddof=1))
    assert z["trial_spread"] == 40.0 and z["spread_over_noise"] == pytest.approx(40 / z["seed_sd"])
