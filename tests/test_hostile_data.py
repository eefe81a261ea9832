"""Issue 28, items 2 and 6: a missing dataset and an unreadable one are told apart, each in a short message; and
files that read but hold the wrong content (labels out of range, counts that differ, empty splits, other layouts) are
refused at setup, naming the file, instead of failing deep inside training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_pdenets.data import CIFAR10DataModule, MNISTDataModule, STL10DataModule, SVHNDataModule
from lightning_pdenets.data.base import VisionDataModule
from lightning_pdenets.errors import ConfigurationError, CorruptDatasetError, DatasetNotFoundError
from tests.conftest import REPO_ROOT
from tests.fakedata.stl10 import fake_stl10
from tests.fakedata.torchvision_sets import (
    fake_cifar10,
    fake_mnist,
    fake_svhn,
    write_cifar_batch,
    write_idx,
    write_svhn_split,
)
from tests.test_hostile_resume import TINY, run

pytestmark = pytest.mark.cli

MNIST = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--model.init_args.network.width=8",
    "--data=lightning_pdenets.data.MNISTDataModule",
    *TINY,
]


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def assert_nothing_written(root: Path) -> None:
    """No log folder of the failed run: a config error leaves no empty version_N behind."""
    assert not list((root / "logs").glob("**/version_*")), list((root / "logs").rglob("*"))


def test_a_truncated_mnist_file_is_named_with_the_real_cause(tmp_path: Path, capsys) -> None:
    fake_mnist(tmp_path / "data")
    broken = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    truncate(broken)
    code, err = run(["fit", *MNIST, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: ")
    assert f"{str(broken)!r} is present but unreadable" in err and "is invalid for input of size" in err
    assert "Delete that file and fetch it again with --data.download true" in err
    assert "was not found" not in err
    assert broken.stat().st_size == 1000  # nothing deleted for the user
    assert_nothing_written(tmp_path)


def test_a_missing_data_dir_is_a_short_error_naming_the_folder(tmp_path: Path, capsys) -> None:
    code, err = run(["fit", *MNIST, "--data.init_args.data_dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) <= 2
    assert f"MNIST was not found under {str(tmp_path / 'nowhere')!r}" in err and "--data.download true" in err
    assert_nothing_written(tmp_path)


def test_one_missing_mnist_file_is_named(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"expected MNIST/raw/ with t10k-labels-idx1-ubyte\)"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    ("datamodule_class", "fabricate", "file"),
    [
        (SVHNDataModule, fake_svhn, "train_32x32.mat"),
        (CIFAR10DataModule, fake_cifar10, "cifar-10-batches-py/data_batch_1"),
        (STL10DataModule, fake_stl10, "stl10_binary/train_X.bin"),
    ],
)
def test_an_unreadable_file_is_told_from_a_missing_one(datamodule_class, fabricate, file: str, tmp_path: Path) -> None:
    settings = fabricate(tmp_path)
    truncate(tmp_path / file, keep=101)
    with pytest.raises(CorruptDatasetError) as error:
        datamodule_class(**settings).setup("fit")
    assert f"{str(tmp_path / file)!r} is present but unreadable" in str(error.value)


def test_following_the_advice_offline_ends_in_one_line_too(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--data.download true` on a machine without network: torchvision's report spans a line per mirror."""

    def offline(self) -> None:
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n"
            "<urlopen error [Errno -2] Name or service not known>\n"
        )

    monkeypatch.setattr(MNISTDataModule, "download", offline)
    code, err = run(
        ["fit", *MNIST, "--data.init_args.data_dir", str(tmp_path / "data"), "--data.init_args.download=true"], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) <= 2
    assert "could not be downloaded" in err and "Name or service not known" in err and "--data.data_dir" in err
    assert_nothing_written(tmp_path)


# -- files that read but hold the wrong content -------------------------------------------------------------------
RNG = np.random.default_rng(0)


def mnist_labels(root: Path, prefix: str, labels: np.ndarray) -> list[str]:
    write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return [f"MNIST/raw/{prefix}-labels-idx1-ubyte"]


def svhn_train(root: Path, n_images: int, stored_labels: np.ndarray) -> list[str]:
    write_svhn_split(root, "train", RNG.integers(0, 256, (32, 32, 3, n_images), dtype=np.uint8), stored_labels)
    return ["train_32x32.mat"]


def cifar_batch(root: Path, n_images: int, labels: list[int]) -> list[str]:
    data = RNG.integers(0, 256, (n_images, 3 * 32 * 32), dtype=np.uint8)
    write_cifar_batch(root / "cifar-10-batches-py" / "data_batch_2", data, labels)
    return ["cifar-10-batches-py/data_batch_2"]


def stl10_labels(root: Path, split: str, stored_labels: np.ndarray) -> list[str]:
    (root / "stl10_binary" / f"{split}_y.bin").write_bytes(stored_labels.astype(np.uint8).tobytes())
    return [f"stl10_binary/{split}_y.bin"]


def setup_error(datamodule_class: type[VisionDataModule], settings: dict[str, Any], stage: str) -> str:
    """The message of the CorruptDatasetError that ``setup(stage)`` raises."""
    with pytest.raises(CorruptDatasetError) as error:
        datamodule_class(**settings).setup(stage)
    return str(error.value)


BadFiles = Callable[[Path], list[str]]  # breaks the files under a fabricated dataset, returns the ones to name


@pytest.mark.parametrize(
    ("datamodule_class", "fabricate", "stage", "damage", "shown"),
    [
        (MNISTDataModule, fake_mnist, "fit", lambda r: mnist_labels(r, "train", np.arange(40) % 15), "10, 11, 12"),
        (MNISTDataModule, fake_mnist, "test", lambda r: mnist_labels(r, "t10k", np.arange(20) % 10 + 200), "200"),
        (SVHNDataModule, fake_svhn, "fit", lambda r: svhn_train(r, 40, np.full(40, 11)), "found 11;"),
        (CIFAR10DataModule, fake_cifar10, "fit", lambda r: cifar_batch(r, 8, [3] * 7 + [12]), "found 12;"),
        (STL10DataModule, fake_stl10, "fit", lambda r: stl10_labels(r, "train", np.arange(40) % 10 + 2), "found 10;"),
        (STL10DataModule, fake_stl10, "test", lambda r: stl10_labels(r, "test", np.arange(20) % 10), "255"),
    ],
    ids=["mnist-train", "mnist-test", "svhn", "cifar10", "stl10-label-11", "stl10-test-label-0"],
)
def test_labels_out_of_range_are_refused_at_setup_naming_the_file(
    datamodule_class, fabricate, stage: str, damage: BadFiles, shown: str, tmp_path: Path
) -> None:
    settings = fabricate(tmp_path)
    [file] = damage(tmp_path)
    message = setup_error(datamodule_class, settings, stage)
    assert f"file {str(tmp_path / file)!r} holds" in message
    assert "labels outside the range [0, 10)" in message and shown in message
    assert "Delete that file and fetch it again" in message


@pytest.mark.parametrize(
    ("datamodule_class", "fabricate", "damage", "counts"),
    [
        (MNISTDataModule, fake_mnist, lambda r: mnist_labels(r, "train", np.arange(30) % 10), "(40 images)"),
        (MNISTDataModule, fake_mnist, lambda r: mnist_labels(r, "train", np.arange(60) % 10), "(60 labels)"),
        (SVHNDataModule, fake_svhn, lambda r: svhn_train(r, 40, np.arange(30) % 10 + 1), "40 images but 30 labels"),
        (CIFAR10DataModule, fake_cifar10, lambda r: cifar_batch(r, 8, [1] * 5), "8 images but 5 labels"),
        (STL10DataModule, fake_stl10, lambda r: stl10_labels(r, "train", np.arange(45) % 10 + 1), "(45 labels)"),
    ],
    ids=["mnist-fewer-labels", "mnist-more-labels", "svhn", "cifar10", "stl10"],
)
def test_image_and_label_counts_that_differ_are_refused_naming_the_files(
    datamodule_class, fabricate, damage: BadFiles, counts: str, tmp_path: Path
) -> None:
    settings = fabricate(tmp_path)
    [labels_file] = damage(tmp_path)
    message = setup_error(datamodule_class, settings, "fit")
    assert f"{str(tmp_path / labels_file)!r}" in message and counts in message
    images_file = {"MNIST/raw/train-labels-idx1-ubyte": "MNIST/raw/train-images-idx3-ubyte"}.get(
        labels_file, labels_file.replace("_y.bin", "_X.bin")
    )
    assert f"{str(tmp_path / images_file)!r}" in message  # two-file formats name both


