"""FGVC Aircraft, Food-101, DTD and Stanford Cars in the layouts torchvision reads (as released)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from tests.fakedata import fake_dataset
from tests.fakedata.tinyimagenet import write_jpeg
from tests.fakedata.torchvision_sets import fake_cifar10, fake_cifar100

OVERRIDES = {"download": False, "batch_size": 4, "val_size": 4}


def _sizes(rng: np.random.Generator) -> tuple[int, int]:
    """Real images vary in size and aspect ratio, which the datamodules resize away."""
    return int(rng.integers(40, 90)), int(rng.integers(40, 90))


@fake_dataset("FGVCAircraftDataModule")
def fake_fgvc_aircraft(root: Path, n_per_split: int = 12) -> dict[str, Any]:
    data = root / "fgvc-aircraft-2013b" / "data"
    rng = np.random.default_rng(0)
    variants = ["707-320", "727-200", "A300B4", "Boeing 717"]  # names may contain spaces
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for i in range(n_per_split):
            image_id += 1
            write_jpeg(data / "images" / f"{image_id:07d}.jpg", rng, _sizes(rng))
            lines.append(f"{image_id:07d} {variants[i % len(variants)]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    (data / "images_variant_trainval.txt").write_text(
        (data / "images_variant_train.txt").read_text() + (data / "images_variant_val.txt").read_text()
    )
    return {"data_dir": str(root), **OVERRIDES}


@fake_dataset("Food101DataModule")
def fake_food101(root: Path, n_train: int = 4, n_test: int = 2) -> dict[str, Any]:
    base = root / "food-101"
    rng = np.random.default_rng(0)
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    (base / "meta" / "labels.txt").write_text("".join(f"{c.replace('_', ' ').title()}\n" for c in classes))
    image_id = 100
    for split, n in (("train", n_train), ("test", n_test)):
        metadata: dict[str, list[str]] = {}
        for name in classes:
            for _ in range(n):
                image_id += 1
                write_jpeg(base / "images" / name / f"{image_id}.jpg", rng, _sizes(rng))
                metadata.setdefault(name, []).append(f"{name}/{image_id}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(metadata))
        (base / "meta" / f"{split}.txt").write_text("".join(f"{p}\n" for ps in metadata.values() for p in ps))
    return {"data_dir": str(root), **OVERRIDES}


@fake_dataset("DTDDataModule")
def fake_dtd(root: Path, n_per_split: int = 3) -> dict[str, Any]:
    data = root / "dtd" / "dtd"
    rng = np.random.default_rng(0)
    classes = ["banded", "blotchy", "braided"]
    (data / "labels").mkdir(parents=True, exist_ok=True)
    counter = dict.fromkeys(classes, 0)
    for split in ("train", "val", "test"):
        lines = []
        for name in classes:
            for _ in range(n_per_split):
                counter[name] += 1
                file = f"{name}_{counter[name]:04d}.jpg"
                write_jpeg(data / "images" / name / file, rng, _sizes(rng))
                lines.append(f"{name}/{file}\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return {"data_dir": str(root), **OVERRIDES}


def _car_annotations(names: list[str], classes: list[int]) -> np.ndarray:
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    records = np.zeros((1, len(names)), dtype=fields)
    for i, (name, label) in enumerate(zip(names, classes)):
        records[0, i] = (np.uint8(1), np.uint8(1), np.uint8(30), np.uint8(30), np.uint8(label), name)
    return records


@fake_dataset("StanfordCarsDataModule")
def fake_stanford_cars(root: Path, n_train: int = 12, n_test: int = 6) -> dict[str, Any]:
    """devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_{train,test}/*.jpg."""
    base = root / "stanford_cars"
    rng = np.random.default_rng(0)
    class_names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"], dtype=object)
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": class_names.reshape(1, -1)})
    for split, n, annotations_path in (
        ("train", n_train, base / "devkit" / "cars_train_annos.mat"),
        ("test", n_test, base / "cars_test_annos_withlabels.mat"),
    ):
        names = [f"{i + 1:05d}.jpg" for i in range(n)]
        for name in names:
            write_jpeg(base / f"cars_{split}" / name, rng, _sizes(rng))
        labels = [i % len(class_names) + 1 for i in range(n)]  # classes are 1-based in the .mat files
        scipy.io.savemat(annotations_path, {"annotations": _car_annotations(names, labels)})
    return {"data_dir": str(root), **OVERRIDES}


@fake_dataset("ResizedCIFAR10DataModule")
def fake_resized_cifar10(root: Path) -> dict[str, Any]:
    return fake_cifar10(root)


@fake_dataset("ResizedCIFAR100DataModule")
def fake_resized_cifar100(root: Path) -> dict[str, Any]:
    return fake_cifar100(root)
