"""Transfer-learning targets of Kim et al.'s PR-Net paper (Table 5), resized to the source model's input.

CIFAR-10/100 (Krizhevsky 2009, reusing :mod:`lightning_pdenets.data.cifar`), FGVC Aircraft (Maji et al.
2013, 100 variants), Food-101 (Bossard et al. 2014), DTD (Cimpoi et al. 2014, 47 textures) and
Stanford Cars (Krause et al. 2013, 196 models), all read by torchvision in its own layout.

Every module resizes images to ``resize × resize`` (64 for Tiny ImageNet sources: shorter side to
``resize``, then a center crop) and, by default, standardizes with the *source* dataset's channel
statistics (Tiny ImageNet), which the pretrained stem was trained on.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets
from torchvision import transforms as T

from lightning_pdenets.data.base import (
    _RESOURCE_ERRNOS,
    CheckedImageLoader,
    SampleNotFoundError,
    UnreadableSampleError,
    VisionDataModule,
    unreadable_message,
)
from lightning_pdenets.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_pdenets.data.tinyimagenet import TinyImageNetDataModule
from lightning_pdenets.errors import DatasetNotFoundError
from lightning_pdenets.validation import check_positive_int

__all__ = [
    "DTDDataModule",
    "FGVCAircraftDataModule",
    "Food101DataModule",
    "ResizedCIFAR10DataModule",
    "ResizedCIFAR100DataModule",
    "StanfordCarsDataModule",
]


class _ResizedTransfer:
    """Mixin: resize to the source model's input size, standardize with the source's statistics.

    Args (besides those of :class:`VisionDataModule`):
        resize: Side of the square images the source model takes (64 for Tiny ImageNet).
    """

    channel_mean: tuple[float, ...] = TinyImageNetDataModule.channel_mean
    channel_std: tuple[float, ...] = TinyImageNetDataModule.channel_std

    def __init__(self, resize: int = 64, **kwargs: Any) -> None:
        check_positive_int(resize, "resize")
        super().__init__(**kwargs)
        self.resize = resize
        self.image_size = (resize, resize)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(self.resize, padding=self.resize // 16), T.RandomHorizontalFlip()]

    def transform(self, train: bool) -> Callable:
        resize = [T.Resize(self.resize, antialias=True), T.CenterCrop(self.resize)]
        return T.Compose(resize + list(super().transform(train).transforms))  # type: ignore[misc]


class ResizedCIFAR10DataModule(_ResizedTransfer, CIFAR10DataModule):
    """CIFAR-10 (torchvision layout, see :class:`CIFAR10DataModule`) resized to ``resize`` for transfer."""


class ResizedCIFAR100DataModule(_ResizedTransfer, CIFAR100DataModule):
    """CIFAR-100 (torchvision layout, see :class:`CIFAR100DataModule`) resized to ``resize`` for transfer."""


class _TorchvisionTransfer(_ResizedTransfer, VisionDataModule):
    """A torchvision dataset found under ``<data_dir>/<folder>``; subclasses name the splits and their annotation
    files. Images are decoded by :meth:`image_loader`, which names a damaged one when a batch reads it."""

    folder = ""

    @property
    def dataset_folder(self) -> str:
        """The folder torchvision's download extracts into and skips when it exists."""
        return os.path.join(self.data_dir, self.folder)

    def refetch_advice(self, path: str | Path | None) -> str:
        # torchvision's download returns early while the dataset's folder exists, so a single file is not fetched
        return (
            f"Delete the folder {os.path.abspath(self.dataset_folder)!r} and run with --data.download true to "
            f"extract the dataset again (its downloaded archive is reused), or copy an intact file there."
        )

    def metadata_files(self, train: bool) -> list[Path]:
        """The annotation files torchvision reads for the split (in the order it reads them)."""
        return []

    def _require_folder(self) -> None:
        if not os.path.isdir(self.dataset_folder):
            raise self.missing_data_error(f" (expected {self.folder}/)")

    def _load(self, make: Callable[[], Dataset]) -> Dataset:
        self._require_folder()
        try:
            dataset = make()
        except (RuntimeError, OSError, KeyError) as error:
            # torchvision's own presence check says "not found"; anything else read a file and failed
            if isinstance(error, FileNotFoundError) or "not found" in str(error).lower():
                raise self.missing_data_error(
                    f" (incomplete {self.folder}/: {error})",
                    f"Delete the incomplete folder {os.path.abspath(self.dataset_folder)!r} and run with "
                    f"--data.download true to fetch and extract it again, or point `data_dir` (--data.data_dir PATH) "
                    f"to a folder that holds the whole dataset.",
                ) from error
            raise
        if isinstance(dataset, ConcatDataset):
            return ConcatDataset([self._checked(part) for part in dataset.datasets])
        return self._checked(dataset)

    def _checked(self, dataset: Dataset) -> Dataset:
        """``dataset`` decoding through :meth:`image_loader`, which names a damaged file when a batch reads it."""
        if "loader" in inspect.signature(type(dataset).__init__).parameters:
            dataset.loader = self.image_loader()  # type: ignore[attr-defined]  # __getitem__ decodes with self.loader
            return dataset
        return CheckedDecoding(dataset, self.image_loader(), os.path.abspath(self.dataset_folder))

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        """The annotation file that made loading fail: the error's own file, or the first that does not parse."""
        named = super().unreadable_file(train, error)
        if named is not None:
            return named
        for path in self.metadata_files(train):
            if path.is_file() and not _parses(path):
                return path
        return None


