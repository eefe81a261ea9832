"""Concentric-spheres classification data, generated on the fly (no files), in any dimension.

Dupont, Doucet & Teh, "Augmented Neural ODEs", NeurIPS 2019 (inner ball against an outer
annulus), and Ott, Katiyar, Hennig & Tiemann, "ResNet After All", ICLR 2021 (three thin shells
labelled 0, 1, 0). A neural ODE without augmentation is a homeomorphism of R^dim, so it cannot
separate these classes exactly; a coarse solver can, by letting trajectories cross.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_pdenets.data.base import ClassificationDataModule
from lightning_pdenets.validation import check_positive_int

__all__ = ["SPHERES_VARIANTS", "ConcentricSpheresDataModule", "sample_spheres"]

SPHERES_VARIANTS: dict[str, dict] = {
    # Dupont et al. 2019: class 0 in the ball r in [0, 0.5] (500 points), class 1 in r in [1, 1.5] (1,500 points).
    "dupont": dict(shells=((0.0, 0.5, 0), (1.0, 1.5, 1)), fractions=(0.25, 0.75), num_train=2000, num_test=2000),
    # Ott et al. 2021: three shells, labels 0, 1, 0, equal shares of 2,000 training and 1,000 test points.
    "ott": dict(
        shells=((0.1, 0.15, 0), (0.25, 0.3, 1), (0.4, 0.45, 0)),
        fractions=(1 / 3, 1 / 3, 1 / 3),
        num_train=2000,
        num_test=1000,
    ),
}
"""Shells ``(rmin, rmax, label)``, share of points per shell, and the paper's set sizes for each variant."""


def _shell_counts(total: int, fractions: tuple[float, ...]) -> list[int]:
    counts = [int(total * f) for f in fractions]
    counts[0] += total - sum(counts)
    return counts


def sample_spheres(
    num_points: int, dim: int, variant: str = "ott", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_points`` labelled points of ``variant`` in R^dim.

    Each point has radius (rmax − rmin)·U^(1/dim) + rmin with U ~ Uniform(0, 1), and a uniformly
    random direction (a normalized standard Gaussian vector).

    Returns:
        ``(x, y)``: float32 points of shape (num_points, dim) and int64 labels, shuffled.
    """
    if variant not in SPHERES_VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(SPHERES_VARIANTS)}, got {variant!r}.")
    spec = SPHERES_VARIANTS[variant]
    points, labels = [], []
    for (rmin, rmax, label), count in zip(spec["shells"], _shell_counts(num_points, spec["fractions"])):
        direction = torch.randn(count, dim, generator=generator)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        radius = (rmax - rmin) * torch.rand(count, 1, generator=generator) ** (1.0 / dim) + rmin
        points.append(direction * radius)
        labels.append(torch.full((count,), label, dtype=torch.int64))
    order = torch.randperm(num_points, generator=generator)
    return torch.cat(points)[order], torch.cat(labels)[order]


class ConcentricSpheresDataModule(ClassificationDataModule):
    """Seeded concentric-spheres data: the same points for a given seed on every run and every rank.

    Train, validation and test sets are drawn independently (seeds ``seed``, ``seed + 1``,
    ``seed + 2``), so the test set never overlaps the training set.

    Args:
        dim: Dimension of the points (2, 3, 10 and 900 in the papers).
        variant: ``"ott"`` (three shells) or ``"dupont"`` (ball against annulus).
        num_train: Training points (default: the variant's, 2,000).
        num_val: Validation points (default: as many as ``num_test``).
        num_test: Test points (default: the variant's, 1,000 for Ott et al., 2,000 for Dupont et al.).
        batch_size: Samples per batch on each process.
        seed: Seed of the generator.
        num_workers: DataLoader worker processes.
    """

    name = "concentric spheres"
    num_classes = 2

    def __init__(
        self,
        dim: int = 2,
        variant: str = "ott",
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        batch_size: int = 128,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_positive_int(dim, "dim")
        if variant not in SPHERES_VARIANTS:
            raise ValueError(f"`variant` must be one of {sorted(SPHERES_VARIANTS)}, got {variant!r}.")
        spec = SPHERES_VARIANTS[variant]
        num_train = spec["num_train"] if num_train is None else num_train
        num_test = spec["num_test"] if num_test is None else num_test
        num_val = num_test if num_val is None else num_val
        minimum = len(spec["shells"])
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            check_positive_int(value, name, minimum)  # at least one point per shell
        self.save_hyperparameters()
        self.dim = dim
        self.input_dim = dim
        self.variant = variant
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.splits: dict[str, TensorDataset] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        for offset, split in enumerate(("train", "val", "test")):
            if split not in self.splits:
                generator = torch.Generator().manual_seed(self.seed + offset)
                self.splits[split] = TensorDataset(
                    *sample_spheres(self.sizes[split], self.dim, self.variant, generator)
                )
        self.train_set, self.val_set, self.test_set = self.splits["train"], self.splits["val"], self.splits["test"]
