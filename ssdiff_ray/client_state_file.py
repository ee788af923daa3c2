"""The run directory's copy of every client's state, written incrementally at checkpoints.

``client_state.sqlite`` holds up to two rows (slots) per client: (client, slot, round, hash,
array). A checkpoint writes only the entries the pools changed since the previous one, each
into the client's slot that the last committed checkpoint does not use, then
``checkpoint.json`` commits. A reader takes, per client, the slot with the newest round at or
before the checkpoint's round, so a stop at any moment leaves the last committed checkpoint
whole, and what a checkpoint that never committed wrote is ignored.

Why two slots written in place: a residual is MBs and most clients are written at every
checkpoint they uploaded before, so deleting superseded rows and inserting new ones made SQLite
journal and free every page twice (~1.9 s per 200 MB). A slot's array is overwritten in place
(``blobopen``) without a journal, which is safe because no committed checkpoint reads that slot;
only its small round and hash go through a journaled transaction, fsynced before the JSON.

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
FORMAT = "2"


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ClientStateFile:
    """One run's client-state file: ``write`` at a checkpoint, ``read`` on resume."""

    def __init__(self, run_dir: Path, run_id: str, size: int | None, dtype: str | None,
                 create: bool):
        """``create``: a fresh run's file (one left by an earlier run here is replaced);
        else an existing one, checked against ``run_id``, ``size`` and ``dtype`` (None: as
        the file says)."""
        self.path = Path(run_dir) / FILE
        if create:  # a fresh run where an earlier one was: its checkpoint.json goes too
            for p in (self.path, self.path.with_name(FILE + "-journal")):
                p.unlink(missing_ok=True)
        elif not self.path.exists():
            raise ClientStateError(f"{self.path}: missing; the checkpoint needs it to resume "
                                   "the clients' error-feedback state")
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=TRUNCATE")
            self.db.execute("PRAGMA synchronous=FULL")  # written through before checkpoint.json
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self.db.execute("CREATE TABLE IF NOT EXISTS state (client_id INTEGER, slot INTEGER, "
                                "round INTEGER, hash TEXT, data BLOB, PRIMARY KEY (client_id, slot))")
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

    def write(self, rows, committed: int) -> tuple[int, int]:
        """Write (client id, round, array) rows, each into the slot the checkpoint of round
        ``committed`` (the last one that committed) does not read; (rows, bytes) written."""
        rows = [(int(c), int(r), np.ascontiguousarray(v, dtype=self.dtype).tobytes())
                for c, r, v in rows]
        try:
            slots = self._slots([c for c, _, _ in rows])
            in_place, fresh = [], []
            for cid, r, data in rows:
                held = slots.get(cid, {})  # slot -> (round, rowid, length)
                keep = max((s for s, (sr, _, _) in held.items() if sr <= committed),
                           key=lambda s: held[s][0], default=None)
                slot = 1 - keep if keep is not None else 0
                old = held.get(slot)
                if old is not None and old[2] == len(data):
                    in_place.append((old[1], r, data))
                else:
                    fresh.append((cid, slot, r, data))
            # Arrays into slots no committed checkpoint reads: no journal needed (see above).
            self.db.execute("PRAGMA journal_mode=OFF")
            for rowid, _, data in in_place:
                with self.db.blobopen("state", "data", rowid) as blob:
                    blob.write(data)
            self.db.execute("PRAGMA journal_mode=TRUNCATE")
            with self.db:  # rounds and hashes, and rows new to a slot, journaled
                self.db.executemany("UPDATE state SET round = ?, hash = ? WHERE rowid = ?",
                                    [(r, _hash(d), rowid) for rowid, r, d in in_place])
                self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?)",
                                    [(c, s, r, _hash(d), d) for c, s, r, d in fresh])
        except sqlite3.Error as e:  # a full disk among them; the last checkpoint stays whole
            raise ClientStateError(f"{self.path}: cannot write the checkpoint's client state "
                                   f"({e})") from None
        return len(rows), sum(len(d) for _, _, d in rows)

    def _slots(self, clients: list[int]) -> dict[int, dict[int, tuple[int, int, int]]]:
        out: dict[int, dict] = {}
        for i in range(0, len(clients), 500):  # SQLite's bound-parameter limit
            part = clients[i:i + 500]
            q = ("SELECT client_id, slot, round, rowid, length(data) FROM state WHERE client_id "
                 f"IN ({','.join('?' * len(part))})")
            for cid, slot, r, rowid, n in self.db.execute(q, part):
                out.setdefault(cid, {})[slot] = (r, rowid, n)
        return out

    def read(self, through: int):
        """(client id, round, array) of every client's newest row at or before ``through``
        (the checkpoint's round), in client order."""
        width = self.size * self.dtype.itemsize
        q = ("SELECT client_id, round, hash, data FROM state s WHERE round <= ? AND NOT EXISTS "
             "(SELECT 1 FROM state t WHERE t.client_id = s.client_id AND t.round > s.round "
             "AND t.round <= ?) ORDER BY client_id")
        for cid, r, digest, data in self.db.execute(q, (through, through)):
            if len(data) > width or len(data) % self.dtype.itemsize or _hash(data) != digest:
                raise ClientStateError(f"{self.path}: client {cid}'s state (round {r}) is "
                                       "corrupt (length or hash differs); refusing to resume")
            yield int(cid), int(r), np.frombuffer(data, dtype=self.dtype)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(FILE + "*"))

    def close(self) -> None:
        self.db.close()
