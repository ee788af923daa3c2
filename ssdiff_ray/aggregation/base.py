"""The aggregation interface (Flower's Strategy idea): one round's client updates in, the
next global weights and a verdict per screened client out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClientUpdate:
    client_id: int
    slot: int           # the pool it came from (sums are kept per slot, see WeightedSum)
    delta: np.ndarray   # the decoded float32 update


@dataclass
class Verdict:
    """What a rule did with one client's update (only screened clients get one)."""

    kept: bool          # the update entered the mean (perhaps clipped)
    reason: str         # e.g. "krum score 3.1 > kept max 1.2"


@dataclass
class AggregateResult:
    weights: np.ndarray                 # the new global weights (float32)
    aggregated: int                     # updates that entered the mean
    update_norm: float                  # L2 norm of the mean update (0 when none)
    verdicts: dict[int, Verdict] = field(default_factory=dict)  # client id -> verdict


class Aggregator:
    """Subclasses implement ``add`` and ``finish``; a new rule is one new file plus one line
    in ``AGGREGATORS``. Between ``begin_round`` and ``finish`` the server calls ``add`` once
    per decoded update, in an order that may vary from run to run: the result must not."""

    name = "base"

    @classmethod
    def from_config(cls, server, num_params: int, num_slots: int) -> Aggregator:
        """Build from the ``[server]`` config section."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, server) -> str | None:
        """Why the ``[server]`` section does not suit this rule (checked before Ray starts),
        or None."""
        return None

    def begin_round(self, weights: np.ndarray) -> None:
        raise NotImplementedError

    def add(self, update: ClientUpdate, weight: float) -> None:
        raise NotImplementedError

    def finish(self) -> AggregateResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What must survive a restart (momentum and the like)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def clip_to_norm(delta: np.ndarray, max_norm: float) -> tuple[np.ndarray, bool]:
    """Scale ``delta`` down to L2 norm ``max_norm`` (0 = off); return it and whether it was clipped."""
    if max_norm <= 0:
        return delta, False
    norm = float(np.linalg.norm(delta))
    if norm <= max_norm:
        return delta, False
    return delta * np.float32(max_norm / norm), True
