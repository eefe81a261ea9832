"""Shared machinery of the image-classification datamodules.

Every datamodule exposes ``num_classes``, ``in_channels``, ``image_size``, ``mean`` and ``std``
(the normalization it applies; callbacks that attack or perturb inputs in [0, 1] pixel units
read them), downloads only in ``prepare_data`` and splits its training set into train/val
with a seeded generator, so that every rank and every rerun sees the same split.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader
from typing_extensions import override

from lightning_pdenets.data.loading import check_global_batch_size, make_loader
from lightning_pdenets.errors import (
    ConfigurationError,
    CorruptDatasetError,
    DatasetDownloadError,
    DatasetNotFoundError,
)
from lightning_pdenets.validation import check_positive_int

__all__ = [
    "CheckedImageLoader",
    "ClassificationDataModule",
    "SampleNotFoundError",
    "StoredSplit",
    "UnreadableSampleError",
    "VisionDataModule",
    "seeded_split",
    "split_sizes",
]

# What a damaged archive raises while torchvision extracts it (gzip's is an OSError, so it is named before those).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, lzma.LZMAError, zlib.error)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".xz", ".bz2")
# System limits, not the file's fault: these stay what they are.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def _own_message(message: str, error_class: type) -> str:
    """``message`` without the worker traceback that torch's DataLoader puts around it.

    torch re-raises an error of a worker process in the main process as ``type(error)(text)``, where the text is
    "Caught X in DataLoader worker process N. Original Traceback ..." ending in ``module.X: <message>``; the
    message alone is what the user needs (the CLI prints it as one line).
    """
    marker = f"{error_class.__module__}.{error_class.__qualname__}: "
    if message.startswith("Caught ") and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


class UnreadableSampleError(CorruptDatasetError):
    """A sample's file is present but does not decode; raised while a (worker) process reads it, and still one
    short message after the DataLoader re-raised it in the main process."""

    def __init__(self, message: str) -> None:
        super().__init__(_own_message(message, type(self)))


class SampleNotFoundError(DatasetNotFoundError):
    """A sample's file, listed by the dataset, is not on disk; one short message as :class:`UnreadableSampleError`."""

    def __init__(self, message: str) -> None:
        super().__init__(_own_message(message, type(self)))