class CheckedDecoding(Dataset):
    """A torchvision dataset that opens its images with PIL itself, its read errors named as
    :class:`~lightning_pdenets.data.base.CheckedImageLoader` names them.

    torchvision's FGVCAircraft, Food101, DTD and StanfordCars take a ``loader`` from torchvision 0.22 on
    (pytorch/vision#8939); before, ``__getitem__`` calls ``PIL.Image.open`` and the checked loader cannot be put in.
    A damaged file is then named by its dataset folder (PIL's error does not carry the path), a missing one by path.
    """

    # what PIL raises for a damaged file (UnidentifiedImageError and "Truncated File Read" are OSErrors); a
    # transform's own errors (ValueError, TypeError, RuntimeError) stay what they are
    DECODE_ERRORS = (OSError, SyntaxError, EOFError, struct.error)

    def __init__(self, dataset: Dataset, loader: CheckedImageLoader, folder: str) -> None:
        self.dataset = dataset
        self.loader = loader
        self.folder = folder

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except FileNotFoundError as error:
            raise SampleNotFoundError(
                f"{self.loader.dataset} file {error.filename!r} is listed by the dataset but missing. "
                f"{self.loader.advice}{self.loader.RESUME}"
            ) from error
        except self.DECODE_ERRORS as error:
            if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
                raise
            message = unreadable_message(self.loader.dataset, None, error, self.loader.advice, where=self.folder)
            raise UnreadableSampleError(message + self.loader.RESUME) from error


def _parses(path: Path) -> bool:
    """Whether an annotation file reads in its format (.mat, .json, or UTF-8 text that ends its last line)."""
    try:
        if path.suffix == ".mat":
            import scipy.io

            scipy.io.loadmat(str(path))
            return True
        text = path.read_bytes().decode("utf-8")
        if path.suffix == ".json":
            json.loads(text)
            return True
        return text.endswith("\n") or not text  # written line by line: a cut file ends inside a line
    except Exception:  # scipy, json and the codec raise many types
        return False


