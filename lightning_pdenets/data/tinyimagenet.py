"""Tiny ImageNet (Stanford CS231n, 2015): 200 classes of 64×64 colour images.

100,000 training images (500 per class) and 10,000 labelled validation images, which serve as
the test set (the official test images have no labels), as in Kim et al.'s PR-Net paper.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader
from torchvision.datasets.utils import download_and_extract_archive

from lightning_pdenets.data.base import CheckedImageLoader, VisionDataModule
from lightning_pdenets.errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["TinyImageNetDataModule", "TinyImageNetVal"]

ARCHIVE_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"


def read_wnids(root: str) -> list[str]:
    """The WordNet ids of ``wnids.txt`` in sorted order; a class's index is its rank here."""
    with open(os.path.join(root, "wnids.txt")) as handle:
        return sorted(line.strip() for line in handle if line.strip())


class TinyImageNetTrain(datasets.ImageFolder):
    """``train/<wnid>/images/*.JPEG`` with the classes of ``wnids.txt`` (torchvision's ImageFolder)."""

    def __init__(self, root: str, transform: Callable, loader: Callable[[str], Any] = default_loader) -> None:
        self.wnids = read_wnids(root)
        super().__init__(os.path.join(root, "train"), transform=transform, loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if folders != self.wnids:
            unlisted = sorted(set(folders) - set(self.wnids))[:3]
            absent = sorted(set(self.wnids) - set(folders))[:3]
            raise FileNotFoundError(
                f"the class folders in {directory!r} do not match wnids.txt (unlisted: {unlisted}, missing: {absent})."
            )
        return self.wnids, {wnid: index for index, wnid in enumerate(self.wnids)}


class TinyImageNetVal(Dataset):
    """``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (file, wnid, bounding box per line)."""

    def __init__(self, root: str, transform: Callable, loader: Callable[[str], Any] = default_loader) -> None:
        self.classes = read_wnids(root)
        self.class_to_idx = {wnid: index for index, wnid in enumerate(self.classes)}
        self.transform = transform
        self.loader = loader
        images = os.path.join(root, "val", "images")
        with open(os.path.join(root, "val", "val_annotations.txt")) as handle:
            rows = [line.split("\t") for line in handle if line.strip()]
        self.samples = [(os.path.join(images, row[0]), self.class_to_idx[row[1]]) for row in rows]
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


class TinyImageNetDataModule(VisionDataModule):
    """Tiny ImageNet in its official layout under ``<data_dir>/tiny-imagenet-200``.

    ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` with
    ``val/val_annotations.txt``. The 100k training images are split into train/val by
    ``val_size``; the 10k official validation images are the test set. ``download: true`` fetches
    the official archive (``http://cs231n.stanford.edu/tiny-imagenet-200.zip``, 237 MB).
    Augmentation (``augment: true``): random 64×64 crop with 4-pixel padding and horizontal flip.
    """

    name = "Tiny ImageNet"
    num_classes = 200
    in_channels = 3
    image_size = (64, 64)
    channel_mean = (0.4802, 0.4481, 0.3975)
    channel_std = (0.2770, 0.2691, 0.2821)

    @property
    def root(self) -> str:
        return os.path.join(self.data_dir, FOLDER)

    def download(self) -> None:
        if os.path.isfile(os.path.join(self.root, "wnids.txt")):
            return
        download_and_extract_archive(ARCHIVE_URL, download_root=self.data_dir, md5=ARCHIVE_MD5)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(64, padding=4), T.RandomHorizontalFlip()]

    def refetch_advice(self, path: str | Path | None) -> str:
        # download() skips a dataset whose wnids.txt exists, so a single file is not fetched again
        return (
            f"Delete the folder {os.path.abspath(self.root)!r} and run with --data.download true to extract "
            f"{os.path.basename(ARCHIVE_URL)} again (an intact copy of it in {os.path.abspath(self.data_dir)!r} "
            f"is reused, else it is downloaded), or copy an intact file there."
        )

    def image_loader(self) -> CheckedImageLoader:
        """The decoder of the images, which also refuses one that is not 64x64 as every Tiny ImageNet image is."""
        return CheckedImageLoader(self.name, self.refetch_advice(None), size=self.image_size)

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        # both splits up front, so that a missing test split is not found only after the whole fit
        required = ["wnids.txt", "train", os.path.join("val", "images"), os.path.join("val", "val_annotations.txt")]
        for name in required:
            if not os.path.exists(os.path.join(self.root, name)):
                raise self.missing_data_error(f" (expected {FOLDER}/{name})")
        wnids_file = os.path.join(self.root, "wnids.txt")
        try:
            wnids = read_wnids(self.root)
        except (UnicodeDecodeError, OSError) as error:
            raise self.unreadable_data_error(wnids_file, error) from error
        duplicates = sorted(wnid for wnid, count in Counter(wnids).items() if count > 1)
        if duplicates:
            raise self.corrupt_file_error(
                wnids_file,
                f"lists {', '.join(duplicates[:3])}{', ...' if len(duplicates) > 3 else ''} more than once, where each "
                f"class has one line: it is corrupt or was edited",
            )
        if train:
            self._check_class_folders(wnids, wnids_file)
            return TinyImageNetTrain(self.root, transform, self.image_loader())
        annotations = os.path.join(self.root, "val", "val_annotations.txt")
        try:
            return TinyImageNetVal(self.root, transform, self.image_loader())
        except (UnicodeDecodeError, IndexError, KeyError, OSError) as error:  # a cut or garbled line
            raise self.unreadable_data_error(annotations, error) from error

    def _check_class_folders(self, wnids: list[str], wnids_file: str) -> None:
        """One folder per wnid in ``train/``: an unlisted folder means a damaged wnids.txt (a cut one also lists a
        partial wnid, so this is checked first), an absent one missing data."""
        train = os.path.join(self.root, "train")
        folders = {entry.name for entry in os.scandir(train) if entry.is_dir()}
        absent = sorted(set(wnids) - folders)
        unlisted = sorted(folders - set(wnids))
        if unlisted:
            raise CorruptDatasetError(
                f"{self.name} file {os.path.abspath(wnids_file)!r} lists {len(wnids)} classes but "
                f"{os.path.abspath(train)!r} has {len(unlisted)} class folders it does not list (e.g. {unlisted[:3]}): "
                f"wnids.txt is truncated or corrupt, or a stray folder is there. {self.refetch_advice(wnids_file)}"
            )
        if absent:
            raise DatasetNotFoundError(
                f"{self.name} is incomplete under {os.path.abspath(train)!r}: no class folder for {len(absent)} of "
                f"the {len(wnids)} wnids in wnids.txt (e.g. {absent[:3]}). {self.refetch_advice(None)}"
            )
