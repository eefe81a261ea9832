"""Tiny ImageNet in the layout of the official ``tiny-imagenet-200.zip``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.fakedata import fake_dataset

WNIDS = [f"n{index:08d}" for index in (1443537, 1629819, 1641577, 1644900, 1698640, 1742172, 1768244, 1770393)]


def write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, format="JPEG")


@fake_dataset("TinyImageNetDataModule")
def fake_tinyimagenet(root: Path, per_class: int = 4, n_val: int = 16) -> dict[str, Any]:
    """wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt, val/images + annotations."""
    base = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(WNIDS)))  # the file is not sorted
    (base / "words.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate(WNIDS)))
    for wnid in WNIDS:
        boxes = []
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            write_jpeg(
                base / "train" / wnid / "images" / name, rng, mode="L" if i == 0 else "RGB"
            )  # some are greyscale
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for i in range(n_val):
        name = f"val_{i}.JPEG"
        write_jpeg(base / "val" / "images" / name, rng)
        annotations.append(f"{name}\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    (base / "test" / "images").mkdir(parents=True, exist_ok=True)
    write_jpeg(base / "test" / "images" / "test_0.JPEG", rng)
    return {"data_dir": str(root), "download": False, "batch_size": 2, "val_size": 8}
