"""The typed results that cross from the actors to the driver in a round. Torch-free: the
driver unpickles them and never imports torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.base import Verdict


@dataclass
class TrainedChunk:
    """What a pool reports for the clients of one ``train_round`` call, arrays aligned with
    ``client_id``. The payloads travel apart, back to back in one uint8 blob."""

    client_id: np.ndarray
    loss: np.ndarray
    update_norm: np.ndarray
    uplink_bytes: np.ndarray  # bytes really sent (0 for a client that failed)
    offsets: np.ndarray      # client i's payload is blob[offsets[i]:offsets[i + 1]]
    train_s: np.ndarray
    encode_s: np.ndarray
    pid: int                 # the process that trained them: a change means a restart
    failed_reason: np.ndarray  # str per client: "" = its payload was sent, else why not


@dataclass
class ChunkVerdicts:
    """The server's verdict on each payload of one chunk, aligned with its clients."""

    rejected_reason: np.ndarray  # str per client: "" = decoded and added, else why not
    screened: np.ndarray         # bool per client: clipped to server.max_update_norm
    sent_bits: np.ndarray        # int per client: the bit width of its payload (0: none)
    decode_s: float
    aggregate_s: float


@dataclass
class RoundOutcome:
    """What aggregation made of the round (the new weights stay on the server)."""

    aggregated: int                 # updates that entered the mean
    update_norm: float              # L2 norm of the mean update
    verdicts: dict[int, Verdict]    # client id -> verdict, for the clients a rule screened
