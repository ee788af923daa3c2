"""The weighted sum of decoded client updates that every aggregation rule averages with."""

from __future__ import annotations

import numpy as np

try:
    import numba as _numba
except ImportError:  # pragma: no cover - numba is a dependency; numpy is the fallback
    _numba = None

if _numba is not None:
    @_numba.njit(cache=True, nogil=True)
    def _nb_axpy(acc, x, w):  # pragma: no cover - compiled
        for i in range(acc.size):
            acc[i] += w * np.float64(x[i])


def axpy(acc: np.ndarray, x: np.ndarray, w: float) -> None:
    """acc += w * x for a float64 ``acc``, in one pass without temporaries (numba); the
    NumPy fallback rounds identically."""
    if _numba is not None:
        _nb_axpy(acc, np.ascontiguousarray(x), np.float64(w))
    else:
        acc += x * np.float64(w)


class WeightedSum:
    """Weighted sum of updates, accumulated as they arrive.

    Memory is one float64 vector per *slot* (a pool), never one per client. Summing
    within a slot in a fixed order and then over slots in slot order makes the result
    independent of which pool answered first, so a run is repeatable bit for bit.
    """

    def __init__(self, num_params: int, num_slots: int):
        self.num_params = num_params
        self.sums = [None] * num_slots
        self.weights = np.zeros(num_slots)
        self.count = 0

    def add(self, slot: int, delta: np.ndarray, weight: float) -> None:
        if self.sums[slot] is None:
            self.sums[slot] = np.zeros(self.num_params, dtype=np.float64)
        # one fused pass, no float64 temporaries per update: allocating and faulting in
        # 2 x 8 bytes per parameter per client cost more than the arithmetic at 100 clients
        axpy(self.sums[slot], delta, weight)
        self.weights[slot] += weight
        self.count += 1

    def total_weight(self) -> float:
        return float(self.weights.sum())

    def mean(self) -> np.ndarray | None:
        """Weighted mean of everything added (float32), or None if nothing was."""
        total = self.total_weight()
        if self.count == 0 or total <= 0:
            return None
        acc = np.zeros(self.num_params, dtype=np.float64)
        for s in self.sums:
            if s is not None:
                acc += s
        return (acc / total).astype(np.float32)