class FGVCAircraftDataModule(_TorchvisionTransfer):
    """FGVC Aircraft, 100 variants (``<data_dir>/fgvc-aircraft-2013b``); trains on ``trainval``, tests on ``test``."""

    name = "FGVC Aircraft"
    num_classes = 100
    in_channels = 3
    folder = "fgvc-aircraft-2013b"

    def download(self) -> None:
        datasets.FGVCAircraft(self.data_dir, split="trainval", download=True)

    def metadata_files(self, train: bool) -> list[Path]:
        data = Path(self.dataset_folder) / "data"
        return [data / "variants.txt", data / f"images_variant_{'trainval' if train else 'test'}.txt"]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        split = "trainval" if train else "test"
        return self._load(lambda: datasets.FGVCAircraft(self.data_dir, split=split, transform=transform))


class Food101DataModule(_TorchvisionTransfer):
    """Food-101 (``<data_dir>/food-101``): 75,750 training and 25,250 test images of 101 dishes."""

    name = "Food-101"
    num_classes = 101
    in_channels = 3
    folder = "food-101"

    def download(self) -> None:
        datasets.Food101(self.data_dir, split="train", download=True)

    def metadata_files(self, train: bool) -> list[Path]:
        return [Path(self.dataset_folder) / "meta" / f"{'train' if train else 'test'}.json"]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        split = "train" if train else "test"
        return self._load(lambda: datasets.Food101(self.data_dir, split=split, transform=transform))


class DTDDataModule(_TorchvisionTransfer):
    """Describable Textures (``<data_dir>/dtd/dtd``), 47 classes; trains on train+val of ``partition``, tests on test.

    Args:
        partition: Which of DTD's ten official splits (1-10).
    """

    name = "DTD"
    num_classes = 47
    in_channels = 3
    folder = os.path.join("dtd", "dtd")

    def __init__(self, partition: int = 1, **kwargs: Any) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int) or not 1 <= partition <= 10:
            raise ValueError(f"`partition` must be an integer in [1, 10] (DTD's ten splits), got {partition!r}.")
        super().__init__(**kwargs)
        self.partition = partition

    def download(self) -> None:
        datasets.DTD(self.data_dir, split="train", download=True)

    def metadata_files(self, train: bool) -> list[Path]:
        labels = Path(self.dataset_folder) / "labels"
        return [labels / f"{split}{self.partition}.txt" for split in (("train", "val") if train else ("test",))]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        def make(split: str) -> Dataset:
            return datasets.DTD(self.data_dir, split=split, partition=self.partition, transform=transform)

        if train:
            return self._load(lambda: ConcatDataset([make("train"), make("val")]))
        return self._load(lambda: make("test"))


class StanfordCarsDataModule(_TorchvisionTransfer):
    """Stanford Cars, 196 models (``<data_dir>/stanford_cars``: ``devkit/``, ``cars_train/``, ``cars_test/``,
    ``cars_test_annos_withlabels.mat``). The original download URL is gone: fetch the files by hand
    (e.g. from a Kaggle mirror) into that layout.
    """

    name = "Stanford Cars"
    num_classes = 196
    in_channels = 3
    folder = "stanford_cars"

    def download(self) -> None:
        if os.path.isdir(os.path.join(self.data_dir, self.folder, "devkit")):
            return
        raise DatasetNotFoundError(
            f"Stanford Cars cannot be downloaded any more (the official URL is broken) and was not found under "
            f"{os.path.abspath(os.path.join(self.data_dir, self.folder))!r}. Place devkit/, cars_train/, cars_test/ "
            f"and cars_test_annos_withlabels.mat there by hand, then set `download: false`."
        )

    def refetch_advice(self, path: str | Path | None) -> str:
        return (
            "Replace it with an intact copy from where you fetched the dataset (there is no download), e.g. "
            "the Kaggle mirror."
        )

    def metadata_files(self, train: bool) -> list[Path]:
        base = Path(self.dataset_folder)
        annotations = base / "devkit" / "cars_train_annos.mat" if train else base / "cars_test_annos_withlabels.mat"
        return [annotations, base / "devkit" / "cars_meta.mat"]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        split = "train" if train else "test"
        return self._load(lambda: datasets.StanfordCars(self.data_dir, split=split, transform=transform))
