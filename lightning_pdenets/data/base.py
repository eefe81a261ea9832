"""Shared machinery of the image-classification datamodules.

Every datamodule exposes ``num_classes``, ``in_channels``, ``image_size``, ``mean`` and ``std``
(the normalization it applies; callbacks that attack or perturb inputs in [0, 1] pixel units
read them), downloads only in ``prepare_data`` and splits its training set into train/val
with a seeded generator, so that every rank and every rerun sees the same split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from lightning_pdenets.data.loading import check_global_batch_size, make_loader
from lightning_pdenets.errors import CorruptDatasetError, DatasetDownloadError, DatasetNotFoundError
from lightning_pdenets.validation import check_positive_int
from typing_extensions import override

__all__ = ["ClassificationDataModule", "VisionDataModule", "seeded_split", "split_sizes"]


def check_batch_and_workers(batch_size: int, num_workers: int) -> None:
    check_positive_int(batch_size, "batch_size")
    check_positive_int(num_workers, "num_workers", minimum=0)


def check_val_size(val_size: Union[int, float]) -> None:
    valid_fraction = isinstance(val_size, float) and 0.0 < val_size < 1.0
    valid_count = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 1
    if not (valid_fraction or valid_count):
        raise ValueError(f"`val_size` must be a fraction in (0, 1) or a count >= 1, got {val_size!r}.")


def split_sizes(total: int, val_size: Union[int, float]) -> tuple[int, int]:
    """(train, val) sizes from ``val_size`` given as a count or as a fraction in (0, 1)."""
    check_val_size(val_size)
    n_val = int(round(val_size * total)) if isinstance(val_size, float) else val_size
    if not 0 < n_val < total:
        raise ValueError(
            f"`val_size`={val_size!r} gives {n_val} validation samples out of {total}; "
            f"use a fraction in (0, 1) or a count between 1 and {total - 1}."
        )
    return total - n_val, n_val


def seeded_split(total: int, val_size: Union[int, float], seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train/val index lists, identical for a given ``seed`` on every process."""
    n_train, _ = split_sizes(total, val_size)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n_train]), sorted(order[n_train:])


