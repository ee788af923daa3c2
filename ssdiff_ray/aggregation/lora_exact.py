"""Exact aggregation of LoRA adapters (FedEx-LoRA, Singhal et al., 2024).

Averaging A and B separately (FedIT) gives mean(B) mean(A), not the mean of the clients'
products B_i A_i: the difference is a covariance term of rank up to n r. FedEx-LoRA keeps
the averaged factors as the new adapter and adds that residual, scaled, to the frozen base
weight, so the global layer W + s B A equals W + s mean(B_i A_i) exactly. The base moves,
so clients need the adapted layers' base weights each round (counted on the downlink).

It runs after the round's aggregation rule, over the clients the rule kept, so screening
rules (norm bound, Krum, FLAME) still decide who enters.
"""

from __future__ import annotations

import numpy as np


def product_residual(a: list[np.ndarray], b: list[np.ndarray], weights: list[float]
                     ) -> np.ndarray:
    """mean_w(B_i A_i) - mean_w(B_i) mean_w(A_i) for factors A_i (r x k) and B_i (d x r)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    mean_a = sum(wi * ai.astype(np.float64) for wi, ai in zip(w, a))
    mean_b = sum(wi * bi.astype(np.float64) for wi, bi in zip(w, b))
    mean_prod = sum(wi * (bi.astype(np.float64) @ ai.astype(np.float64))
                    for wi, ai, bi in zip(w, a, b))
    return mean_prod - mean_b @ mean_a


def add_residuals(new: np.ndarray, old: np.ndarray, layers, trainable: np.ndarray,
                  updates: list[tuple[float, np.ndarray]], lr: float = 1.0) -> np.ndarray:
    """``new`` with lr * scaling * residual added to every adapted layer's base weight.

    ``old`` is the round's starting full weight vector, ``trainable`` the index of the
    uplinked (trainable) entries in it, and ``updates`` the kept clients' (weight, delta)
    over those entries: client i's factors are old + delta_i."""
    if len(updates) < 2:
        return new  # one client: the product of the means is its product
    out = new.copy()
    where = np.full(len(old), -1, dtype=np.int64)
    where[trainable] = np.arange(len(trainable))
    for layer in layers:
        a = [_factor(old, where, d, layer.a) for _, d in updates]
        b = [_factor(old, where, d, layer.b) for _, d in updates]
        res = product_residual(a, b, [w for w, _ in updates])
        off, shape = layer.base
        size = int(np.prod(shape))
        out[off:off + size] += (lr * layer.scaling * res).astype(np.float32).ravel()
    return out


def _factor(old: np.ndarray, where: np.ndarray, delta: np.ndarray, slot) -> np.ndarray:
    """A client's A (r x fan_in) or B (out x r) as a matrix: old + its delta (0 if frozen)."""
    off, shape = slot
    size = int(np.prod(shape))
    value = old[off:off + size].copy()
    pos = where[off]
    if pos >= 0:
        value += delta[pos:pos + size]
    return value.reshape(shape[0], -1)
