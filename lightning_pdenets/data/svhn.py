"""SVHN (Netzer et al. 2011) on torchvision: 73,257 training and 26,032 test digits, 32×32 colour."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lightning_pdenets.data.base import VisionDataModule

__all__ = ["SVHNDataModule"]


class SVHNDataModule(VisionDataModule):
    """SVHN's cropped digits (``<data_dir>/train_32x32.mat``, ``test_32x32.mat``); ``extra`` is not used."""

    name = "SVHN"
    num_classes = 10
    in_channels = 3
    image_size = (32, 32)
    channel_mean = (0.4377, 0.4438, 0.4728)
    channel_std = (0.1980, 0.2010, 0.1970)

    def download(self) -> None:
        datasets.SVHN(self.data_dir, split="train", download=True)
        datasets.SVHN(self.data_dir, split="test", download=True)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(32, padding=4)]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        split = "train" if train else "test"
        path = os.path.join(self.data_dir, f"{split}_32x32.mat")
        if not os.path.isfile(path):
            raise self.missing_data_error(f" (expected {split}_32x32.mat)")
        # torchvision verifies the official file's MD5 before loading, which only the real file passes;
        # the path check above already gives the actionable error, so load the .mat directly.
        return _SVHNMat(self.data_dir, split=split, transform=transform)

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        return Path(self.data_dir) / f"{'train' if train else 'test'}_32x32.mat"


class _SVHNMat(datasets.SVHN):
    """torchvision's SVHN loader without the MD5 gate, so any file in the official .mat format loads."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))
