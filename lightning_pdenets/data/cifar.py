"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) on torchvision: 50,000 training and 10,000 test 32×32 images."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lightning_pdenets.data.base import StoredSplit, VisionDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


def _without_md5(dataset_class: type) -> Any:
    """torchvision's CIFAR loader, checking that the batch files exist instead of their MD5.

    The actionable missing-data error is raised before loading, and the MD5 gate would reject
    files in the official pickle format that are not the official bytes (as in the tests).
    """

    class Loader(dataset_class):
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"CIFAR metadata file {path} not found")
            with open(path, "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    Loader.__name__ = dataset_class.__name__
    return Loader


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 in torchvision's layout (``<data_dir>/cifar-10-batches-py``).

    Augmentation (``augment: true``) is the standard random 32×32 crop with 4-pixel padding and a
    horizontal flip (He et al. 2016).
    """

    name = "CIFAR-10"
    num_classes = 10
    in_channels = 3
    image_size = (32, 32)
    channel_mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    channel_std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    torchvision_class = datasets.CIFAR10

    def download(self) -> None:
        self.torchvision_class(self.data_dir, train=True, download=True)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        loader = _without_md5(self.torchvision_class)
        folder = os.path.join(self.data_dir, loader.base_folder)
        if not os.path.isdir(folder):
            raise self.missing_data_error(f" (expected {loader.base_folder}/)")
        names = [name for name, _ in loader.train_list + loader.test_list] + [loader.meta["filename"]]
        missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise self.missing_data_error(f" (incomplete {loader.base_folder}/: no {', '.join(missing)})")
        return loader(self.data_dir, train=train, transform=transform, download=False)

    def batch_files(self, train: bool) -> list[Path]:
        """The pickled batches of the split, each a dict with the images (``data``) and their labels."""
        loader = self.torchvision_class
        folder = Path(self.data_dir) / loader.base_folder
        return [folder / name for name, _ in (loader.train_list if train else loader.test_list)]

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        meta = Path(self.data_dir) / self.torchvision_class.base_folder / self.torchvision_class.meta["filename"]
        for path in [*self.batch_files(train), meta]:
            try:
                with open(path, "rb") as handle:
                    pickle.load(handle, encoding="latin1")
            except Exception:  # the file torchvision could not unpickle
                return path
        return None

    def stored_splits(self, train: bool, whole: StoredSplit) -> list[StoredSplit]:
        parts = []
        for path in self.batch_files(train):
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]  # as torchvision reads them
            parts.append(StoredSplit(len(entry["data"]), np.asarray(labels).reshape(-1), path, path))
        return parts


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) in torchvision's layout (``<data_dir>/cifar-100-python``)."""

    name = "CIFAR-100"
    num_classes = 100
    channel_mean: tuple[float, ...] = (0.5071, 0.4865, 0.4409)
    channel_std: tuple[float, ...] = (0.2673, 0.2564, 0.2762)
    torchvision_class = datasets.CIFAR100
