"""Issue 28, item 2 for the image-file datasets: Tiny ImageNet and the transfer sets tell a missing file from a
damaged one, name it and say what to do, in one short message with exit code 2, also when a DataLoader worker
meets the file in the middle of an epoch."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_pdenets.data import (
    DTDDataModule,
    FGVCAircraftDataModule,
    Food101DataModule,
    StanfordCarsDataModule,
    TinyImageNetDataModule,
)
from lightning_pdenets.data.base import CheckedImageLoader, UnreadableSampleError
from lightning_pdenets.data.loading import ResumableSampler
from lightning_pdenets.errors import CorruptDatasetError, DatasetNotFoundError
from tests.conftest import REPO_ROOT
from tests.fakedata.tinyimagenet import WNIDS, fake_tinyimagenet, write_jpeg
from tests.fakedata.transfer import fake_dtd, fake_fgvc_aircraft, fake_food101, fake_stanford_cars
from tests.test_hostile_resume import TINY, run

TINY_IMAGENET = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--model.init_args.network.width=8",
    "--data=lightning_pdenets.data.TinyImageNetDataModule",
    "--data.init_args.batch_size=2",
    "--data.init_args.val_size=8",
    *TINY,
]


def truncate(path: Path, keep: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def version_folders(root: Path) -> list[Path]:
    return sorted((root / "logs").glob("**/version_*"))


def assert_one_short_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: "), err


def train_order(settings: dict) -> list[str]:
    """The image paths of the first training epoch, in the order the fit reads them."""
    datamodule = TinyImageNetDataModule(**settings)
    datamodule.setup("fit")
    subset = datamodule.train_set
    return [subset.dataset.samples[subset.indices[i]][0] for i in ResumableSampler(subset, shuffle=True, seed=42)]


def first_validation_image(data_dir: Path) -> Path:
    """A fabricated Tiny ImageNet under ``data_dir``; the file of its first validation image (the sanity check
    reads it first)."""
    datamodule = TinyImageNetDataModule(**fake_tinyimagenet(data_dir))
    datamodule.setup("fit")
    return Path(datamodule.val_set.dataset.samples[datamodule.val_set.indices[0]][0])


# -- through the CLI, as a user runs it ---------------------------------------------------------------------------
@pytest.mark.cli
def test_a_truncated_jpeg_read_at_the_first_validation_is_named_and_leaves_no_version_folder(tmp_path, capsys) -> None:
    broken = first_validation_image(tmp_path / "data")
    truncate(broken)
    code, err = run(["fit", *TINY_IMAGENET, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    assert_one_short_error(err)
    assert f"Tiny ImageNet file {str(broken)!r} is present but unreadable" in err and "Truncated" in err
    assert f"Delete the folder {str(tmp_path / 'data' / 'tiny-imagenet-200')!r}" in err
    assert "--data.download true" in err
    assert version_folders(tmp_path) == []
    assert broken.stat().st_size == 300  # nothing deleted for the user


@pytest.mark.cli
def test_a_damaged_jpeg_met_by_a_worker_mid_epoch_is_one_line_and_the_fit_resumes(tmp_path, capsys) -> None:
    settings = fake_tinyimagenet(tmp_path / "data")
    broken = Path(train_order(settings)[5])  # third batch of two
    intact = broken.read_bytes()
    broken.write_bytes(b"\x89PNG but not an image")
    args = [
        "fit",
        *TINY_IMAGENET,
        "--data.init_args.data_dir",
        str(tmp_path / "data"),
        "--data.init_args.num_workers=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=0",
    ]
    code, err = run(args, capsys)
    assert code == 2
    assert_one_short_error(err)
    assert "DataLoader worker" not in err and "Traceback" not in err
    assert f"file {str(broken)!r} is present but unreadable (UnidentifiedImageError: cannot identify image file" in err
    assert "resumes with --ckpt_path last" in err
    [version] = version_folders(tmp_path)  # two steps logged: the folder is kept, with the interrupt checkpoint
    assert (version / "checkpoints" / "interrupted.ckpt").is_file()

    broken.write_bytes(intact)
    assert run([*args, "--ckpt_path", "last"], capsys)[0] == 0


@pytest.mark.cli
def test_an_image_gone_after_setup_listed_it_is_called_missing_not_unreadable(tmp_path, capsys, monkeypatch) -> None:
    settings = fake_tinyimagenet(tmp_path / "data")
    datamodule = TinyImageNetDataModule(**settings)
    datamodule.setup("fit")
    gone = Path(datamodule.val_set.dataset.samples[datamodule.val_set.indices[0]][0])
    setup = TinyImageNetDataModule.setup

    def setup_then_lose_the_file(self, stage=None):  # e.g. a cleanup job on a shared disk, between listing and reading
        setup(self, stage)
        gone.unlink(missing_ok=True)

    monkeypatch.setattr(TinyImageNetDataModule, "setup", setup_then_lose_the_file)
    code, err = run(["fit", *TINY_IMAGENET, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    assert_one_short_error(err)
    assert f"Tiny ImageNet file {str(gone)!r} is listed by the dataset but missing" in err
    assert "present but unreadable" not in err
    assert version_folders(tmp_path) == []


@pytest.mark.cli
def test_a_cut_wnids_txt_is_named_not_called_missing(tmp_path, capsys) -> None:
    fake_tinyimagenet(tmp_path / "data")
    wnids = tmp_path / "data" / "tiny-imagenet-200" / "wnids.txt"
    truncate(wnids, keep=40)  # four wnids and a partial fifth
    code, err = run(["fit", *TINY_IMAGENET, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    assert_one_short_error(err)
    assert f"file {str(wnids)!r} lists 4 classes" in err and "truncated or corrupt" in err
    assert "was not found" not in err
    assert version_folders(tmp_path) == []


@pytest.mark.cli
def test_a_tiny_imagenet_image_of_another_size_is_named_instead_of_failing_to_batch(tmp_path, capsys) -> None:
    resized = first_validation_image(tmp_path / "data")
    write_jpeg(resized, np.random.default_rng(0), size=(80, 80))
    code, err = run(["fit", *TINY_IMAGENET, "--data.init_args.data_dir", str(tmp_path / "data")], capsys)
    assert code == 2
    assert_one_short_error(err)
    assert f"Tiny ImageNet file {str(resized)!r} is 80x80 pixels, but every Tiny ImageNet image is 64x64" in err
    assert "stack expects" not in err
    assert version_folders(tmp_path) == []


@pytest.mark.cli
@pytest.mark.parametrize(
    ("datamodule", "fabricate", "images"),
    [
        ("FGVCAircraftDataModule", fake_fgvc_aircraft, "fgvc-aircraft-2013b/data/images"),
        ("Food101DataModule", fake_food101, "food-101/images"),
        ("DTDDataModule", fake_dtd, "dtd/dtd/images"),
        ("StanfordCarsDataModule", fake_stanford_cars, "stanford_cars/cars_train"),
    ],
)
def test_a_truncated_image_of_a_transfer_set_is_named(datamodule, fabricate, images, tmp_path, capsys) -> None:
    fabricate(tmp_path / "data")
    for path in (tmp_path / "data" / images).rglob("*.jpg"):  # whichever the sanity check reads
        truncate(path)
    code, err = run(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--model.init_args.network.width=8",
            f"--data=lightning_pdenets.data.{datamodule}",
            "--data.init_args.resize=16",
            "--data.init_args.batch_size=2",
            "--data.init_args.val_size=4",
            *TINY,
            "--data.init_args.data_dir",
            str(tmp_path / "data"),
        ],
        capsys,
    )
    assert code == 2
    assert_one_short_error(err)
    assert "is present but unreadable (OSError: Truncated File Read)" in err
    assert f"{tmp_path / 'data' / images}/" in err
    assert version_folders(tmp_path) == []


# -- annotation files and archives --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("datamodule_class", "fabricate", "file", "keep"),
    [
        (FGVCAircraftDataModule, fake_fgvc_aircraft, "fgvc-aircraft-2013b/data/images_variant_trainval.txt", 30),
        (Food101DataModule, fake_food101, "food-101/meta/train.json", 30),
        (StanfordCarsDataModule, fake_stanford_cars, "stanford_cars/devkit/cars_train_annos.mat", 200),
        (StanfordCarsDataModule, fake_stanford_cars, "stanford_cars/devkit/cars_meta.mat", 100),
        (TinyImageNetDataModule, fake_tinyimagenet, "tiny-imagenet-200/val/val_annotations.txt", 15),
    ],
)
def test_a_cut_annotation_file_is_named(datamodule_class, fabricate, file: str, keep: int, tmp_path) -> None:
    settings = fabricate(tmp_path)
    truncate(tmp_path / file, keep=keep)
    with pytest.raises(CorruptDatasetError) as error:
        datamodule_class(**settings).setup()
    assert f"file {str(tmp_path / file)!r} is present but unreadable" in str(error.value)
    assert "not found" not in str(error.value)


@pytest.mark.parametrize("gone", ["val/val_annotations.txt", "val/images"])
def test_tiny_imagenet_without_its_test_split_is_refused_before_the_fit(gone: str, tmp_path) -> None:
    settings = fake_tinyimagenet(tmp_path)
    path = tmp_path / "tiny-imagenet-200" / gone
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(
        DatasetNotFoundError, match=rf"Tiny ImageNet was not found .*\(expected tiny-imagenet-200/{gone}\)"
    ):
        TinyImageNetDataModule(**settings).setup("fit")


def test_a_wnid_listed_twice_is_named(tmp_path) -> None:
    settings = fake_tinyimagenet(tmp_path)
    wnids = tmp_path / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_text(wnids.read_text() + f"{WNIDS[2]}\n")
    with pytest.raises(CorruptDatasetError) as error:
        TinyImageNetDataModule(**settings).setup("fit")
    message = str(error.value)
    assert f"Tiny ImageNet file {str(wnids)!r} lists {WNIDS[2]} more than once" in message
    assert "unlisted: []" not in message


def test_an_incomplete_extraction_says_to_delete_the_folder_when_download_is_already_on(tmp_path) -> None:
    settings = fake_food101(tmp_path)
    (tmp_path / "food-101" / "meta" / "train.json").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        Food101DataModule(**{**settings, "download": True}).setup("fit")
    assert f"Delete the incomplete folder {str(tmp_path / 'food-101')!r}" in str(error.value)


def test_a_cut_archive_is_named_instead_of_a_network_error(tmp_path) -> None:
    """FGVC Aircraft's archive has no checksum in torchvision: a cut one is reused and fails to extract."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        payload = b"x" * 200_000
        info = tarfile.TarInfo("fgvc-aircraft-2013b/data/variants.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    cut = tmp_path / "fgvc-aircraft-2013b.tar.gz"
    cut.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(CorruptDatasetError) as error:
        FGVCAircraftDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    message = str(error.value)
    assert f"{str(cut)!r} is truncated or corrupt" in message and "Delete it and any folder" in message


def test_stanford_cars_without_files_is_a_dataset_error() -> None:
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded any more"):
        StanfordCarsDataModule(data_dir="/nonexistent", download=True).prepare_data()


# -- the loader on its own ----------------------------------------------------------------------------------------
def test_the_worker_traceback_around_the_message_is_dropped() -> None:
    """torch re-raises a worker's error as ``type(error)(text of the worker's traceback)``."""
    wrapped = (
        "Caught UnreadableSampleError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n'
        "lightning_pdenets.data.base.UnreadableSampleError: the message\n"
    )
    assert str(UnreadableSampleError(wrapped)) == "the message"
    assert str(UnreadableSampleError("plain")) == "plain"


def test_an_intact_image_loads_and_a_resource_limit_is_not_blamed_on_the_file(tmp_path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("L", (4, 4)).save(path)
    assert CheckedImageLoader("X", "advice")(str(path)).mode == "RGB"

    def out_of_descriptors(_: str):
        raise OSError(24, "Too many open files")

    with pytest.raises(OSError, match="Too many open files") as error:
        CheckedImageLoader("X", "advice", out_of_descriptors)(str(path))
    assert not isinstance(error.value, CorruptDatasetError)


def test_the_checked_loader_pickles_for_spawned_workers() -> None:
    import pickle

    loader = DTDDataModule(data_dir="d").image_loader()
    assert pickle.loads(pickle.dumps(loader)).advice == loader.advice
