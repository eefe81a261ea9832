"""MNIST (LeCun et al. 1998) on torchvision: 60,000 training and 10,000 test digits, 28×28 grey."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.mnist import read_image_file, read_label_file

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

    def raw_files(self, train: bool) -> list[Path]:
        """The split's image and label files in torchvision's layout."""
        prefix = "train" if train else "t10k"
        raw = Path(self.data_dir) / "MNIST" / "raw"
        return [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        # torchvision refuses either split unless the files of both are present
        missing = [path.name for path in self.raw_files(True) + self.raw_files(False) if not path.is_file()]
        if missing:
            raise self.missing_data_error(f" (expected MNIST/raw/ with {', '.join(missing)})")
        return datasets.MNIST(self.data_dir, train=train, transform=transform, download=False)

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        for path in self.raw_files(train):
            try:
                (read_image_file if "images" in path.name else read_label_file)(str(path))
            except Exception:  # the file torchvision could not read
                return path
        return None
