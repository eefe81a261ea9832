"""The transfer sets name a damaged image whether torchvision's dataset takes a ``loader`` (torchvision >= 0.22)
or opens its images with PIL itself (older releases, which setup.cfg still allows)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import Dataset

from lightning_pdenets.data import FGVCAircraftDataModule
from lightning_pdenets.data.base import CheckedImageLoader, SampleNotFoundError, UnreadableSampleError
from lightning_pdenets.data.transfer import CheckedDecoding


class OpensWithPIL(Dataset):
    """As torchvision < 0.22's Food101, DTD, FGVCAircraft, StanfordCars: no ``loader``, ``PIL.Image.open`` inside."""

    def __init__(self, files: list[Path], transform=None) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = Image.open(self.files[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), 0


class TakesLoader(OpensWithPIL):
    def __init__(self, files: list[Path], transform=None, loader=None) -> None:
        super().__init__(files, transform)
        self.loader = loader

    def __getitem__(self, index: int):
        return self.loader(str(self.files[index])), 0


@pytest.fixture
def images(tmp_path: Path) -> tuple[FGVCAircraftDataModule, list[Path]]:
    folder = tmp_path / "fgvc-aircraft-2013b" / "data" / "images"
    folder.mkdir(parents=True)
    files = [folder / f"{i}.jpg" for i in range(3)]
    for path in files:
        Image.new("RGB", (8, 8)).save(path)
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    files[2].unlink()  # gone after the listing
    return FGVCAircraftDataModule(data_dir=str(tmp_path)), files


def test_a_dataset_without_loader_is_wrapped_and_names_the_folder(images) -> None:
    datamodule, files = images
    dataset = datamodule._load(lambda: OpensWithPIL(files))
    assert isinstance(dataset, CheckedDecoding) and len(dataset) == 3
    assert dataset[0][0].mode == "RGB"
    with pytest.raises(UnreadableSampleError) as error:
        dataset[1]
    folder = str(Path(datamodule.data_dir, "fgvc-aircraft-2013b").resolve())
    assert f"FGVC Aircraft files under {folder!r} are present but one is unreadable" in str(error.value)
    assert "--data.download true" in str(error.value)
    with pytest.raises(SampleNotFoundError, match=f"file {str(files[2])!r} is listed by the dataset but missing"):
        dataset[2]
    assert len(pickle.loads(pickle.dumps(dataset))) == 3  # spawned DataLoader workers


def test_a_dataset_with_loader_decodes_through_the_checked_loader(images) -> None:
    datamodule, files = images
    dataset = datamodule._load(lambda: TakesLoader(files))
    assert isinstance(dataset, TakesLoader) and isinstance(dataset.loader, CheckedImageLoader)
    with pytest.raises(UnreadableSampleError, match=f"file {str(files[1])!r} is present but unreadable"):
        dataset[1]


def test_a_transform_error_is_not_blamed_on_the_file(images) -> None:
    datamodule, files = images

    def broken_transform(image):
        raise ValueError("a bug in a transform")

    dataset = datamodule._load(lambda: OpensWithPIL(files, broken_transform))
    with pytest.raises(ValueError, match="a bug in a transform") as error:
        dataset[0]
    assert not isinstance(error.value, UnreadableSampleError)
