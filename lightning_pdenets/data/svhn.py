"""SVHN (Netzer et al. 2011) on torchvision: 73,257 training and 26,032 test digits, 32×32 colour."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
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
    label_note = "; SVHN stores the digit 0 as 10"

    def download(self) -> None:
        datasets.SVHN(self.data_dir, split="train", download=True)
        datasets.SVHN(self.data_dir, split="test", download=True)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(32, padding=4)]

    def mat_file(self, train: bool) -> Path:
        """The split's ``.mat`` file, which holds its images (``X``) and labels (``y``)."""
        return Path(self.data_dir) / f"{'train' if train else 'test'}_32x32.mat"

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        # both splits up front, so that a missing test split is not found only after the whole fit
        missing = [path.name for path in (self.mat_file(True), self.mat_file(False)) if not path.is_file()]
        if missing:
            raise self.missing_data_error(f" (expected {', '.join(missing)})")
        # torchvision verifies the official file's MD5 before loading, which only the real file passes;
        # the path check above already gives the actionable error, so load the .mat directly.
        dataset = _SVHNMat(self.data_dir, split="train" if train else "test", transform=transform)
        stored = np.transpose(dataset.data, (2, 3, 1, 0))  # torchvision's (N, C, H, W) back to the file's layout
        if dataset.data.dtype != np.uint8 or stored.shape[:3] != (*self.image_size, self.in_channels):
            raise self.corrupt_file_error(
                self.mat_file(train),
                f"stores X as {dataset.data.dtype} of shape {stored.shape}, where SVHN's are uint8 pixels of shape "
                f"(32, 32, 3, N): it was written by another tool or belongs to another dataset",
            )
        return dataset

    def split_files(self, train: bool) -> tuple[Path, Path]:
        return self.mat_file(train), self.mat_file(train)

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        return self.mat_file(train)


class _SVHNMat(datasets.SVHN):
    """torchvision's SVHN loader without the MD5 gate, so any file in the official .mat format loads."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))
