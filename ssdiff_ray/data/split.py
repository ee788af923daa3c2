"""The non-IID split of a data set over clients."""

from __future__ import annotations

import numpy as np


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int = 2
) -> list[np.ndarray]:
    """Non-IID split: each class is spread over clients with Dirichlet(alpha) proportions.

    Small alpha gives label skew and quantity skew. Every client gets at least
    ``min_samples`` indices (taken from the largest clients) so no client is empty;
    with more clients than samples, samples are reused across clients.
    Returns a sorted index array per client.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes = np.unique(labels)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    shards = [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]
    # Top up clients below min_samples: move from the largest shard while it can spare,
    # else sample with replacement from the whole set (more clients than data).
    # Sizes kept as an array: a list rebuilt per top-up made 100,000 clients quadratic.
    sizes = np.array([len(s) for s in shards])
    for k in range(num_clients):
        while sizes[k] < min_samples:
            big = int(np.argmax(sizes))
            if sizes[big] > min_samples:
                take, shards[big] = shards[big][-1], shards[big][:-1]
                sizes[big] -= 1
            else:
                take = rng.integers(0, n)
            shards[k] = np.sort(np.append(shards[k], take))
            sizes[k] += 1
    return [s.astype(np.int64) for s in shards]
