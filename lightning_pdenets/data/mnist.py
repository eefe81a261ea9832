"""MNIST (LeCun et al. 1998) on torchvision: 60,000 training and 10,000 test digits, 28×28 grey."""

from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lightning_pdenets.data.base import VisionDataModule

__all__ = ["MNISTDataModule"]


class MNISTDataModule(VisionDataModule):
    """MNIST in torchvision's layout (``<data_dir>/MNIST/raw/*-ubyte``); the 10k test set is the test split."""

    name = "MNIST"
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    channel_mean = (0.1307,)
    channel_std = (0.3081,)

    def download(self) -> None:
        datasets.MNIST(self.data_dir, train=True, download=True)
        datasets.MNIST(self.data_dir, train=False, download=True)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(28, padding=4)]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        try:
            return datasets.MNIST(self.data_dir, train=train, transform=transform, download=False)
        except RuntimeError as error:
            raise self.missing_data_error(" (expected MNIST/raw/*-idx?-ubyte files)") from error
