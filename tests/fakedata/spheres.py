"""Concentric spheres are generated, not read from files: the fabricator only shrinks the data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakedata import fake_dataset


@fake_dataset("ConcentricSpheresDataModule")
def fake_spheres(root: Path) -> dict[str, Any]:
    return {"num_train": 48, "num_val": 24, "num_test": 24, "batch_size": 16}
