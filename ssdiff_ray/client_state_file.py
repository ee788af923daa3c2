"""The run directory's copy of every client's state, written incrementally at checkpoints.

``client_state.sqlite`` holds rows (client, round, hash, array). A checkpoint adds only the
entries the pools changed since the previous one, then ``checkpoint.json`` commits, then the
rows the new checkpoint supersedes are pruned. A reader takes, per client, the newest row at
or before the checkpoint's round, so a stop at any moment leaves the last committed
checkpoint whole, and rows of a checkpoint that never committed are ignored (and dropped).

The file may come from someone else: it holds bytes and numbers only (no pickle), names the
run it belongs to and the state's length and dtype, and every row's BLAKE2b hash is checked.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from ssdiff_ray.client_state import ClientStateError

FILE = "client_state.sqlite"
FORMAT = "1"


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ClientStateFile:
    """One run's client-state file: ``write``, then ``prune`` after the checkpoint commits;
    ``read`` on resume."""

    def __init__(self, run_dir: Path, run_id: str, size: int | None, dtype: str | None,
                 create: bool):
        """``create``: a fresh run's file (one left by an earlier run here is replaced);
        else an existing one, checked against ``run_id``, ``size`` and ``dtype`` (None: as
        the file says)."""
        self.path = Path(run_dir) / FILE
        if create:  # a fresh run where an earlier one was: its checkpoint.json goes too
            for p in (self.path, self.path.with_name(FILE + "-wal"),
                      self.path.with_name(FILE + "-shm")):
                p.unlink(missing_ok=True)
        elif not self.path.exists():
            raise ClientStateError(f"{self.path}: missing; the checkpoint needs it to resume "
                                   "the clients' error-feedback state")
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")  # a crash mid-write keeps the last commit
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self.db.execute("CREATE TABLE IF NOT EXISTS state (client_id INTEGER, round "
                                "INTEGER, hash TEXT, data BLOB, PRIMARY KEY (client_id, round))")
                if create:
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", {
                        "format": FORMAT, "run_id": run_id, "size": str(int(size)),
                        "dtype": np.dtype(dtype).name}.items())
                meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as e:
            raise ClientStateError(f"{self.path}: not a readable client-state file ({e})") from None
        want = {"format": FORMAT, "run_id": run_id,
                "size": meta.get("size") if size is None else str(int(size)),
                "dtype": meta.get("dtype") if dtype is None else np.dtype(dtype).name}
        for key, what in (("format", "format"), ("run_id", "run"), ("size", "state length"),
                          ("dtype", "dtype")):
            if meta.get(key) != want[key]:
                self.db.close()
                raise ClientStateError(
                    f"{self.path}: holds the client state of another {what} "
                    f"({meta.get(key)!r}, the checkpoint needs {want[key]!r}); refusing to "
                    "resume from it")
        self.size, self.dtype = int(want["size"]), np.dtype(want["dtype"])

    def write(self, rows) -> tuple[int, int]:
        """Add (client id, round, array) rows in one transaction; (rows, bytes) written."""
        n = nbytes = 0
        try:
            with self.db:
                for cid, r, value in rows:
                    data = np.ascontiguousarray(value, dtype=self.dtype).tobytes()
                    self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?)",
                                    (int(cid), int(r), _hash(data), data))
                    n, nbytes = n + 1, nbytes + len(data)
        except sqlite3.Error as e:  # a full disk among them; the last checkpoint stays whole
            raise ClientStateError(f"{self.path}: cannot write the checkpoint's client state "
                                   f"({e})") from None
        return n, nbytes

    def prune(self, through: int) -> None:
        """Drop rows the checkpoint of round ``through`` superseded (it has committed)."""
        with self.db:
            self.db.execute(
                "DELETE FROM state WHERE round <= ? AND EXISTS (SELECT 1 FROM state s "
                "WHERE s.client_id = state.client_id AND s.round > state.round AND s.round <= ?)",
                (through, through))

    def read(self, through: int):
        """(client id, round, array) of every client's newest row at or before ``through``,
        in client order; rows of a later, uncommitted checkpoint are dropped first."""
        with self.db:
            self.db.execute("DELETE FROM state WHERE round > ?", (through,))
        self.prune(through)
        width = self.size * self.dtype.itemsize
        for cid, r, digest, data in self.db.execute(
                "SELECT client_id, round, hash, data FROM state ORDER BY client_id"):
            if len(data) > width or len(data) % self.dtype.itemsize or _hash(data) != digest:
                raise ClientStateError(f"{self.path}: client {cid}'s state (round {r}) is "
                                       "corrupt (length or hash differs); refusing to resume")
            yield int(cid), int(r), np.frombuffer(data, dtype=self.dtype)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(FILE + "*"))

    def close(self) -> None:
        self.db.close()
