"""Cloud-edge data distillation: a small labelled synthetic data set from a trained
class-conditional run, the edge students trained on it, the distillation attack and the
scan of a synthetic set before it ships.

Selection methods are one file each (``Selection.select``); the list below is the one
place they are registered (``ssdiff distill --selection`` reads it). Torch-free.
"""

from __future__ import annotations

from ssdiff_ray.errors import UserError
from ssdiff_ray.registry import load

# name -> implementation; each picks k of a class's candidate generations
SELECTIONS: dict[str, str] = {
    "random": "ssdiff_ray.distill.random_pick:RandomPick",
    "prototypes": "ssdiff_ray.distill.prototypes:Prototypes",
    "minimax": "ssdiff_ray.distill.minimax:Minimax",
}


class DistillError(UserError):
    """A distillation request that cannot run; the message names what is wrong."""


def make_selection(name: str):
    """The ``Selection`` registered as ``name``."""
    if name not in SELECTIONS:
        raise DistillError(f"--selection {name}: choose from {', '.join(SELECTIONS)}")
    return load(SELECTIONS[name])()