def unreadable_message(name: str, path: str | Path | None, error: BaseException, advice: str, where: str = "") -> str:
    """``name``'s file ``path`` (``None``: one under ``where``) is present but unreadable, why, and ``advice``."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = (
        f"file {os.path.abspath(path)!r} is present but unreadable"
        if path is not None
        else f"files under {os.path.abspath(where)!r} are present but one is unreadable"
    )
    return (
        f"{name} {what} ({type(error).__name__}: {cause}): it is truncated or corrupt, e.g. by an interrupted "
        f"download or copy. {advice}"
    )


class CheckedImageLoader:
    """Decodes one image file as torchvision's ``default_loader`` does, naming the file when it cannot.

    Image datasets (Tiny ImageNet, the transfer sets) read their files lazily, in DataLoader workers, so a damaged
    file shows only when a batch needs it. Checking every file in ``setup`` would decode the whole dataset (100,000
    JPEGs for Tiny ImageNet) before each run; here a happy path costs nothing and the file is checked by the very
    decode that uses it. A file that does not decode raises :class:`UnreadableSampleError`, a vanished one
    :class:`SampleNotFoundError`, each naming the file and what to do (``advice``); both reach the CLI as one line.
    Picklable (plain strings), as spawned workers need.

    Args:
        dataset: The dataset's name in messages.
        advice: What to do about a broken or missing file (how to fetch it again).
        loader: The decoder (``torchvision.datasets.folder.default_loader``: a PIL RGB image).
        size: The (height, width) every image of the dataset has, for datasets released at one size; an image of
            another size is refused (:class:`UnreadableSampleError`) instead of failing to batch with the others.
    """

    RESUME = " A fit it stopped resumes with --ckpt_path last once the files are intact."

    def __init__(
        self,
        dataset: str,
        advice: str,
        loader: Callable[[str], Any] = default_loader,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.advice = advice
        self.loader = loader
        self.size = size

    def __call__(self, path: str) -> Any:
        image = self._decode(path)
        if self.size is not None and (image.height, image.width) != self.size:
            raise UnreadableSampleError(
                f"{self.dataset} file {os.path.abspath(path)!r} is {image.width}x{image.height} pixels, but every "
                f"{self.dataset} image is {self.size[1]}x{self.size[0]}: it was replaced or resized. {self.advice}"
                f"{self.RESUME}"
            )
        return image

    def _decode(self, path: str) -> Any:
        try:
            return self.loader(path)
        except FileNotFoundError as error:
            raise SampleNotFoundError(
                f"{self.dataset} file {os.path.abspath(path)!r} is listed by the dataset but missing. {self.advice}"
                f"{self.RESUME}"
            ) from error
        except MemoryError:
            raise
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for a damaged file
            if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
                raise
            message = unreadable_message(self.dataset, path, error, self.advice) + self.RESUME
            raise UnreadableSampleError(message) from error


def check_batch_and_workers(batch_size: int, num_workers: int) -> None:
    check_positive_int(batch_size, "batch_size")
    check_positive_int(num_workers, "num_workers", minimum=0)


def check_val_size(val_size: int | float) -> None:
    valid_fraction = isinstance(val_size, float) and 0.0 < val_size < 1.0
    valid_count = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 1
    if not (valid_fraction or valid_count):
        raise ValueError(f"`val_size` must be a fraction in (0, 1) or a count >= 1, got {val_size!r}.")


def split_sizes(total: int, val_size: int | float) -> tuple[int, int]:
    """(train, val) sizes of a set of ``total`` samples, at least one each.

    Args:
        total: Samples to split.
        val_size: The validation part, as a count or as a fraction in (0, 1) (rounded to the nearest count).

    Returns:
        The number of training and of validation samples.

    Raises:
        ConfigurationError: ``val_size`` leaves no training or no validation sample.
    """
    check_val_size(val_size)
    n_val = round(val_size * total) if isinstance(val_size, float) else val_size
    if not 0 < n_val < total:
        allowed = (
            f"use a count between 1 and {total - 1} or a fraction between {1 / total:.6g} and {(total - 1) / total:.6g}"
            if total > 1
            else "a split needs at least 2 samples, one to train on and one to validate"
        )
        raise ConfigurationError(
            f"`val_size`={val_size!r} gives {n_val} validation samples out of {total}, leaving "
            f"{'no validation' if n_val <= 0 else 'no training'} sample; {allowed} (--data.val_size)."
        )
    return total - n_val, n_val


def seeded_split(total: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train/val index lists, identical for a given ``seed`` on every process."""
    n_train, _ = split_sizes(total, val_size)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n_train]), sorted(order[n_train:])


@dataclass(frozen=True)
class StoredSplit:
    """What a dataset split (or one of its files) holds: an image count and the labels that go with them.

    Attributes:
        n_images: How many images there are.
        labels: The labels as the dataset reads them, class indices (``None``: not known without decoding).
        images_file: The file that holds the images (``None``: not known).
        labels_file: The file that holds the labels (the same as ``images_file`` where one file holds both).
    """

    n_images: int
    labels: np.ndarray | None = None
    images_file: Path | None = None
    labels_file: Path | None = None


def loaded_split(dataset: Dataset) -> StoredSplit:
    """The image count and labels of a loaded dataset, where it holds them in memory.

    torchvision's array datasets keep the images in ``data`` and the labels in ``targets`` (MNIST, CIFAR) or
    ``labels`` (SVHN, STL-10); folder datasets list one label per sample in ``targets``.

    Args:
        dataset: A loaded split.

    Returns:
        Its images count and labels (``labels`` is ``None`` where the dataset does not expose them).
    """
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    data = getattr(dataset, "data", None)
    n_images = len(data) if data is not None else len(cast(Sized, dataset))
    return StoredSplit(n_images, None if labels is None else np.asarray(labels).reshape(-1))


