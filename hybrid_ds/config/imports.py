"""Importing a callable the config names as ``package.module:name`` (an ENV, a ``python`` reward), for
validation and for the run alike. Nothing in a config is ever evaluated as code: the module is
imported and the attribute looked up."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable


def import_named(spec: str, label: str) -> Callable:
    """The callable ``spec`` names; a ValueError starting with ``label`` (how the caller names the key)
    saying what is wrong: the form, the import, a missing attribute, or one that is not callable.
    Modules beside the working directory import as under ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and attr.isidentifier() and module_name and all(p.isidentifier() for p in module_name.split("."))):
        raise ValueError(f"{label}: give package.module:name (a Python function to import)")
    if os.getcwd() not in sys.path:  # as ``python -m`` does: modules beside the config (envs/recall.py)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, name it
        raise ValueError(f"{label}: cannot import {module_name} ({type(e).__name__}: {e}); it must be "
                         f"importable from the working directory or PYTHONPATH") from None
    if not hasattr(module, attr):
        raise ValueError(f"{label}: module {module_name} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{label}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn
