"""Issue 28, items 2 and 6: a missing dataset and an unreadable one are told apart, each in a short message."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_pdenets.data import CIFAR10DataModule, MNISTDataModule, STL10DataModule, SVHNDataModule
from lightning_pdenets.errors import CorruptDatasetError, DatasetNotFoundError
from tests.conftest import REPO_ROOT
from tests.fakedata.stl10 import fake_stl10
from tests.fakedata.torchvision_sets import fake_cifar10, fake_mnist, fake_svhn
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
