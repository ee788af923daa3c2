"""One MLflow run per federated run: the resolved config as params, round metrics with the
round as step, and at the end the run directory's config, summary, ledgers, sample grids
and model as artifacts. A study's trials nest under the study's run (``mlflow_parent_run``).

Any tracking URI MLflow's client opens works: ``sqlite:///PATH`` (no server), a remote
``http(s)://`` server, or the legacy ``file:`` store (MLflow keeps it in maintenance mode;
asking for it by name opts in, as ``MLFLOW_ALLOW_FILE_STORE`` would).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from ssdiff_ray.config import Config
from ssdiff_ray.tracking.base import Tracker

RUN_FILE = "mlflow_run.json"  # in the run directory: which MLflow run a resume continues
ARTIFACTS = ("config.toml", "summary.json", "rounds.parquet", "clients.parquet")


def _client(uri: str):
    # An unreachable server should cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(
        name, artifact_location=_artifact_root(uri))


def study_run(uri: str, experiment: str, study: str, storage_url: str) -> str:
    """The MLflow run of an ``ssdiff tune`` study (made once; a resumed study finds it by
    its study name and storage), under which every trial's run nests."""
    client = _client(uri)
    exp_id = _experiment(client, experiment, uri)
    key = hashlib.sha256(f"{study}\n{storage_url}".encode()).hexdigest()[:32]
    found = client.search_runs([exp_id], filter_string=f"tags.`ssdiff.study_key` = '{key}'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=f"study {study}", tags={
        "ssdiff.study": study, "ssdiff.study_key": key,
        "mlflow.source.name": "ssdiff tune"}).info.run_id


def end_run(uri: str, run_id: str) -> None:
    """Mark a study's run finished."""
    _client(uri).set_terminated(run_id, status="FINISHED")


class MLflowLog(Tracker):
    name = "MLflow"

    def __init__(self, cfg: Config, run_dir: Path, start_round: int = 1):
        uri = cfg.log.mlflow_uri
        self.client = _client(uri)
        self.uri_digest = hashlib.sha256(uri.encode()).hexdigest()
        self.run_id = self._previous_run(run_dir) if start_round > 1 else None
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp_id = _experiment(self.client, cfg.log.mlflow_experiment, uri)
        tags = {"mlflow.source.name": "ssdiff run", "ssdiff.run_dir": run_dir.name}
        if cfg.log.mlflow_parent_run:
            tags["mlflow.parentRunId"] = cfg.log.mlflow_parent_run
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(cfg)
        (run_dir / RUN_FILE).write_text(json.dumps(
            {"run_id": self.run_id, "experiment_id": exp_id, "uri_sha256": self.uri_digest}))

    def _previous_run(self, run_dir: Path) -> str | None:
        """The run a resumed run continues: named in RUN_FILE, on the same tracking URI."""
        try:
            info = json.loads((run_dir / RUN_FILE).read_text())
            run_id = str(info["run_id"])
            if info.get("uri_sha256") != self.uri_digest or not re.fullmatch(r"[0-9a-f]{32}", run_id):
                return None
            self.client.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - no usable record: log to a new run
            return None

    def _log_params(self, cfg: Config) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, round_: int, scalars: dict[str, float], grid_png: Path | None) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now_ms, round_)
                                                    for k, v in scalars.items()])

    def finish(self, run_dir: Path, status: str) -> None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for folder in ("samples", "model"):
            if (run_dir / folder).is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / folder), folder)
        self.client.set_terminated(self.run_id, status=status)


def _flatten(cfg: dict) -> dict[str, str]:
    """``section.key`` -> value as text (the config's top-level dicts are its sections)."""
    out = {}
    for k, v in cfg.items():
        for key, value in (v.items() if isinstance(v, dict) else [(None, v)]):
            name = k if key is None else f"{k}.{key}"
            out[name] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return out


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database file (MLflow's default is
    ./mlruns in whatever folder the run started from); other stores choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None
