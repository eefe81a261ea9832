"""Tiny ImageNet and the transfer datamodules on fabricated files in their real layouts; fine-tuning."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.data import (
    DTDDataModule,
    FGVCAircraftDataModule,
    Food101DataModule,
    ResizedCIFAR10DataModule,
    ResizedCIFAR100DataModule,
    StanfordCarsDataModule,
    TinyImageNetDataModule,
)
from lightning_pdenets.models import IsometricMobileNetModule
from tests.fakedata.tinyimagenet import WNIDS, fake_tinyimagenet
from tests.fakedata.transfer import (
    fake_dtd,
    fake_fgvc_aircraft,
    fake_food101,
    fake_resized_cifar10,
    fake_resized_cifar100,
    fake_stanford_cars,
)
from tests.trainers import quiet_trainer

TINY = dict(channels=16, expanded_channels=32, num_blocks=2, patch_size=8)


# -- Tiny ImageNet -----------------------------------------------------------------------------------
def test_tinyimagenet_reads_the_official_layout(tmp_path):
    dm = TinyImageNetDataModule(**fake_tinyimagenet(tmp_path))
    dm.setup()
    assert dm.num_classes == 200 and dm.image_size == (64, 64)
    train = dm.train_set.dataset
    assert train.classes == sorted(WNIDS)  # class index = rank of the wnid, whatever wnids.txt's order
    assert len(dm.train_set) + len(dm.val_set) == 4 * len(WNIDS) and len(dm.val_set) == 8
    for path, label in train.samples:  # train/<wnid>/images/<wnid>_<i>.JPEG
        assert Path(path).parent.parent.name == sorted(WNIDS)[label]
    # the official val images are the test set, labelled by val_annotations.txt
    assert len(dm.test_set) == 16
    assert dm.test_set.targets == [sorted(WNIDS).index(WNIDS[i % len(WNIDS)]) for i in range(16)]
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64)  # greyscale JPEGs come out as RGB


def test_tinyimagenet_missing_data_is_actionable(tmp_path):
    dm = TinyImageNetDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200/wnids.txt.*download: true"):
        dm.setup("fit")


def test_tinyimagenet_download_fetches_the_official_archive_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "lightning_pdenets.data.tinyimagenet.download_and_extract_archive",
        lambda url, download_root, md5: calls.append((url, download_root, md5)),
    )
    TinyImageNetDataModule(data_dir=str(tmp_path / "fresh"), download=True).prepare_data()
    assert calls == [
        (
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            str(tmp_path / "fresh"),
            "90528d7ca1a48142e341f4ef8d21d0de",
        )
    ]
    fake_tinyimagenet(tmp_path / "present")
    TinyImageNetDataModule(data_dir=str(tmp_path / "present"), download=True).prepare_data()
    assert len(calls) == 1  # already there: nothing fetched


# -- transfer datamodules ------------------------------------------------------------------------------
TRANSFER = [
    (ResizedCIFAR10DataModule, fake_resized_cifar10, 10),
    (ResizedCIFAR100DataModule, fake_resized_cifar100, 100),
    (FGVCAircraftDataModule, fake_fgvc_aircraft, 100),
    (Food101DataModule, fake_food101, 101),
    (DTDDataModule, fake_dtd, 47),
    (StanfordCarsDataModule, fake_stanford_cars, 196),
]


@pytest.mark.parametrize("datamodule_class, fabricate, num_classes", TRANSFER, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("resize", [64, 40])
def test_transfer_datamodules_resize_to_the_source_input(datamodule_class, fabricate, num_classes, resize, tmp_path):
    dm = datamodule_class(**fabricate(tmp_path), resize=resize)
    dm.setup()
    assert dm.num_classes == num_classes and dm.image_size == (resize, resize)
    assert dm.mean == TinyImageNetDataModule.channel_mean  # the source's statistics
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, resize, resize)
        assert int(y.min()) >= 0 and int(y.max()) < num_classes


def test_transfer_labels_follow_each_datasets_convention(tmp_path):
    cars = StanfordCarsDataModule(**fake_stanford_cars(tmp_path / "cars"))
    cars.setup("test")
    assert [label for _, label in cars.test_set._samples] == [i % 3 for i in range(6)]  # 1-based in the .mat files
    dtd = DTDDataModule(**fake_dtd(tmp_path / "dtd"))
    dtd.setup()
    assert len(dtd.train_set) + len(dtd.val_set) == 18 and len(dtd.test_set) == 9  # train+val of partition 1
    aircraft = FGVCAircraftDataModule(**fake_fgvc_aircraft(tmp_path / "aircraft"))
    aircraft.setup("test")
    assert aircraft.test_set.classes[3] == "Boeing 717" and aircraft.test_set._labels[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "datamodule_class, folder",
    [
        (FGVCAircraftDataModule, "fgvc-aircraft-2013b/"),
        (Food101DataModule, "food-101/"),
        (DTDDataModule, "dtd/dtd/"),
        (StanfordCarsDataModule, "stanford_cars/"),
    ],
)
def test_transfer_missing_data_is_actionable(datamodule_class, folder, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        datamodule_class(data_dir=str(tmp_path)).setup("test")
    assert folder in str(error.value) and "data_dir" in str(error.value)


def test_stanford_cars_download_explains_the_broken_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded any more"):
        StanfordCarsDataModule(data_dir=str(tmp_path), download=True).prepare_data()


def test_bad_resize_and_partition():
    with pytest.raises(ValueError, match="`resize` must be an integer >= 1, got 0"):
        Food101DataModule(resize=0)
    with pytest.raises(ValueError, match=r"`partition` must be an integer in \[1, 10\]"):
        DTDDataModule(partition=11)


# -- fine-tuning -----------------------------------------------------------------------------------------
def _loader(num_classes: int, n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 64, 64, generator=generator), torch.arange(n) % num_classes)
    return DataLoader(data, batch_size=8)


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory) -> Path:
    """A 7-class source model trained for two steps, saved by Lightning."""
    model = IsometricMobileNetModule(num_classes=7, lr=0.05, network=TINY)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, _loader(7))
    path = tmp_path_factory.mktemp("source") / "source.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_pretrained_checkpoint_loads_backbone_and_swaps_the_head(source_checkpoint):
    source = IsometricMobileNetModule.load_from_checkpoint(source_checkpoint)
    target = IsometricMobileNetModule(num_classes=3, pretrained_checkpoint=str(source_checkpoint), network=TINY)
    for (name, a), (_, b) in zip(
        source.network.backbone.state_dict().items(), target.network.backbone.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert target.network.classifier.out_features == 3
    assert target(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_pretrained_checkpoint_of_another_architecture_is_rejected(source_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"different architecture \(channels: checkpoint 16 vs this model 24\)"):
        IsometricMobileNetModule(
            num_classes=3, pretrained_checkpoint=str(source_checkpoint), network=dict(TINY, channels=24)
        )
    with pytest.raises(FileNotFoundError, match=r"does not exist; point it to the \.ckpt file"):
        IsometricMobileNetModule(num_classes=3, pretrained_checkpoint=str(tmp_path / "nope.ckpt"), network=TINY)


class Snapshots(pl.Callback):
    """Backbone and classifier weights at the end of every training epoch, and the optimizer's groups."""

    def __init__(self) -> None:
        self.backbone, self.classifier, self.groups = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.backbone.append(
            torch.cat([p.detach().flatten().clone() for p in pl_module.network.backbone.stem.parameters()])
        )
        self.classifier.append(pl_module.network.classifier.weight.detach().clone())
        self.groups.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_head_first_freezes_the_backbone_until_the_unfreeze_epoch(source_checkpoint):
    model = IsometricMobileNetModule(
        num_classes=3,
        pretrained_checkpoint=str(source_checkpoint),
        finetune="head_first",
        unfreeze_backbone_at_epoch=1,
        backbone_lr_ratio=0.1,
        optimizer="sgd",
        lr=0.1,
        network=TINY,
    )
    initial = torch.cat([p.detach().flatten().clone() for p in model.network.backbone.stem.parameters()])
    spy = Snapshots()
    quiet_trainer(max_epochs=2, callbacks=[spy]).fit(model, _loader(3))
    assert torch.equal(spy.backbone[0], initial)  # epoch 0: only the head trains
    assert not torch.equal(spy.classifier[0], model.network.classifier.weight.new_zeros(0))
    assert not torch.equal(spy.backbone[1], initial)  # epoch 1: the backbone is unfrozen
    assert spy.groups[0] == [0.1] and spy.groups[1] == pytest.approx([0.1, 0.01])  # backbone at 0.1 x head lr