@pytest.mark.parametrize("empty_labels", [False, True], ids=["labels-kept", "labels-empty-too"])
def test_an_empty_stl10_test_split_is_refused(empty_labels: bool, tmp_path: Path) -> None:
    settings = fake_stl10(tmp_path)
    images = tmp_path / "stl10_binary" / "test_X.bin"
    images.write_bytes(b"")
    if empty_labels:
        (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(b"")
    message = setup_error(STL10DataModule, settings, "test")
    assert f"file {str(images)!r} holds no images" in message


@pytest.mark.parametrize(
    ("x", "problem"),
    [
        (RNG.random((32, 32, 3, 40)), "stores X as float64 of shape (32, 32, 3, 40)"),
        (RNG.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), "stores X as uint8 of shape (40, 32, 32, 3)"),
    ],
    ids=["float-pixels", "n-first-layout"],
)
def test_an_svhn_file_in_another_layout_is_named(x: np.ndarray, problem: str, tmp_path: Path) -> None:
    settings = fake_svhn(tmp_path)
    write_svhn_split(tmp_path, "train", x, np.arange(40) % 10 + 1)
    message = setup_error(SVHNDataModule, settings, "fit")
    assert f"file {str(tmp_path / 'train_32x32.mat')!r} {problem}" in message
    assert "uint8 pixels of shape (32, 32, 3, N)" in message and "val_size" not in message


def test_svhn_without_its_test_file_is_refused_before_the_fit(tmp_path: Path) -> None:
    settings = fake_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"SVHN was not found under .*\(expected test_32x32\.mat\)"):
        SVHNDataModule(**settings).setup("fit")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (RNG.bytes(5000), "not with the magic number 0x00000803 of an IDX file"),
        (b"\x00\x00", "has only 2 bytes, too few for its IDX header"),
        (None, "magic number 0x00000804 of 4-dimensional data, where MNIST's images are 3-dimensional"),
    ],
    ids=["garbage", "cut-header", "four-dimensional"],
)
def test_a_garbled_mnist_file_says_what_is_wrong(content: bytes | None, problem: str, tmp_path: Path) -> None:
    settings = fake_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if content is None:
        write_idx(images, RNG.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8))
    else:
        images.write_bytes(content)
    message = setup_error(MNISTDataModule, settings, "fit")
    assert f"MNIST file {str(images)!r} " in message and problem in message
    assert "AssertionError" not in message


def test_a_bad_label_through_the_cli_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    fake_mnist(tmp_path / "data")
    mnist_labels(tmp_path / "data", "train", np.arange(40) % 11)
    code, err = run(["fit", *MNIST, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: ")
    assert "train-labels-idx1-ubyte' holds 3 labels outside the range [0, 10)" in err
    assert_nothing_written(tmp_path)


def test_a_val_size_beyond_the_dataset_is_a_one_line_configuration_error(tmp_path: Path, capsys) -> None:
    fake_mnist(tmp_path / "data")
    code, err = run(
        ["fit", *MNIST, "--data.init_args.data_dir", str(tmp_path / "data"), "--data.init_args.val_size=40"], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: ")
    assert "`val_size`=40 gives 40 validation samples out of 40" in err and "a count between 1 and 39" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("val_size", [36, 39, 0.9, 0.05, 4, 1])
def test_stl10_honours_val_size_and_keeps_a_training_sample(val_size: int | float, tmp_path: Path) -> None:
    datamodule = STL10DataModule(**{**fake_stl10(tmp_path), "val_size": val_size})
    datamodule.setup("fit")
    wanted = round(val_size * 40) if isinstance(val_size, float) else val_size
    assert len(datamodule.val_set) == wanted and len(datamodule.train_set) == 40 - wanted
    labels = np.asarray(datamodule.train_set.dataset.labels)
    per_class = np.bincount(labels[datamodule.val_set.indices], minlength=10)
    assert per_class.max() - per_class.min() <= 1  # as balanced as the size allows


@pytest.mark.parametrize("val_size", [40, 0.99, 0.001])
def test_stl10_val_size_without_a_training_or_validation_sample_is_a_configuration_error(
    val_size: int | float, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"`val_size`=.* out of 40.*a count between 1 and 39 or a fraction"):
        STL10DataModule(**{**fake_stl10(tmp_path), "val_size": val_size}).setup("fit")
