"""Backends: one module or folder per backend, each registering itself (see `backends.registry`).

`discover()` (called by the registry on first use) imports every backend module in this package once;
they import their heavy libraries lazily, so `registry.names()` lists them all at no cost and nothing
else keeps a list of backend names. Adding a backend is adding its module or folder here.
"""

from __future__ import annotations

import importlib
import pkgutil

_NOT_BACKENDS = {"base", "registry"}
_DISCOVERED: list[str] = []


def discover() -> list[str]:
    """Import every backend module of this package (once); -> their module names."""
    if not _DISCOVERED:
        mods = sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "pytorch", m.name))  # torch first
        for mod in mods:
            if mod.name not in _NOT_BACKENDS and not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")
                _DISCOVERED.append(mod.name)
    return list(_DISCOVERED)