def test_full_finetuning_trains_everything_from_the_start(source_checkpoint, tmp_path):
    model = IsometricMobileNetModule(
        num_classes=3,
        pretrained_checkpoint=str(source_checkpoint),
        finetune="full",
        optimizer="sgd",
        lr=0.1,
        network=TINY,
    )
    initial = torch.cat([p.detach().flatten().clone() for p in model.network.backbone.stem.parameters()])
    spy = Snapshots()
    trainer = quiet_trainer(max_epochs=1, callbacks=[spy])
    trainer.fit(model, _loader(3))
    assert not torch.equal(spy.backbone[0], initial) and spy.groups[0] == [0.1]
    path = tmp_path / "finetuned.ckpt"
    trainer.save_checkpoint(path)
    reloaded = IsometricMobileNetModule.load_from_checkpoint(path, pretrained_checkpoint=None)  # source not needed
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reloaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(finetune="last_layer"), "`finetune` must be one of ['full', 'head_first']"),
        (dict(unfreeze_backbone_at_epoch=-1), "`unfreeze_backbone_at_epoch` must be an integer >= 0"),
        (dict(backbone_lr_ratio=0), "`backbone_lr_ratio` must be a finite number > 0"),
    ],
)
def test_bad_finetune_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        IsometricMobileNetModule(network=TINY, **kwargs)
    assert message in str(error.value)
