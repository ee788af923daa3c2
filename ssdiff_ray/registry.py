"""Choice lists name their implementations by import path ("module:attr"), so the config and
the command line can read a list without importing what it names (torch, on the driver)."""

from __future__ import annotations

import importlib


def load(path: str):
    """The object at ``"package.module:attr"``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
