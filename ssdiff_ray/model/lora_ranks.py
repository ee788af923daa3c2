"""Mixed LoRA ranks (HetLoRA-style rank masking), NumPy only so the driver can plan with it.

The global adapter has rank r (``lora.rank``). A client of a weaker device class trains
rank r_c < r: only components 0..r_c-1 (rows of A, columns of B) get gradients, the others
stay at the global values, and it uploads only its r_c components. Its model is still the
global one plus its own update, so the server's aggregation (naive, FFA or exact) sees an
ordinary update that is zero in the components the client did not train.
"""

from __future__ import annotations

import numpy as np

from ssdiff_ray import codec


def client_rank(device_class: str, lora) -> int:
    """The rank a client of ``device_class`` trains (``lora.rank_by_class``, else ``lora.rank``)."""
    return int(lora.rank_by_class.get(device_class, lora.rank))


def rank_params(num_params: int, rank: int, full_rank: int) -> int:
    """Adapter values a rank-``rank`` client uploads: every A row and B column is the same
    size whatever the rank, so the count is linear in it."""
    return num_params * rank // full_rank


def component_axis(name: str) -> int:
    """The rank axis of an adapter tensor: 0 for A (r x fan_in), 1 for B (out x r)."""
    return 0 if ".lora_A." in name else 1


def rank_index(layout: list[tuple[str, tuple]], rank: int) -> np.ndarray:
    """Positions, in the trainable vector of ``layout`` (name, shape), of components
    0..rank-1 of every adapter tensor."""
    parts, offset = [], 0
    for name, shape in layout:
        idx = np.arange(int(np.prod(shape))).reshape(shape)
        keep = idx[:rank] if component_axis(name) == 0 else idx[:, :rank]
        parts.append(offset + keep.ravel())
        offset += idx.size
    return np.sort(np.concatenate(parts))


def rank_layout(layout: list[tuple[str, tuple]], rank: int) -> list[tuple[str, tuple]]:
    """The layout of a rank-``rank`` adapter (what its payload's layout id names)."""
    out = []
    for name, shape in layout:
        s = list(shape)
        s[component_axis(name)] = rank
        out.append((name, tuple(s)))
    return out


class RankParts:
    """What a client of each rank uploads, computed once per rank: (positions in the full
    update, or None for the full rank; their count; the payload's layout id)."""

    def __init__(self, layout: list[tuple[str, tuple]], full_rank: int):
        self.layout, self.full_rank = layout, full_rank
        self.num_params = sum(int(np.prod(s)) for _, s in layout)
        self._parts: dict[int, tuple[np.ndarray | None, int, int]] = {}

    def __call__(self, rank: int | None) -> tuple[np.ndarray | None, int, int]:
        rank = self.full_rank if rank is None else int(rank)
        if rank not in self._parts:
            if rank == self.full_rank:
                self._parts[rank] = (None, self.num_params, codec.layout_id(self.layout))
            else:
                idx = rank_index(self.layout, rank)
                self._parts[rank] = (idx, len(idx), codec.layout_id(rank_layout(self.layout, rank)))
        return self._parts[rank]
