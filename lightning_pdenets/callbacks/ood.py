"""Accuracy on perturbed (out-of-distribution) copies of the test set.

The four perturbations of Kim et al.'s PR-Net paper, Table 4 (Tiny ImageNet, 64×64): additive
Gaussian noise N(0, 0.1), a 56×56 center crop resized back to 64×64, a random rotation of up
to 30°, and colour jitter of brightness, contrast, saturation and hue with strength 0.2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from lightning_pdenets.callbacks._setup_checks import check_stats_match_data
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import (
    PixelSpace,
    accuracy_metrics,
    add_figure,
    batch_positions,
    check_channel_stats,
    compute_on_every_rank,
    derive_seed,
    evaluation_pass,
    normalization_of,
    running_loader,
    split_batch,
    unknown_order_message,
)
from lightning_pdenets.interruption import raise_if_stop_requested
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = ["PERTURBATIONS", "OODEvaluation", "perturb_pixels"]

PERTURBATIONS = ("gaussian_noise", "center_crop", "rotation", "color_jitter")


def perturb_pixels(
    pixels: torch.Tensor,
    name: str,
    generator: torch.Generator | Sequence[torch.Generator],
    noise_std: float = 0.1,
    crop_fraction: float = 56 / 64,
    rotation_degrees: float = 30.0,
    jitter_strength: float = 0.2,
) -> torch.Tensor:
    """Apply perturbation ``name`` to a batch of [0, 1] images (N, C, H, W), drawing from ``generator``.

    Random perturbations draw independently per image: from one ``generator`` for the batch, or from one generator
    per image (a sequence of N), so that an image's draw does not depend on the batch it is in. The result is
    clamped to [0, 1].
    """
    per_image = not isinstance(generator, torch.Generator)
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if per_image and len(generators) != pixels.shape[0]:
        raise ValueError(f"perturb_pixels got {len(generators)} generators for {pixels.shape[0]} images; give one each")
    if name == "gaussian_noise":
        if per_image:
            noise = torch.stack([torch.randn(pixels.shape[1:], generator=g, device=g.device) for g in generators])
        else:
            noise = torch.randn(pixels.shape, generator=generators[0], device=generators[0].device)
        return (pixels + noise_std * noise.to(pixels)).clamp(0.0, 1.0)
    height, width = pixels.shape[-2:]
    if name == "center_crop":
        crop = [max(1, round(height * crop_fraction)), max(1, round(width * crop_fraction))]
        resized = TF.resize(TF.center_crop(pixels, crop), [height, width], antialias=True)
        return resized.clamp(0.0, 1.0)
    if name not in ("rotation", "color_jitter"):
        raise ValueError(f"unknown perturbation {name!r}; choose from {list(PERTURBATIONS)}.")
    # torchvision's random transforms draw one setting per call from the global RNG, so each image
    # is transformed alone under a seed taken from `generator`, leaving the global RNG untouched.
    if name == "rotation":
        transform: Callable = T.RandomRotation(rotation_degrees)
    else:
        s = jitter_strength
        transform = T.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s, 0.5))
    if per_image:
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generators]
    else:
        g = generators[0]
        seeds = torch.randint(0, 2**62, (pixels.shape[0],), generator=g, device=g.device).tolist()
    images = []
    with torch.random.fork_rng(devices=[]):
        for image, seed in zip(pixels, seeds):
            torch.manual_seed(seed)
            images.append(transform(image))
    return torch.stack(images).clamp(0.0, 1.0)


class OODEvaluation(Callback):
    """Top-1/top-5 test accuracy under the PR-Net paper's four input perturbations.

    Perturbations act on [0, 1] pixels: batches are un-normalized with the datamodule's
    ``mean``/``std`` (or the ones given), perturbed, and normalized again. Every image draws its
    perturbations from generators seeded with (``seed``, the perturbation, the image's index in the test
    set), so repeated runs agree, and one process and N DDP processes perturb every image alike and log the
    same accuracies. That index is read from the unshuffled test loader (sequential, or Lightning's and
    torch's distributed samplers, which deal samples out to the ranks in turn); with a loader whose order is
    unknown, each batch draws from a generator seeded with ``seed + batch_idx`` instead, and a warning says
    that the results then depend on the number of processes. Logs ``ood/<perturbation>/top1`` and
    ``ood/<perturbation>/top5`` (more than 5 classes).

    Args:
        perturbations: Subset of ``gaussian_noise``, ``center_crop``, ``rotation``, ``color_jitter``.
        noise_std: Standard deviation of the Gaussian noise, in pixel units.
        crop_size: Side of the center crop at ``reference_size``; scaled proportionally for other sizes.
        reference_size: Image side that ``crop_size`` refers to (the paper: 56 of 64).
        rotation_degrees: Rotation angles are uniform in [-degrees, degrees].
        jitter_strength: Brightness, contrast, saturation and hue jitter strength.
        num_batches: Evaluate the first ``num_batches`` × (per-process batch size) samples of the test set (by
            index, the same samples whatever the number of processes); ``None`` evaluates all.
        mean: Per-channel mean of the input normalization (default: ``trainer.datamodule.mean``).
        std: Per-channel standard deviation (default: ``trainer.datamodule.std``).
        seed: Base seed of the random perturbations.
    """

    def __init__(
        self,
        perturbations: Sequence[str] = PERTURBATIONS,
        noise_std: float = 0.1,
        crop_size: int = 56,
        reference_size: int = 64,
        rotation_degrees: float = 30.0,
        jitter_strength: float = 0.2,
        num_batches: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(perturbations, str) or not perturbations or any(p not in PERTURBATIONS for p in perturbations):
            raise ValueError(
                f"`perturbations` must be a non-empty subset of {list(PERTURBATIONS)}, got {perturbations!r}."
            )
        check_positive(noise_std, "noise_std")
        check_positive(rotation_degrees, "rotation_degrees")
        check_positive(jitter_strength, "jitter_strength")
        check_positive_int(crop_size, "crop_size")
        check_positive_int(reference_size, "reference_size")
        if crop_size > reference_size:
            raise ValueError(f"`crop_size` ({crop_size}) must not exceed `reference_size` ({reference_size}).")
        check_positive_int(num_batches, "num_batches", allow_none=True)
        check_channel_stats(mean, std)
        check_positive_int(seed, "seed", minimum=0)
        self.perturbations = list(dict.fromkeys(perturbations))
        self.noise_std = noise_std
        self.crop_fraction = crop_size / reference_size
        self.rotation_degrees = rotation_degrees
        self.jitter_strength = jitter_strength
        self.num_batches = num_batches
        self.mean, self.std = mean, std
        self.seed = seed
        self._metrics: dict[str, MetricCollection] = {}
        self._warned_order = False

    def evaluate_batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        trainer: pl.Trainer | None = None,
        seed: int = 0,
        sample_indices: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits of ``model`` (in eval mode, under ``no_grad``) on every perturbation of the normalized batch ``x``.

        With ``sample_indices`` (one per image, e.g. its index in the test set) each image's draws depend on
        ``seed``, the perturbation and its index only; without, the batch draws from one generator seeded ``seed``.
        """
        stats = normalization_of(trainer, self.mean, self.std)
        pixel_model = PixelSpace.for_batch(model, x, stats, type(self).__name__)
        if "color_jitter" in self.perturbations and x.shape[1] not in (1, 3):
            raise ConfigurationError(
                f"{type(self).__name__}: `color_jitter` needs images with 1 or 3 channels, got {x.shape[1]}; "
                f"leave it out of `perturbations`."
            )
        if sample_indices is not None and len(sample_indices) != x.shape[0]:
            raise ValueError(f"{len(sample_indices)} `sample_indices` for a batch of {x.shape[0]}; give one per image.")
        batch_generator = torch.Generator(device="cpu").manual_seed(seed)
        outputs = {}
        with evaluation_pass(model):
            pixels = pixel_model.to_pixels(x)
            for name in self.perturbations:
                generator: torch.Generator | list[torch.Generator] = batch_generator
                if sample_indices is not None:
                    stream = PERTURBATIONS.index(name)  # the same draws whichever other perturbations run
                    generator = [
                        torch.Generator(device="cpu").manual_seed(derive_seed(seed, stream, int(index)))
                        for index in sample_indices
                    ]
                perturbed = perturb_pixels(
                    pixels.cpu(),
                    name,
                    generator,
                    self.noise_std,
                    self.crop_fraction,
                    self.rotation_degrees,
                    self.jitter_strength,
                ).to(pixels.device)
                outputs[name] = pixel_model(perturbed)
        return outputs

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_stats_match_data(type(self).__name__, self.mean, trainer)  # before the run, not at its first test batch

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.clear()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, y = split_batch(batch, type(self).__name__)
        loader = running_loader(trainer, "test", dataloader_idx)
        positions = batch_positions(loader, batch_idx, len(y))
        if positions.indices is None and not self._warned_order:
            self._warned_order = True
            rank_zero_warn(unknown_order_message(type(self).__name__, loader, self.num_batches))
        keep = positions.among_first(self.num_batches)
        if not keep.any():
            return
        raise_if_stop_requested(trainer, lambda: f"OODEvaluation (test batch {batch_idx})")
        indices = positions.indices
        if not keep.all():  # the batch straddles the limit
            x, y = x[keep.to(x.device)], y[keep.to(y.device)]
            indices = indices[keep] if indices is not None else None
        seed = self.seed if indices is not None else self.seed + batch_idx
        for name, logits in self.evaluate_batch(pl_module, x, trainer, seed=seed, sample_indices=indices).items():
            if name not in self._metrics:
                self._metrics[name] = accuracy_metrics(logits.shape[-1], device=logits.device)
            self._metrics[name].update(logits, y)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank computes, even one that perturbed no batch: compute() is a collective
        results = compute_on_every_rank(trainer, self._metrics, pl_module.device)
        self._metrics.clear()
        log_replicated(
            pl_module, {f"ood/{name}/{k}": value for name, values in results.items() for k, value in values.items()}
        )
        if results:
            add_figure(trainer, "ood/accuracy_per_perturbation", lambda: self.figure(results))

    @staticmethod
    def figure(results: dict[str, dict[str, float]]) -> Any:
        """Matplotlib bar chart of top-1/top-5 accuracy per perturbation."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 3.5))
        axes = figure.add_subplot()
        names = list(results)
        for offset, key in ((-0.2, "top1"), (0.2, "top5")):
            values = [results[name].get(key, float("nan")) for name in names]
            axes.bar([i + offset for i in range(len(names))], values, width=0.4, label=key)
        axes.set_xticks(range(len(names)), names, rotation=20)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.legend()
        figure.tight_layout()
        return figure
