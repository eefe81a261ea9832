"""Datamodules on fabricated files in each dataset's real format: loading, splits, errors, downloads."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_pdenets.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    MNISTDataModule,
    SVHNDataModule,
    seeded_split,
)
from lightning_pdenets.errors import ConfigurationError, DatasetDownloadError
from tests.fakedata.torchvision_sets import fake_cifar10, fake_cifar100, fake_mnist, fake_svhn

VISION = [
    (MNISTDataModule, fake_mnist, (1, 28, 28)),
    (SVHNDataModule, fake_svhn, (3, 32, 32)),
    (CIFAR10DataModule, fake_cifar10, (3, 32, 32)),
    (CIFAR100DataModule, fake_cifar100, (3, 32, 32)),
]


@pytest.mark.parametrize("datamodule_class, fabricate, shape", VISION)
def test_real_loader_reads_fabricated_files(datamodule_class, fabricate, shape, tmp_path: Path) -> None:
    overrides = fabricate(tmp_path)
    dm = datamodule_class(**overrides)
    dm.setup("fit")
    dm.setup("test")
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape[1:]) == shape == (dm.in_channels, *dm.image_size)
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < dm.num_classes
    assert len(dm.train_set) + len(dm.val_set) == 40 and len(dm.val_set) == 8
    assert len(dm.test_set) == 20
    # normalization uses the published channel statistics: raw pixel p maps to (p/255 - mean) / std
    raw = dm.test_set.data[0] if hasattr(dm.test_set, "data") else None
    if datamodule_class is MNISTDataModule:
        expected = (raw.float() / 255 - 0.1307) / 0.3081
        assert torch.allclose(dm.test_set[0][0][0], expected, atol=1e-5)


def test_svhn_label_10_means_digit_zero(tmp_path: Path) -> None:
    dm = SVHNDataModule(**fake_svhn(tmp_path))
    dm.setup("test")
    labels = [dm.test_set[i][1] for i in range(10)]
    assert labels == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # fabricated y = i % 10 + 1, SVHN stores 0 as 10


@pytest.mark.parametrize("datamodule_class, fabricate, shape", VISION)
def test_missing_data_names_path_and_flag(datamodule_class, fabricate, shape, tmp_path: Path) -> None:
    dm = datamodule_class(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "--data.download true" in message and "data_dir" in message


def test_download_happens_only_in_prepare_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(MNISTDataModule, "download", lambda self: calls.append(self.data_dir))
    overrides = fake_mnist(tmp_path)
    dm = MNISTDataModule(**{**overrides, "download": True})
    dm.setup("fit")
    assert calls == []
    dm.prepare_data()
    assert calls == [str(tmp_path)]
    MNISTDataModule(**overrides).prepare_data()  # download off: prepare_data does nothing
    assert calls == [str(tmp_path)]


@pytest.mark.parametrize("datamodule_class", [MNISTDataModule, SVHNDataModule, CIFAR10DataModule, CIFAR100DataModule])
def test_failed_download_says_what_failed_and_how_to_proceed_offline(
    datamodule_class, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # torchvision's real download code runs up to here
    dm = datamodule_class(data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(DatasetDownloadError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert dm.name in message and str(tmp_path / "data") in message
    assert "--data.download false --data.data_dir" in message
    assert isinstance(info.value.__cause__, (urllib.error.URLError, RuntimeError))


def test_seeded_split_is_deterministic_and_disjoint() -> None:
    train_a, val_a = seeded_split(100, 0.2, seed=1)
    train_b, val_b = seeded_split(100, 0.2, seed=1)
    _, val_c = seeded_split(100, 0.2, seed=2)
    assert (train_a, val_a) == (train_b, val_b)
    assert val_a != val_c
    assert len(val_a) == 20 and sorted(train_a + val_a) == list(range(100))


def test_augmentation_only_on_training_view(tmp_path: Path) -> None:
    dm = MNISTDataModule(**{**fake_mnist(tmp_path), "augment": True})
    dm.setup("fit")
    torch.manual_seed(0)
    first = torch.stack([dm.train_set[0][0] for _ in range(4)])
    assert not all(torch.equal(first[0], other) for other in first[1:]), "random crop should vary"
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(batch_size=0), "`batch_size` must be an integer >= 1"),
        (dict(num_workers=-1), "`num_workers` must be an integer >= 0"),
        (dict(val_size=1.5), "`val_size` must be a fraction in"),
        (dict(val_size=0), "`val_size` must be a fraction in"),
    ],
)
def test_bad_datamodule_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MNISTDataModule(**kwargs)


def test_val_size_larger_than_dataset(tmp_path: Path) -> None:
    dm = MNISTDataModule(**{**fake_mnist(tmp_path), "val_size": 1000})
    with pytest.raises(ConfigurationError, match=r"gives 1000 validation samples out of 40.*a count between 1 and 39"):
        dm.setup("fit")


def test_digits_split_is_stratified_seeded_and_standardized() -> None:
    dm = DigitsDataModule(seed=3)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 270
    test_labels = dm.splits["test"].tensors[1].numpy()
    assert np.bincount(test_labels, minlength=10).min() >= 26  # stratified: ~27 per class
    train_x = dm.splits["train"].tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3
    again = DigitsDataModule(seed=3)
    again.setup()
    assert torch.equal(again.splits["val"].tensors[0], dm.splits["val"].tensors[0])
    with pytest.raises(ValueError, match="`val_fraction` must be a float in"):
        DigitsDataModule(val_fraction=0.7)


def test_subclassed_vision_datamodules_take_every_base_argument() -> None:
    """STL-10 and the transfer datamodules forward the VisionDataModule arguments, global_batch_size included."""
    from lightning_pdenets.data import DTDDataModule, ResizedCIFAR10DataModule, STL10DataModule

    stl10 = STL10DataModule(data_dir="elsewhere", global_batch_size=64, train_fraction=0.5)
    assert (stl10.data_dir, stl10.global_batch_size, stl10.train_fraction) == ("elsewhere", 64, 0.5)
    dtd = DTDDataModule(resize=32, partition=3, global_batch_size=32, augment=True)
    assert (dtd.resize, dtd.partition, dtd.global_batch_size, dtd.augment) == (32, 3, 32, True)
    assert ResizedCIFAR10DataModule(resize=48, val_size=100).val_size == 100
    with pytest.raises(ValueError, match=r"`partition` must be an integer in \[1, 10\]"):
        DTDDataModule(partition=11)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    """Make the loaders built here believe they run on ``rank`` of a ``world_size``-process group."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: world_size)
    monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: rank)


@pytest.mark.parametrize(("train", "split", "size"), [(False, "validation", 3), (True, "training", 2)])
def test_a_split_smaller_than_the_process_count_is_refused_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, train: bool, split: str, size: int
) -> None:
    from torch.utils.data import TensorDataset

    from lightning_pdenets.data.loading import make_loader

    _as_rank(monkeypatch, rank=3, world_size=4)  # rank 3 of 4 holds none of 3 evaluation samples
    small = TensorDataset(torch.arange(size))
    with pytest.raises(ConfigurationError, match=rf"at least 4 samples or run on at most {size} devices"):
        make_loader(small, batch_size=8, train=train, seed=0)
    with pytest.raises(ConfigurationError, match=rf"The {split} split has {size} samples, fewer than the 4 processes"):
        make_loader(small, batch_size=8, train=train, seed=0, split=split if not train else None)
    assert len(make_loader(TensorDataset(torch.arange(4)), batch_size=8, train=train, seed=0)) == 1  # one each
    assert len(make_loader(TensorDataset(torch.arange(0)), batch_size=8, train=False, seed=0)) == 0  # empty: allowed
