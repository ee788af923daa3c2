"""Ray jobs from the command line: ``ssdiff submit`` / ``jobs`` / ``stop``.

Driver-side Ray code; the CLI imports it lazily, so the core never loads Ray.
Every error a user can cause (an address nobody answers at, an unknown job, a runtime-env
file that is not YAML) is raised as ``UserError`` with one line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from ssdiff_ray.errors import UserError

SUBMITTABLE = ("run", "tune", "stress", "distill", "distill-eval", "distill-scan")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working directory: results, environments, caches.
EXCLUDES = [".git", ".venv", "venv", "runs", "studies", "benchmarks/results", "__pycache__",
            "*.egg-info", "*.parquet", "*.pkl", "*.db", "*.png"]
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


def job_address(address: str | None) -> str:
    """``--address``, else RAY_JOB_ADDRESS / RAY_ADDRESS when they are HTTP, else localhost."""
    if address:
        return address
    for var in ("RAY_JOB_ADDRESS", "RAY_ADDRESS"):
        v = os.environ.get(var, "")
        if v.startswith(("http://", "https://")):
            return v
    return DEFAULT_ADDRESS


def auth_token() -> str | None:
    """The cluster's token where Ray keeps it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH
    names, or ~/.ray/auth_token (written by `ray start` / `ray get-auth-token --generate`)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(address: str | None):
    """A Jobs API client that sends the cluster's token when one is available: Ray's own
    client sends it only where RAY_AUTH_MODE=token is set in this process too."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = job_address(address)
    if not addr.startswith(("http://", "https://")):
        raise UserError(f"--address {addr!r}: the Jobs API needs the dashboard URL, "
                       "e.g. http://HEAD:8265")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return _Authenticated(JobSubmissionClient(addr, headers=headers), addr, token)
    except AuthenticationError:
        raise UserError(_auth_message(addr, token)) from None
    except (ConnectionError, ValueError, RuntimeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot reach the Ray Jobs API at {addr}: {first} "
                       "(is the cluster up and its dashboard port open?)") from None


def _auth_message(addr: str, token: str | None) -> str:
    if token:
        return (f"the Ray cluster at {addr} refused this machine's token (RAY_AUTH_TOKEN or "
                "~/.ray/auth_token): use the head node's (`ray get-auth-token` there prints it)")
    return (f"the Ray cluster at {addr} requires a token: set RAY_AUTH_TOKEN or put it in "
            "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")


class _Authenticated:
    """The Jobs client, whose calls turn a refused token into one UserError line."""

    def __init__(self, c, addr: str, token: str | None):
        self._c, self._addr, self._token = c, addr, token

    def __getattr__(self, name):
        from ray.exceptions import AuthenticationError

        attr = getattr(self._c, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            try:
                return attr(*a, **kw)
            except AuthenticationError:
                raise UserError(_auth_message(self._addr, self._token)) from None
        return call


def runtime_env(working_dir: str | None, env_file: str | None, pip: list[str]) -> dict:
    """The job's runtime_env: a YAML file, plus the working directory and pip packages."""
    env: dict = {}
    if env_file:
        import yaml

        p = Path(env_file)
        if not p.is_file():
            raise UserError(f"--runtime-env {p}: no such file")
        try:
            env = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--runtime-env {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(env, dict):
            raise UserError(f"--runtime-env {p}: must be a mapping (working_dir, pip, env_vars, ...)")
    if working_dir:
        d = Path(working_dir)
        if not d.is_dir():
            raise UserError(f"--working-dir {d}: no such directory")
        env["working_dir"] = str(d.resolve())
        env.setdefault("excludes", list(EXCLUDES))
    if pip:
        env["pip"] = [*env.get("pip", []), *pip]
    env.setdefault("env_vars", {}).setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def entrypoint(command: list[str]) -> str:
    if command and command[0] == "--":
        command = command[1:]
    if not command or command[0] not in SUBMITTABLE:
        got = repr(command[0]) if command else "nothing"
        raise UserError(f"submit: expected one of {', '.join(SUBMITTABLE)} after the options, "
                       f"got {got} (e.g. ssdiff submit --address URL -- run --set rounds=5)")
    return shlex.join(["ssdiff", *command])


def submit(address: str | None, command: list[str], *, working_dir: str | None = None,
           env_file: str | None = None, pip: list[str] = (), job_id: str | None = None,
           num_cpus: float | None = None) -> tuple[object, str]:
    """Submit ``ssdiff <command>`` as a Ray job; returns (client, job id)."""
    entry = entrypoint(command)
    env = runtime_env(working_dir, env_file, list(pip))
    c = client(address)
    try:
        jid = c.submit_job(entrypoint=entry, runtime_env=env, submission_id=job_id,
                           entrypoint_num_cpus=num_cpus)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"the cluster refused the job: {str(e).splitlines()[0]}") from None
    return c, jid


def follow(c, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status name."""
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the log stream can drop; the status below decides
        pass
    while True:  # logs end slightly before the status is final
        status = str(c.get_job_status(job_id).value)
        if status in EXIT:
            return status
        time.sleep(0.5)


def list_jobs(address: str | None) -> list[dict]:
    c = client(address)
    rows = []
    for j in c.list_jobs():
        rows.append({"job": j.submission_id or j.job_id, "status": str(j.status.value),
                     "start": time.strftime("%Y-%m-%d %H:%M:%S",
                                            time.localtime(j.start_time / 1000))
                     if j.start_time else "", "entrypoint": j.entrypoint})
    return sorted(rows, key=lambda r: r["start"])


def stop(address: str | None, job_id: str) -> bool:
    c = client(address)
    try:
        return bool(c.stop_job(job_id))
    except RuntimeError as e:
        raise UserError(f"stop {job_id}: {str(e).splitlines()[0]}") from None
