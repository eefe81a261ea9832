"""STL-10 (Coates, Ng & Lee 2011) on torchvision: the labeled 5,000 training and 8,000 test 96×96 images.

The 100,000 unlabeled images are not used. ``train_fraction`` trains on a class-balanced part of
the training images, as in Figure 2 of Ruthotto & Haber, "Deep Neural Networks Motivated by
Partial Differential Equations" (accuracy against the amount of training data, 10 % … 100 %).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T
from typing_extensions import override

from lightning_pdenets.data.base import VisionDataModule, split_sizes

__all__ = ["STL10DataModule", "stratified_split"]

_LABELED_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")


class _LabeledSTL10(datasets.STL10):
    """torchvision's STL-10 reader, requiring only the labeled files and not checking their MD5.

    torchvision's integrity check also demands the 2.6 GB ``unlabeled_X.bin`` and the official
    bytes; we read the same binary format but only need the four labeled files.
    """

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name in _LABELED_FILES)


def class_shares(counts: np.ndarray, n_val: int) -> np.ndarray:
    """How many of each class's ``counts`` samples go to a validation set of ``n_val`` samples.

    Each class gives its proportional share n_c · n_val / n rounded down, and the samples still missing go to the
    classes with the largest remainders (ties: the lower class first), so that the shares add up to ``n_val``
    exactly and each is within one sample of proportional (Hamilton's apportionment).

    Args:
        counts: Samples per class.
        n_val: Validation samples in all, at most ``counts.sum()``.

    Returns:
        The validation samples per class, each at most the class's count.
    """
    total = int(counts.sum())
    shares = counts * n_val // total
    remainders = counts * n_val % total
    shares[np.argsort(-remainders, kind="stable")[: n_val - int(shares.sum())]] += 1
    return shares


def stratified_split(
    labels: np.ndarray, val_size: int | float, train_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded, per-class train/val split, then keep ``train_fraction`` of each class's training part.

    The validation set has the size ``val_size`` asks for (see
    :func:`~lightning_pdenets.data.base.split_sizes`), spread over the classes in proportion to their sizes
    (:func:`class_shares`); each class then trains on round(train_fraction · m_c) of its remaining m_c samples
    (at least one). A balanced dataset thus stays balanced, and the validation set does not depend on
    ``train_fraction``.

    Args:
        labels: The class of each sample.
        val_size: Validation samples, as a count or as a fraction in (0, 1).
        train_fraction: Part of each class's training samples to keep, in (0, 1].
        seed: Seed of the split.

    Returns:
        The sorted training and validation indices, disjoint, each at least one.

    Raises:
        ConfigurationError: ``val_size`` leaves no training or no validation sample.
    """
    _, n_val = split_sizes(len(labels), val_size)
    classes, counts = np.unique(labels, return_counts=True)
    generator = torch.Generator().manual_seed(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, n_class_val in zip(classes, class_shares(counts, n_val)):
        members = np.flatnonzero(labels == label)
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        rest = members[n_class_val:]
        val_idx.extend(members[:n_class_val].tolist())
        train_idx.extend(rest[: max(1, round(train_fraction * len(rest)))].tolist())
    return sorted(train_idx), sorted(val_idx)


class STL10DataModule(VisionDataModule):
    """STL-10's labeled splits in torchvision's layout (``<data_dir>/stl10_binary/{train,test}_{X,y}.bin``).

    The validation set is a stratified, seeded part of the 5,000 training images; set
    ``val_size`` small (e.g. 10 images) to train on nearly all of them as the paper does.
    Augmentation (``augment: true``) is a random 96×96 crop with 12-pixel padding and a horizontal
    flip.

    Args:
        train_fraction: Class-balanced fraction of the training images to train on, in (0, 1].
        **kwargs: Arguments of :class:`lightning_pdenets.data.base.VisionDataModule`.
    """

    name = "STL-10"
    num_classes = 10
    in_channels = 3
    image_size = (96, 96)
    channel_mean = (0.4467, 0.4398, 0.4066)
    channel_std = (0.2603, 0.2566, 0.2713)
    label_note = "; STL-10 files store class k as k + 1, and a stored 0 reads as 255"

    def __init__(self, train_fraction: float = 1.0, **kwargs: Any) -> None:
        if (
            isinstance(train_fraction, bool)
            or not isinstance(train_fraction, (int, float))
            or not 0 < train_fraction <= 1
        ):
            raise ValueError(f"`train_fraction` must be in (0, 1] (e.g. 0.1 for 10 %), got {train_fraction!r}.")
        super().__init__(**kwargs)
        self.train_fraction = float(train_fraction)

    def download(self) -> None:
        datasets.STL10(self.data_dir, split="train", download=True)

    def augmentations(self) -> list[Callable]:
        return [T.RandomCrop(96, padding=12), T.RandomHorizontalFlip()]

    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        folder = os.path.join(self.data_dir, _LabeledSTL10.base_folder)
        missing = [name for name in _LABELED_FILES if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise self.missing_data_error(f" (expected {_LabeledSTL10.base_folder}/ with {', '.join(missing)})")
        return _LabeledSTL10(self.data_dir, split="train" if train else "test", transform=transform, download=False)

    def split_files(self, train: bool) -> tuple[Path, Path]:
        folder = Path(self.data_dir) / _LabeledSTL10.base_folder
        images, labels = (folder / f"{'train' if train else 'test'}_{part}.bin" for part in ("X", "y"))
        return images, labels

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        images, labels = self.split_files(train)
        return images if images.stat().st_size % (3 * 96 * 96) else labels  # whole 96x96x3 images, or the labels

    @override
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_view = self.load_checked(train=True, transform=self.transform(train=True))
            eval_view = self.load_checked(train=True, transform=self.transform(train=False))
            labels = np.asarray(train_view.labels)  # type: ignore[attr-defined]  # torchvision's STL10
            train_idx, val_idx = stratified_split(labels, self.val_size, self.train_fraction, self.seed)
            self.train_set, self.val_set = Subset(train_view, train_idx), Subset(eval_view, val_idx)
        super().setup(stage)