class ClassificationDataModule(pl.LightningDataModule):
    """Batch size, workers and the four dataloaders over ``train_set``/``val_set``/``test_set``.

    Loaders come from :func:`lightning_pdenets.data.loading.make_loader`: seeded, resumable
    training order, sharded under DDP, and evaluation that sees every sample exactly once.
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int, global_batch_size: int | None = None) -> None:
        super().__init__()
        check_batch_and_workers(batch_size, num_workers)
        if global_batch_size is not None:
            check_positive_int(global_batch_size, "global_batch_size")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def per_process_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return check_global_batch_size(self.global_batch_size, world_size) or self.batch_size

    def _loader(self, dataset: Dataset | None, train: bool, split: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return make_loader(
            dataset, self.per_process_batch_size(), train, self.seed, self.num_workers, self._completed_batches, split
        )

    def _completed_batches(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed if self.trainer is not None else 0

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True, split="training")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False, split="validation")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False, split="test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False, split="predict")


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
    label_note: str = ""  # "; <how the files store the classes>", where not as the class indices (messages only)
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
        val_size: int | float = 0.1,
        seed: int = 42,
        normalize: bool = True,
        augment: bool = False,
        global_batch_size: int | None = None,
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

    def split_files(self, train: bool) -> tuple[Path, Path] | None:
        """The files of the split's images and of its labels (the same file twice where one holds both), named by
        the errors about them; ``None``: the split has no such pair of files."""
        return None

    def stored_splits(self, train: bool, whole: StoredSplit) -> list[StoredSplit]:
        """The split's files and what each holds, read only to name the one with a bad count or label.

        Args:
            train: The training split (else the test split).
            whole: What the loaded split holds (see :func:`loaded_split`).

        Returns:
            By default ``whole`` in the files of :meth:`split_files`; datasets that spread a split over several
            files (CIFAR's batches) read each.
        """
        files = self.split_files(train)
        return [replace(whole, images_file=files[0], labels_file=files[1])] if files else [whole]

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

    def missing_data_error(self, detail: str = "", advice: str = "") -> DatasetNotFoundError:
        """The error for files that are not there (``detail`` names what was expected; ``advice`` replaces the
        default one, to set ``download`` or ``data_dir``)."""
        advice = advice or (
            "Either set `download: true` in the data section (CLI: --data.download true) to fetch it in "
            "prepare_data, or point `data_dir` (--data.data_dir PATH) to a folder that already holds it."
        )
        where = os.path.abspath(self.data_dir)
        return DatasetNotFoundError(f"{self.name} was not found under {where!r}{detail}. {advice}")

    def refetch_advice(self, path: str | Path | None) -> str:
        """How to replace the broken file ``path`` (``None``: not known); datasets whose download skips a folder
        that exists say to delete the folder instead."""
        removal = "Delete that file" if path is not None else "Delete the dataset's folder"
        return f"{removal} and fetch it again with --data.download true, or copy an intact one there."

    def unreadable_data_error(self, path: str | Path | None, error: BaseException) -> CorruptDatasetError:
        """The error for a file that is there but does not read; ``path`` is the file (``None``: not known)."""
        return CorruptDatasetError(unreadable_message(self.name, path, error, self.refetch_advice(path), self.data_dir))

    def corrupt_file_error(self, path: str | Path, problem: str) -> CorruptDatasetError:
        """The error for a file that reads but holds the wrong content; ``problem`` says what is wrong and why."""
        return CorruptDatasetError(f"{self.name} file {os.path.abspath(path)!r} {problem}. {self.refetch_advice(path)}")

    def split_error(self, part: StoredSplit, train: bool) -> CorruptDatasetError | None:
        """The error for a split, or one of its files, that has no images, a label count other than its image count,
        or labels outside [0, :attr:`num_classes`).

        Args:
            part: What the split or file holds.
            train: The training split (else the test split), named where ``part`` names no file.

        Returns:
            The error naming the file and the problem, or ``None`` when ``part`` has none of these problems.
        """
        where = f"{'training' if train else 'test'} split under {os.path.abspath(self.data_dir)!r}"
        images = f"file {os.path.abspath(part.images_file)!r}" if part.images_file else where
        labels = f"file {os.path.abspath(part.labels_file)!r}" if part.labels_file else where
        if part.n_images == 0:
            problem, path = f"{images} holds no images: it is empty or truncated", part.images_file
        elif part.labels is None:
            return None
        elif len(part.labels) != part.n_images and part.images_file == part.labels_file:  # one file, or not known
            problem = f"{images} holds {part.n_images} images but {len(part.labels)} labels: it is truncated or corrupt"
            path = part.images_file
        elif len(part.labels) != part.n_images:
            problem = (
                f"{images} ({part.n_images} images) and {labels} ({len(part.labels)} labels) do not match: one is "
                f"truncated or corrupt, or they come from different releases"
            )
            path = None
        else:
            bad = np.flatnonzero((part.labels < 0) | (part.labels >= self.num_classes))
            if not bad.size:
                return None
            values = sorted(set(part.labels[bad].tolist()))
            shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
            problem = (
                f"{labels} holds {bad.size} labels outside the range [0, {self.num_classes}) of its classes (found "
                f"{shown}; the first at sample {bad[0]}{self.label_note}): it is corrupt or belongs to another dataset"
            )
            path = part.labels_file
        return CorruptDatasetError(f"{self.name} {problem}. {self.refetch_advice(path)}")

    def check_split(self, dataset: Dataset, train: bool) -> None:
        """Refuse a loaded split that has no images, a label count that differs from its image count, or labels
        outside [0, :attr:`num_classes`): each would otherwise fail deep inside training or testing (or train on
        without the images or labels it lacks). Arrays held in memory make this cheap; the files are read again
        only to name the bad one.

        Args:
            dataset: The split as :meth:`load_dataset` returned it.
            train: The training split (else the test split).

        Raises:
            CorruptDatasetError: Naming the file and what is wrong with it.
        """
        whole = loaded_split(dataset)
        error = self.split_error(whole, train)
        if error is None:
            return
        for part in self.stored_splits(train, whole):
            named = self.split_error(part, train)
            if named is not None:
                raise named
        raise error

    def image_loader(self) -> CheckedImageLoader:
        """The decoder of the dataset's image files, naming a file that is damaged or gone (see
        :class:`CheckedImageLoader`)."""
        return CheckedImageLoader(self.name, self.refetch_advice(None))

    def archive_error(self, error: BaseException) -> CorruptDatasetError:
        """The error for a downloaded archive that does not extract, naming the archives found under ``data_dir``."""
        root = Path(self.data_dir)
        found = sorted(
            {
                str(path.resolve())
                for pattern in ("*", "*/*", "*/*/*")
                for path in root.glob(pattern)
                if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)
            }
        )
        named = f"one of {found}" if len(found) > 1 else (repr(found[0]) if found else "the downloaded archive")
        cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return CorruptDatasetError(
            f"{self.name} could not be extracted: {named} is truncated or corrupt ({type(error).__name__}: {cause}), "
            f"e.g. by an interrupted download. Delete it and any folder it was partly extracted into, then run "
            f"again with --data.download true to fetch it anew."
        )

    def unreadable_file(self, train: bool, error: BaseException) -> Path | None:
        """Which file made :meth:`load_dataset` fail with ``error`` (``None``: not known); subclasses narrow it down."""
        filename = getattr(error, "filename", None)
        return Path(filename) if isinstance(filename, (str, os.PathLike)) and os.path.isfile(filename) else None

    def load_checked(self, train: bool, transform: Callable) -> Dataset:
        """:meth:`load_dataset`, telling missing files (:class:`DatasetNotFoundError`) from unreadable ones
        (:class:`CorruptDatasetError`, naming the file), each a short message instead of a library's traceback,
        and refusing a split whose counts or labels are wrong (:meth:`check_split`)."""
        try:
            dataset = self.load_dataset(train=train, transform=transform)
        except (DatasetNotFoundError, CorruptDatasetError):
            raise
        except FileNotFoundError as error:  # a part of the layout is missing
            raise self.missing_data_error(f" ({error})") from error
        except Exception as error:  # numpy, pickle, scipy and torchvision raise many types for a damaged file
            raise self.unreadable_data_error(self.unreadable_file(train, error), error) from error
        self.check_split(dataset, train)
        return dataset

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
        except ARCHIVE_ERRORS as error:  # downloaded (or found) but does not extract
            raise self.archive_error(error) from error
        except (OSError, RuntimeError) as error:  # URLError, timeouts, torchvision's "Error downloading ..."
            reason = " ".join(str(error).split())  # torchvision's report spans lines, one per mirror
            raise DatasetDownloadError(
                f"{self.name} could not be downloaded into {target!r}: {reason}. Check the network connection; on a "
                f"machine without one, fetch the dataset elsewhere (torchvision's own download makes the expected "
                f"layout), copy it into a folder here and run with --data.download false --data.data_dir FOLDER."
            ) from error

    @override
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_view = self.load_checked(train=True, transform=self.transform(train=True))
            eval_view = self.load_checked(train=True, transform=self.transform(train=False))
            train_idx, val_idx = seeded_split(len(cast(Sized, train_view)), self.val_size, self.seed)
            self.train_set, self.val_set = Subset(train_view, train_idx), Subset(eval_view, val_idx)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.load_checked(train=False, transform=self.transform(train=False))
