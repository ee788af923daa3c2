"""The policy interface: one object, one method, vectorised over a round's clients."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class RoundContext:
    """What a policy may know when it picks bits (and power/frequency) for one round.

    All per-client arrays are aligned with ``client_ids`` (the round's selected clients).
    """

    round: int                      # 1-based round index
    client_ids: np.ndarray          # int64, selected clients, sorted
    profiles: pd.DataFrame          # device profiles of the selected clients (rows aligned)
    num_params: int                 # length of the flat update
    block_size: int                 # codec block size
    num_samples: np.ndarray         # int64, local data size of each client (FedAvg weights)
    local_flops: np.ndarray         # float64, FLOPs of each client's local work this round
    channel_gain: np.ndarray        # float64, linear channel power gain h of each client this round
    bandwidth_hz: np.ndarray        # float64, uplink bandwidth share of each client this round
    deadline_s: float               # round deadline (simulated seconds), inf when none
    last_loss: np.ndarray           # float64, each client's last reported loss (nan if never)
    loss_history: list[float] = field(default_factory=list)  # mean training loss of past rounds
    update_norm: np.ndarray | None = None  # last known L2 norm of each client's update (nan if never)
    download_bytes: int | None = None      # bytes of this round's broadcast to each client


@dataclass
class Decision:
    """A policy's answer: bits per client, and optionally transmit power and CPU frequency."""

    bits: np.ndarray                      # int64, one of codec.SUPPORTED_BITS per client
    tx_power_w: np.ndarray | None = None  # None: each device's default (max) power
    cpu_hz: np.ndarray | None = None      # None: each device's default (max) frequency


class BitPolicy:
    """Base class: subclasses implement ``choose`` and ``from_config``; a new policy is one
    new file plus one line in ``POLICIES``."""

    name = "base"

    @classmethod
    def from_config(cls, cfg) -> BitPolicy:  # pragma: no cover - interface
        raise NotImplementedError

    def choose(self, ctx: RoundContext) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError
