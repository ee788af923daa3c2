"""The per-client state one pool holds (error-feedback residuals), bounded in RAM.

A residual is the size of the model (4.2 MB at the small preset) and every client that has
uploaded once has one, so a dict of them grows with the population until the pool is killed.
Here at most ``cache_bytes`` of them stay in RAM (least recently used go first); the rest are
spilled to a SQLite file on the pool's disk. SQLite is the standard library's: one file, any
key order, blobs of a few MB, no shard format written by hand. Entries may be held at reduced
precision (``dtype = "float16"``); the loss is measured (``stats()["precision_loss"]``).

Every entry carries the round that wrote it, so a checkpoint takes only what changed since
the last one (``changed_since``; the run directory's copy is ``client_state_file``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ssdiff_ray.errors import UserError

DTYPES = ("float32", "float16")
SPILL_PREFIX = "ssdiff-client-state-"


class ClientStateError(UserError):
    """Client state that cannot be kept or read: the message names the file and why."""


class ClientStateStore:
    """An array of up to ``size`` values per client id (a LoRA client of a lower rank keeps
    only its part): ``get``, ``put``, ``changed_since``."""

    def __init__(self, size: int, cache_bytes: int, dtype: str = "float32",
                 spill_dir: str | Path | None = None):
        if dtype not in DTYPES:
            raise ClientStateError(f"client state dtype {dtype!r}: expected one of {DTYPES}")
        self.size, self.cache_bytes, self.dtype = int(size), int(cache_bytes), np.dtype(dtype)
        self.spill_root = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir())
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()   # most recent last
        self.round_of: dict[int, int] = {}     # every client with state: the round that wrote it
        self.on_disk: set[int] = set()         # clients whose newest value is only on disk
        self._cache_nbytes = 0
        self._db: sqlite3.Connection | None = None
        self._dir: Path | None = None
        self._sq_err = self._sq_norm = 0.0     # rounding error and value energy (float16)

    def __len__(self) -> int:
        return len(self.round_of)

    def __iter__(self):
        """The ids of the clients that have state."""
        return iter(sorted(self.round_of))

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self.round_of

    def get(self, client_id: int) -> np.ndarray | None:
        """The client's state as float32 (a copy), None when it has none."""
        cid = int(client_id)
        if cid in self.cache:
            self.cache.move_to_end(cid)
            return self.cache[cid].astype(np.float32)
        if cid in self.on_disk:
            return self._read(cid).astype(np.float32)
        return None

    def put(self, client_id: int, value: np.ndarray, round_: int) -> None:
        """Keep ``value`` as the client's state, written in round ``round_``."""
        cid = int(client_id)
        value = np.asarray(value, dtype=np.float32).ravel()
        if value.size > self.size:
            raise ValueError(f"client {cid}: state of {value.size} values, the store holds "
                             f"at most {self.size}")
        stored = value.astype(self.dtype)
        if self.dtype != np.float32:
            self._sq_err += float(np.square(stored.astype(np.float32) - value).sum())
            self._sq_norm += float(np.square(value).sum())
        old = self.cache.pop(cid, None)
        self._cache_nbytes += stored.nbytes - (0 if old is None else old.nbytes)
        self.cache[cid] = stored
        self.round_of[cid] = int(round_)
        self.on_disk.discard(cid)
        self._evict()

    def changed_since(self, round_: int, after: int = -1):
        """(client id, round, array in the stored dtype) of every entry written after
        ``round_``, in client order, from client ``after + 1`` on."""
        for cid in sorted(c for c, r in self.round_of.items() if r > round_ and c > after):
            yield cid, self.round_of[cid], self._stored(cid)

    def load(self, rows) -> None:
        """Take (client id, round, array) rows, e.g. from a checkpoint."""
        for cid, r, value in rows:
            self.put(cid, np.asarray(value, dtype=np.float32), r)

    def stats(self) -> dict:
        """Entries, bytes in RAM and on disk, and the relative RMS rounding error."""
        disk = self._dir_bytes()
        return {"entries": len(self), "in_ram": len(self.cache), "on_disk": len(self.on_disk),
                "ram_bytes": self.ram_bytes(), "disk_bytes": disk,
                "precision_loss": (self._sq_err / self._sq_norm) ** 0.5 if self._sq_norm else 0.0}

    def ram_bytes(self) -> int:
        return self._cache_nbytes

    def close(self) -> None:
        """Drop everything and delete the spill file."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.cache.clear()
        self._cache_nbytes = 0
        self.round_of.clear()
        self.on_disk.clear()

    # --- the spill file ---------------------------------------------------------------
    def _stored(self, cid: int) -> np.ndarray:
        return self.cache[cid] if cid in self.cache else self._read(cid)

    def _evict(self) -> None:
        while self.cache and self._cache_nbytes > self.cache_bytes:
            cid = next(iter(self.cache))
            self._write(cid, self.cache[cid])  # written before it leaves RAM: a full disk loses nothing
            self._cache_nbytes -= self.cache.pop(cid).nbytes
            self.on_disk.add(cid)

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            sweep_spill_dirs(self.spill_root)
            try:
                self._dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-",
                                                  dir=self.spill_root))
                # A scratch file: a pool that dies loses it with its RAM (the driver records
                # that its clients' state was reset), so no fsync; the journal in memory still
                # rolls a failed write (a full disk) back, leaving the file whole.
                self._db = sqlite3.connect(self._dir / "spill.sqlite", isolation_level=None)
                self._db.execute("PRAGMA journal_mode=MEMORY")
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.execute("CREATE TABLE state (client_id INTEGER PRIMARY KEY, data BLOB)")
            except (OSError, sqlite3.Error) as e:
                raise ClientStateError(f"{self.spill_root}: cannot spill client state there "
                                       f"({e})") from None
        return self._db

    def _write(self, cid: int, value: np.ndarray) -> None:
        db = self._open()
        try:
            db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (cid, value.tobytes()))
        except sqlite3.Error as e:  # "database or disk is full" among them
            raise ClientStateError(f"{self._dir / 'spill.sqlite'}: cannot spill client {cid}'s "
                                   f"state ({e}); free space or set clients.state_dir") from None

    def _read(self, cid: int) -> np.ndarray:
        row = self._open().execute("SELECT data FROM state WHERE client_id = ?",
                                   (cid,)).fetchone()
        if row is None or len(row[0]) % self.dtype.itemsize:
            raise ClientStateError(f"{self._dir / 'spill.sqlite'}: client {cid}'s spilled "
                                   "state is missing or truncated")
        return np.frombuffer(row[0], dtype=self.dtype)

    def _dir_bytes(self) -> int:
        if self._dir is None:
            return 0
        return sum(f.stat().st_size for f in self._dir.iterdir() if f.is_file())


def sweep_spill_dirs(root: Path) -> None:
    """Delete spill directories of pool processes that are gone (killed, not closed)."""
    for d in root.glob(f"{SPILL_PREFIX}*"):
        try:
            pid = int(d.name[len(SPILL_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
