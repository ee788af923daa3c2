"""Optuna storages by URL: SQLite file (default), any SQLAlchemy URL (PostgreSQL), journal file."""

from __future__ import annotations

from pathlib import Path

from ssdiff_ray.config import ConfigError
from ssdiff_ray.errors import redact


def absolute_url(url: str) -> str:
    """File URLs made absolute, so Ray workers (other cwd) open the same file."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            path = url[len(prefix):]
            if path and path != ":memory:":
                return prefix + str(Path(path).expanduser().resolve())
    return url


def open_storage(url: str):
    """The Optuna storage behind ``url``; errors are one line naming the URL."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal://"):])
        if not path.name:
            raise ConfigError(f"--storage {url!r}: journal:///PATH needs a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"--storage {url!r}: expected sqlite:///FILE, "
                          f"postgresql+psycopg://USER@HOST:PORT/DB or journal:///FILE")
    kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Trials in Ray workers write (pruning reports) while the driver writes: wait on locks.
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    elif url.startswith("postgresql"):
        kwargs = {"engine_kwargs": {"pool_pre_ping": True}}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as e:  # noqa: BLE001 - driver/connection errors of many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--storage {redact(url)}: cannot open ({first})") from None


def trial_id(storage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of ``study_name`` (Optuna's public storage API)."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)
