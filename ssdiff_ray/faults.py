"""Injected client faults, for reliability tests and chaos runs (``faults.inject``): a client
whose update diverges (NaN, Inf), that sends another bit width than it was assigned, a
truncated or oversized payload, or that is slow. The rest of the system must treat such a
client exactly as it would a real one: reject it with a reason and never let it cost the
honest clients anything."""

from __future__ import annotations

import time

import numpy as np

FAULTS = ("nan", "inf", "wrong_bits", "truncate", "oversize", "slow")


def parse_fault(text: str) -> tuple[str, float]:
    """``"nan"`` -> ("nan", 0); ``"slow:2.5"`` -> ("slow", 2.5). ValueError if unknown."""
    name, _, arg = str(text).partition(":")
    if name not in FAULTS or (name == "slow") != bool(arg):
        raise ValueError(f"{text!r}: a fault is one of {', '.join(FAULTS[:-1])} or slow:SECONDS")
    return name, float(arg) if arg else 0.0


def parse_faults(inject: dict) -> dict[int, tuple[str, float]]:
    """``{"3": "nan", "5": "slow:2"}`` -> {3: ("nan", 0.0), 5: ("slow", 2.0)}."""
    return {int(k): parse_fault(v) for k, v in inject.items()}


def before_training(fault: tuple[str, float] | None, cancelled=lambda: False) -> None:
    """A slow client sleeps its seconds, in slices, so that a call the driver cancelled
    (``cancelled()`` true: the round timed out) stops sleeping within 0.1 s."""
    if fault and fault[0] == "slow":
        end = time.monotonic() + fault[1]
        while not cancelled() and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.1, left))


def corrupt_update(delta: np.ndarray, fault: tuple[str, float] | None) -> np.ndarray:
    """A diverged client: its update holds a NaN or an Inf."""
    if fault and fault[0] in ("nan", "inf"):
        delta = delta.copy()
        delta[0] = np.nan if fault[0] == "nan" else np.inf
    return delta


def sent_bits(assigned: int, fault: tuple[str, float] | None) -> int:
    """The bit width the client really encodes at."""
    if fault and fault[0] == "wrong_bits":
        return 32 if assigned != 32 else 8
    return assigned


def payload_size(size: int, fault: tuple[str, float] | None) -> int:
    """The bytes the client really sends for a payload of ``size`` bytes."""
    if fault and fault[0] == "truncate":
        return size - 8
    if fault and fault[0] == "oversize":
        return size + 16
    return size
