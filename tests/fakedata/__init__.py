"""Fabricators of tiny datasets in each dataset's exact on-disk format.

Each module in this folder decorates a function with ``@fake_dataset("ClassName")``; the function
takes a directory, writes the files there, and returns the ``init_args`` overrides that point
the datamodule ``ClassName`` at them (``data_dir``, ``download: false``, a small batch size).
``tests/test_configs.py`` uses this table to run every config on fabricated data.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAKE_DATASETS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def fake_dataset(datamodule_name: str) -> Callable:
    def decorate(function: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
        FAKE_DATASETS[datamodule_name] = function
        return function

    return decorate


def load_all() -> dict[str, Callable[[Path], dict[str, Any]]]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return FAKE_DATASETS
