"""Config fields with their allowed range and doc, for ``config.py``'s sections and for the
``Options`` dataclass beside each aggregation rule and bit policy.

A rule declares what it can be told in its own file::

    @dataclass
    class Options:
        momentum: float = option(0.9, lo=0.0, hi=0.999, doc="server momentum")

and the config takes ``server.momentum`` (every registered rule's options are keys of its
section) without a line in ``config.py``; ``options_of(Options, cfg.server)`` builds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def option(default, *, lo=None, hi=None, choices=None, lo_open=False, doc=""):
    """A field with its allowed range (``lo``/``hi`` inclusive unless ``lo_open``)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "doc": doc}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def options_of(options_cls, section: Any):
    """``options_cls`` filled from a config section's ``options`` (its rule's keys)."""
    return options_cls(**{f.name: section.options[f.name]
                          for f in dataclasses.fields(options_cls)})
