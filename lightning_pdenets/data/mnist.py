"""MNIST (LeCun et al. 1998) on torchvision: 60,000 training and 10,000 test digits, 28×28 grey."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.mnist import read_image_file, read_label_file

from lightning_pdenets.data.base import VisionDataModule

__all__ = ["MNISTDataModule"]

IDX_UNSIGNED_BYTE = 0x08  # the IDX type code of MNIST's pixels and labels


def idx_header_problem(path: Path, trailing_shape: tuple[int, ...]) -> str | None:
    """What keeps ``path`` from being an IDX file of unsigned bytes shaped (N, *trailing_shape), if anything.

    An IDX file starts with two zero bytes, its type code (0x08: unsigned bytes), its number of dimensions and one
    big-endian 32-bit size per dimension. torchvision only asserts these, with an empty message.

    Args:
        path: An MNIST images (trailing shape (28, 28)) or labels (trailing shape ()) file.
        trailing_shape: The sizes of every dimension but the first, the sample count.

    Returns:
        ``None`` if the header is right, else what is wrong with the file and why (for an error message).
    """
    ndim = 1 + len(trailing_shape)
    magic = bytes([0, 0, IDX_UNSIGNED_BYTE, ndim])
    with open(path, "rb") as handle:
        header = handle.read(len(magic) + 4 * ndim)
    if len(header) < len(magic) + 4 * ndim:
        return f"has only {len(header)} bytes, too few for its IDX header: it is truncated"
    if header[:3] != magic[:3]:
        return (
            f"starts with 0x{header[:4].hex()}, not with the magic number 0x{magic.hex()} of an IDX file of unsigned "
            f"bytes: it is corrupt or in another format"
        )
    if header[3] != ndim:
        return (
            f"has the magic number 0x{header[:4].hex()} of {header[3]}-dimensional data, where MNIST's "
            f"{'images' if trailing_shape else 'labels'} are {ndim}-dimensional (0x{magic.hex()}): it is corrupt or "
            f"from another dataset"
        )
    shape = struct.unpack(f">{ndim}I", header[len(magic) :])
    if shape[1:] != trailing_shape:
        sizes = "x".join(map(str, shape[1:]))
        return (
            f"holds images of {sizes} pixels, where MNIST's are {'x'.join(map(str, trailing_shape))}: it is from "
            f"another dataset"
        )
    return None


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
        for path, trailing_shape in zip(self.raw_files(train), (self.image_size, ())):
            problem = idx_header_problem(path, trailing_shape)
            if problem is not None:
                raise self.corrupt_file_error(path, problem)
        return datasets.MNIST(self.data_dir, train=train, transform=transform, download=False)

    def split_files(self, train: bool) -> tuple[Path, Path]:
        images, labels = self.raw_files(train)
        return images, labels

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        for path in self.raw_files(train):
            try:
                (read_image_file if "images" in path.name else read_label_file)(str(path))
            except Exception:  # the file torchvision could not read
                return path
        return None
