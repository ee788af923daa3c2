"""Torch threads per process: one pool = ``n`` threads; more threads than cores across pools
only thrashes."""

from __future__ import annotations


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