class ClassificationDataModule(pl.LightningDataModule):
    """Batch size, workers and the four dataloaders over ``train_set``/``val_set``/``test_set``.

    Loaders come from :func:`lightning_pdenets.data.loading.make_loader`: seeded, resumable
    training order, sharded under DDP, and evaluation that sees every sample exactly once.
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int, global_batch_size: Optional[int] = None) -> None:
        super().__init__()
        check_batch_and_workers(batch_size, num_workers)
        if global_batch_size is not None:
            check_positive_int(global_batch_size, "global_batch_size")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def per_process_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return check_global_batch_size(self.global_batch_size, world_size) or self.batch_size

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return make_loader(
            dataset, self.per_process_batch_size(), train, self.seed, self.num_workers, self._completed_batches
        )

    def _completed_batches(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed if self.trainer is not None else 0

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class VisionDataModule(ClassificationDataModule):
    """Base of the torchvision-backed datamodules.

    Subclasses set the class attributes and implement :meth:`load_dataset` and :meth:`download`.

    Args:
        data_dir: Root folder of the dataset (the torchvision layout).
        download: Fetch the dataset in ``prepare_data`` if it is missing.
        batch_size: Samples per batch on each process.
        num_workers: DataLoader worker processes.
        global_batch_size: If set, the batch summed over all DDP processes; it must divide by their
            number, and overrides ``batch_size``.
        val_size: Held-out part of the training set, as a fraction in (0, 1) or a count.
        seed: Seed of the train/val split.
        normalize: Standardize with the dataset's channel mean and std.
        augment: Apply the dataset's training augmentation.
    """

    name: str = ""
    num_classes: int = 0
    in_channels: int = 0
    image_size: tuple[int, int] = (0, 0)
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: Union[int, float] = 0.1,
        seed: int = 42,
        normalize: bool = True,
        augment: bool = False,
        global_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, global_batch_size)
        check_val_size(val_size)
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.download_enabled = download
        self.val_size = val_size
        self.normalize = normalize
        self.augment = augment

    # -- what subclasses provide -----------------------------------------------------------------
    def load_dataset(self, train: bool, transform: Callable) -> Dataset:
        """The raw train or test split with ``transform``; raise ``FileNotFoundError`` when absent."""
        raise NotImplementedError

    def download(self) -> None:
        """Fetch the dataset into :attr:`data_dir`."""
        raise NotImplementedError

    def augmentations(self) -> list[Callable]:
        """Training-only augmentations applied to PIL images before ``ToTensor``."""
        return []

    # -- normalization contract read by the robustness callbacks ----------------------------------
    @property
    def mean(self) -> tuple[float, ...]:
        return self.channel_mean if self.normalize else (0.0,) * self.in_channels

    @property
    def std(self) -> tuple[float, ...]:
        return self.channel_std if self.normalize else (1.0,) * self.in_channels

    def transform(self, train: bool) -> Callable:
        steps = list(self.augmentations()) if (train and self.augment) else []
        steps.append(T.ToTensor())
        if self.normalize:
            steps.append(T.Normalize(self.channel_mean, self.channel_std))
        return T.Compose(steps)

    def missing_data_error(self, detail: str = "") -> DatasetNotFoundError:
        """The error for files that are not there (``detail`` names what was expected)."""
        return DatasetNotFoundError(
            f"{self.name} was not found under {os.path.abspath(self.data_dir)!r}{detail}. Either set "
            f"`download: true` in the data section (CLI: --data.download true) to fetch it in prepare_data, "
            f"or point `data_dir` (--data.data_dir PATH) to a folder that already holds it."
        )

    def unreadable_data_error(self, path: Optional[Union[str, Path]], error: BaseException) -> CorruptDatasetError:
        """The error for a file that is there but does not read; ``path`` is the file (``None``: not known)."""
        cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = (f"file {os.path.abspath(path)!r} is present but unreadable" if path is not None
                 else f"files under {os.path.abspath(self.data_dir)!r} are present but one is unreadable")
        removal = "Delete that file" if path is not None else "Delete the dataset's folder"
        return CorruptDatasetError(
            f"{self.name} {where} ({type(error).__name__}: {cause}): it is truncated or corrupt, e.g. by an "
            f"interrupted download or copy. {removal} and fetch it again with --data.download true, or copy an "
            f"intact one there."
        )

    def unreadable_file(self, train: bool, error: BaseException) -> Optional[Path]:
        """Which file made :meth:`load_dataset` fail with ``error`` (``None``: not known); subclasses narrow it down."""
        filename = getattr(error, "filename", None)
        return Path(filename) if isinstance(filename, (str, os.PathLike)) and os.path.isfile(filename) else None

    def load_checked(self, train: bool, transform: Callable) -> Dataset:
        """:meth:`load_dataset`, telling missing files (:class:`DatasetNotFoundError`) from unreadable ones
        (:class:`CorruptDatasetError`, naming the file), each a short message instead of a library's traceback."""
        try:
            return self.load_dataset(train=train, transform=transform)
        except (DatasetNotFoundError, CorruptDatasetError):
            raise
        except FileNotFoundError as error:  # a part of the layout is missing
            raise self.missing_data_error(f" ({error})") from error
        except Exception as error:  # numpy, pickle, scipy and torchvision raise many types for a damaged file
            raise self.unreadable_data_error(self.unreadable_file(train, error), error) from error

    # -- LightningDataModule hooks -------------------------------------------------------------
    @override
    def prepare_data(self) -> None:
        if not self.download_enabled:
            return
        target = os.path.abspath(self.data_dir)
        try:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            self.download()
        except FileNotFoundError:
            raise  # a dataset that cannot be downloaded at all says so itself
        except (OSError, RuntimeError) as error:  # URLError, timeouts, torchvision's "Error downloading ..."
            reason = " ".join(str(error).split())  # torchvision's report spans lines, one per mirror
            raise DatasetDownloadError(
                f"{self.name} could not be downloaded into {target!r}: {reason}. Check the network connection; on a "
                f"machine without one, fetch the dataset elsewhere (torchvision's own download makes the expected "
                f"layout), copy it into a folder here and run with --data.download false --data.data_dir FOLDER."
            ) from error

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_view = self.load_checked(train=True, transform=self.transform(train=True))
            eval_view = self.load_checked(train=True, transform=self.transform(train=False))
            train_idx, val_idx = seeded_split(len(train_view), self.val_size, self.seed)
            self.train_set, self.val_set = Subset(train_view, train_idx), Subset(eval_view, val_idx)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.load_checked(train=False, transform=self.transform(train=False))
