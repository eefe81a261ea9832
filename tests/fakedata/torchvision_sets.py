"""MNIST (IDX), SVHN (.mat) and CIFAR (pickled batches) files, written byte for byte as released."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from tests.fakedata import fake_dataset

RNG_SEED = 0


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of LeCun's MNIST files."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@fake_dataset("MNISTDataModule")
def fake_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> dict[str, Any]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(RNG_SEED)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    return {"data_dir": str(root), "download": False, "batch_size": 4, "val_size": 8}


def write_svhn_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``<split>_32x32.mat`` with ``images`` as ``X`` (SVHN stores H, W, C, N) and ``labels`` as stored
    (the digit 0 as 10) as the column ``y``."""
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": np.asarray(labels).reshape(-1, 1)})


@fake_dataset("SVHNDataModule")
def fake_svhn(root: Path, n_train: int = 40, n_test: int = 20) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(RNG_SEED)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        write_svhn_split(root, split, images, (np.arange(n) % 10 + 1).astype(np.uint8))
    return {"data_dir": str(root), "download": False, "batch_size": 4, "val_size": 8}


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str = "labels") -> None:
    """Pickle one CIFAR batch: ``data`` (N, 3072) uint8 rows and their ``labels`` under ``label_key``."""
    with open(path, "wb") as handle:
        pickle.dump({"data": data, label_key: labels}, handle)


def _write_cifar(folder: Path, files: dict[str, int], label_key: str, num_classes: int, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(RNG_SEED)
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        write_cifar_batch(folder / name, data, [int(i % num_classes) for i in range(n)], label_key)
    name, content = next(iter(meta.items()))
    with open(folder / name, "wb") as handle:
        pickle.dump(content, handle)


@fake_dataset("CIFAR10DataModule")
def fake_cifar10(root: Path) -> dict[str, Any]:
    files = {f"data_batch_{i}": 8 for i in range(1, 6)} | {"test_batch": 20}
    meta = {"batches.meta": {"label_names": [f"class{i}" for i in range(10)]}}
    _write_cifar(root / "cifar-10-batches-py", files, "labels", 10, meta)
    return {"data_dir": str(root), "download": False, "batch_size": 4, "val_size": 8}


@fake_dataset("CIFAR100DataModule")
def fake_cifar100(root: Path) -> dict[str, Any]:
    meta = {"meta": {"fine_label_names": [f"class{i}" for i in range(100)]}}
    _write_cifar(root / "cifar-100-python", {"train": 40, "test": 20}, "fine_labels", 100, meta)
    return {"data_dir": str(root), "download": False, "batch_size": 4, "val_size": 8}


@fake_dataset("DigitsDataModule")
def digits_needs_no_files(root: Path) -> dict[str, Any]:
    """scikit-learn ships the digits, so nothing is written; only the batch size is shrunk."""
    return {"batch_size": 16}
