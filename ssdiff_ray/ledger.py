"""Run ledgers: one row per (round, client) and one per round, kept as Parquet files.

``ClientResults`` is what a round produced per client; ``client_rows`` and ``round_row``
turn it and the round's plan into ledger rows. Rows are buffered in memory per round and
the files rewritten atomically on ``flush`` (each checkpoint and at the end), so a crash
never leaves a half-written file, and a resumed run starts from exactly the rows of its
last checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CLIENTS_FILE = "clients.parquet"
ROUNDS_FILE = "rounds.parquet"


@dataclass
class ClientResults:
    """What one round produced per selected client, aligned with the plan's client_ids."""

    loss: np.ndarray             # NaN where not trained
    update_norm: np.ndarray
    uplink_bytes: np.ndarray
    train_s: np.ndarray
    encode_s: np.ndarray
    drop_reason: np.ndarray      # "" = aggregated; straggler, timeout, pool_failed, rejected, screened
    rejected_reason: np.ndarray  # the codec's or the aggregation rule's reason, "" if none
    screened: np.ndarray         # clipped or flagged by a rule
    state_reset: np.ndarray      # its pool restarted: its residual started empty
    sent_bits: np.ndarray        # the bit width its payload declared (0: nothing sent)

    @classmethod
    def start(cls, plan) -> ClientResults:
        """Nothing reported yet; predicted stragglers are marked (they never train)."""
        n = len(plan.client_ids)
        return cls(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64), np.zeros(n),
                   np.zeros(n), np.where(plan.straggler, "straggler", "").astype(object),
                   np.full(n, "", dtype=object), np.zeros(n, bool), np.zeros(n, bool),
                   np.zeros(n, np.int64))


def client_rows(plan, res: ClientResults, population: pd.DataFrame, num_pools: int,
                malicious_ids: np.ndarray, downlink_bytes: int) -> pd.DataFrame:
    """The round's rows of clients.parquet."""
    prof = population.iloc[plan.client_ids]
    costs = plan.costs
    return pd.DataFrame({
        "round": plan.round, "client_id": plan.client_ids, "pool": plan.client_ids % num_pools,
        "device_class": prof["device_class"].to_numpy(),
        "num_samples": plan.num_samples, "local_steps": plan.local_steps, "bits": plan.bits,
        "sent_bits": res.sent_bits, "uplink_bytes": res.uplink_bytes, "downlink_bytes": downlink_bytes,
        "loss": res.loss, "update_norm": res.update_norm,
        "dropped": res.drop_reason != "", "drop_reason": res.drop_reason.astype(str),
        "straggler": plan.straggler, "screened": res.screened,
        "rejected_reason": res.rejected_reason.astype(str), "state_reset": res.state_reset,
        "malicious": np.isin(plan.client_ids, malicious_ids),
        "train_s": res.train_s, "encode_s": res.encode_s,
        "compute_s": costs["compute_s"], "upload_s": costs["upload_s"],
        "download_s": costs["download_s"], "compute_energy_j": costs["compute_energy_j"],
        "upload_energy_j": costs["upload_energy_j"],
        "download_energy_j": costs["download_energy_j"], "energy_j": costs["energy_j"],
        "tx_power_w": plan.tx_power_w, "cpu_hz": plan.cpu_hz, "rate_bps": costs["rate_bps"],
        "lora_rank": np.zeros(len(plan.client_ids), np.int64) if plan.ranks is None else plan.ranks,
    })


def round_row(plan, res: ClientResults, mean_loss: float, aggregated: int, update_norm: float,
              downlink_bytes: int, timings: dict) -> dict:
    """The round's row of rounds.parquet. ``timings``: wall_s, train_wall_s, pool_failures,
    decode_s, aggregate_s."""
    kept = res.drop_reason == ""
    costs = plan.costs
    return {
        "round": plan.round, "wall_s": timings["wall_s"], "train_wall_s": timings["train_wall_s"],
        "clients_selected": len(plan.client_ids), "clients_aggregated": int(aggregated),
        "stragglers": int(plan.straggler.sum()), "pool_failures": timings["pool_failures"],
        "uplink_bytes": int(res.uplink_bytes[kept].sum()),
        "downlink_bytes": int(downlink_bytes) * int((~plan.straggler).sum()),
        "loss": mean_loss, "update_norm": update_norm,
        "mean_bits": float(plan.bits.mean()),
        "latency_s": float(costs["total_s"][kept].max()) if kept.any() else 0.0,
        "energy_j": float(costs["energy_j"].sum()),
        "train_s": float(res.train_s.sum()), "encode_s": float(res.encode_s.sum()),
        "decode_s": timings["decode_s"], "aggregate_s": timings["aggregate_s"],
        "fid": float("nan"),
    }


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
