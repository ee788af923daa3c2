"""Run ledgers: one row per (round, client) and one per round, kept as Parquet files.

Rows are buffered in memory per round and the files rewritten atomically on ``flush``
(each checkpoint and at the end), so a crash never leaves a half-written file, and a
resumed run starts from exactly the rows of its last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CLIENTS_FILE = "clients.parquet"
ROUNDS_FILE = "rounds.parquet"


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, path)


class Ledger:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.client_parts: list[pd.DataFrame] = []
        self.round_rows: list[dict] = []

    def add_round(self, clients: pd.DataFrame, round_row: dict) -> None:
        self.client_parts.append(clients)
        self.round_rows.append(round_row)

    def update_last_round(self, **values) -> None:
        """Add values (e.g. evaluation results) to the latest round's row."""
        self.round_rows[-1].update(values)

    def clients(self) -> pd.DataFrame:
        if not self.client_parts:
            return pd.DataFrame()
        return pd.concat(self.client_parts, ignore_index=True)

    def rounds(self) -> pd.DataFrame:
        return pd.DataFrame(self.round_rows)

    def flush(self) -> None:
        _write_atomic(self.clients(), self.run_dir / CLIENTS_FILE)
        _write_atomic(self.rounds(), self.run_dir / ROUNDS_FILE)

    def truncate(self, last_round: int) -> None:
        """Keep only rounds <= last_round (resume from a checkpoint)."""
        self.client_parts = [p for p in self.client_parts if int(p["round"].iloc[0]) <= last_round]
        self.round_rows = [r for r in self.round_rows if r["round"] <= last_round]

    @classmethod
    def load(cls, run_dir: str | Path) -> Ledger:
        led = cls(run_dir)
        cpath, rpath = led.run_dir / CLIENTS_FILE, led.run_dir / ROUNDS_FILE
        if cpath.exists():
            df = pd.read_parquet(cpath)
            led.client_parts = [g for _, g in df.groupby("round", sort=True)]
        if rpath.exists():
            led.round_rows = pd.read_parquet(rpath).to_dict("records")
        return led
