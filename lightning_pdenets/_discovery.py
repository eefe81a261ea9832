"""Import every public submodule of a package and collect the names in their ``__all__``.

This is what makes "one new module" enough to add an architecture, model, datamodule or
callback: the package ``__init__`` re-exports whatever its modules declare, so configs can use
short class paths such as ``lightning_pdenets.models.ODENetModule``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any


def import_class(class_path: str) -> type | None:
    """The class named by a dotted path such as ``lightning_pdenets.models.ODENetModule``, or None if there is none."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def export_submodules(package_name: str, package_path: Iterable[str]) -> dict[str, Any]:
    """Import ``package_name``'s non-underscore submodules; return ``{name: object}`` of their ``__all__``."""
    exports: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name in exports and exports[name] is not getattr(module, name):
                raise ImportError(f"{package_name}: {name!r} is exported by two modules")
            exports[name] = getattr(module, name)
    return exports
