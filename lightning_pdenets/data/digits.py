"""scikit-learn's bundled handwritten digits: 1,797 real 8×8 images, no download needed."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from lightning.pytorch.utilities.parsing import AttributeDict
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_pdenets.data.base import ClassificationDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ClassificationDataModule):
    """The UCI optical-recognition digits shipped with scikit-learn, the framework's offline default.

    Pixel values 0..16 are scaled to [0, 1]; the split into train/val/test is stratified and
    seeded, so every run and every rank sees the same samples.

    Args:
        batch_size: Samples per batch on each process.
        val_fraction: Share of all samples held out for validation.
        test_fraction: Share of all samples held out for testing.
        seed: Seed of the split.
        normalize: Standardize with the training split's mean and std.
        num_workers: DataLoader worker processes.
        global_batch_size: If set, the batch summed over all DDP processes (overrides ``batch_size``).
    """

    name = "digits"
    num_classes = 10
    in_channels = 1
    image_size = (8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        normalize: bool = True,
        num_workers: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, global_batch_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(value, float) or not 0.0 < value < 0.5:
                raise ValueError(f"`{name}` must be a float in (0, 0.5), got {value!r}.")
        self.save_hyperparameters()
        self.normalize = normalize
        self.mean: tuple[float, ...] = (0.0,)
        self.std: tuple[float, ...] = (1.0,)
        self.splits: dict[str, TensorDataset] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        images = digits.images.astype(np.float32)[:, None] / 16.0
        labels = digits.target.astype(np.int64)
        hp = cast(AttributeDict, self.hparams)  # save_hyperparameters() makes an AttributeDict
        rest_x, test_x, rest_y, test_y = train_test_split(
            images, labels, test_size=hp.test_fraction, stratify=labels, random_state=hp.seed
        )
        train_x, val_x, train_y, val_y = train_test_split(
            rest_x, rest_y, test_size=hp.val_fraction / (1 - hp.test_fraction), stratify=rest_y, random_state=hp.seed
        )
        if self.normalize:
            self.mean, self.std = (float(train_x.mean()),), (float(train_x.std()),)
        for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y), ("test", test_x, test_y)):
            x = (torch.from_numpy(x) - self.mean[0]) / self.std[0]
            self.splits[split] = TensorDataset(x, torch.from_numpy(y))
        self.train_set, self.val_set, self.test_set = self.splits["train"], self.splits["val"], self.splits["test"]
