"""Pixel space: attacks and perturbations on [0, 1] pixels, whatever normalization the inputs carry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_pdenets.errors import ConfigurationError

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["PixelSpace", "check_channel_stats", "normalization_of"]

PIXEL_TOLERANCE = 1e-3
"""How far outside [0, 1] a de-normalized input may lie (float rounding of normalize, then de-normalize)."""


def check_channel_stats(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Raise ``ValueError`` unless ``mean`` and ``std`` are both ``None`` or per-channel lists with ``std > 0``."""
    if (mean is None) != (std is None):
        raise ValueError(f"give both `mean` and `std` or neither, got mean={mean!r}, std={std!r}.")
    if mean is None or std is None:
        return
    if len(mean) != len(std) or len(mean) == 0:
        raise ValueError(f"`mean` and `std` need one value per channel each, got mean={mean!r}, std={std!r}.")
    if any(not s > 0 for s in std):
        raise ValueError(f"`std` entries must be > 0, got {std!r}.")


def normalization_of(
    trainer: pl.Trainer | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel (mean, std) the inputs were standardized with, or ``None`` for raw [0, 1] pixels.

    Explicit ``mean``/``std`` win; otherwise ``trainer.datamodule.mean`` / ``.std`` are used when the
    datamodule has them (every datamodule of :mod:`lightning_pdenets.data` does).
    """
    if mean is not None and std is not None:
        return tuple(map(float, mean)), tuple(map(float, std))
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dm_mean, dm_std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if dm_mean is None or dm_std is None:
        return None
    return tuple(map(float, dm_mean)), tuple(map(float, dm_std))


class PixelSpace(nn.Module):
    """``model((x - mean) / std)``: a classifier on standardized inputs seen as one on [0, 1] pixels.

    The wrapped model is referenced, not registered as a submodule, so that wrapping never moves,
    copies or re-registers its parameters.
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1), persistent=False
        )

    @classmethod
    def for_batch(
        cls,
        model: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        stats: tuple[Sequence[float], Sequence[float]] | None,
        owner: str = "This evaluation",
    ) -> PixelSpace:
        """The pixel-space view of ``model`` for ``inputs`` normalized with ``stats`` (``None``: raw pixels).

        Raises:
            ConfigurationError: (naming ``owner``) unless ``inputs`` is an image batch (N, C, H, W) whose
                de-normalized values lie in [0, 1]: attacks and perturbations clip to [0, 1], so standardized
                inputs taken for pixels, or the wrong ``mean``/``std``, would silently change the clean images.
        """
        if inputs.dim() != 4:
            raise ConfigurationError(
                f"{owner} works on images: it needs batches of shape (N, C, H, W), got {tuple(inputs.shape)}."
            )
        channels = inputs.shape[1]
        mean, std = stats if stats is not None else ((0.0,) * channels, (1.0,) * channels)
        if len(mean) != channels:
            raise ValueError(f"normalization has {len(mean)} channels but the batch has {channels}; fix `mean`/`std`.")
        space = cls(model, mean, std, device=inputs.device)
        with torch.no_grad():
            pixels = inputs.detach() * space.std.to(inputs) + space.mean.to(inputs)
            low, high = (bound.item() for bound in torch.aminmax(pixels))  # one pass
        if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
            how = (
                f"de-normalized with mean={list(mean)} and std={list(std)}"
                if stats is not None
                else "taken as pixels (no `mean`/`std` given, and the datamodule exposes none)"
            )
            raise ConfigurationError(
                f"{owner} perturbs [0, 1] pixels, but this batch, {how}, spans [{low:.3g}, {high:.3g}]: clipping "
                f"it to [0, 1] would change the clean images. Pass the inputs' normalization as `mean` and `std` "
                f"(one value per channel, as in transforms.Normalize), or give the datamodule `mean`/`std` "
                f"attributes."
            )
        return space

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std.to(x) + self.mean.to(x)).clamp(0.0, 1.0)

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.from_pixels(pixels))
