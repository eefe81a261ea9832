"""STL-10 binary files as released (``stl10_binary/``): uint8 images, column-major per channel, labels 1..10."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.fakedata import fake_dataset

RNG_SEED = 0
CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def write_stl10_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images`` (N, 3, 96, 96) and 0-based ``labels`` as ``<split>_X.bin`` / ``<split>_y.bin``.

    STL-10 stores each channel in column-major order (torchvision transposes the last two axes
    after reading) and labels 1..10.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(
        np.ascontiguousarray(images.transpose(0, 1, 3, 2)).astype(np.uint8).tobytes()
    )
    (folder / f"{split}_y.bin").write_bytes((labels.astype(np.uint8) + 1).tobytes())


@fake_dataset("STL10DataModule")
def fake_stl10(root: Path, n_train: int = 40, n_test: int = 20) -> dict[str, Any]:
    folder = root / "stl10_binary"
    rng = np.random.default_rng(RNG_SEED)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        write_stl10_split(folder, split, images, np.arange(n) % 10)
    (folder / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    folds = [" ".join(str(i) for i in range(k, n_train, 10)) for k in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    return {"data_dir": str(root), "download": False, "batch_size": 4, "val_size": 10}
