"""Where the samples of an evaluation batch sit in the evaluation set, whatever the number of processes.

A callback that draws random perturbations per batch, or evaluates the first ``num_batches`` batches, gets other
samples and other draws on every process count: under DDP, Lightning's ``UnrepeatedDistributedSampler`` (and torch's
``DistributedSampler``) deal the samples out in turn, rank ``r`` of ``W`` holding the samples ``r, r + W, r + 2W,
...``. :func:`batch_positions` recovers each sample's position in the whole set (its *global index*) from the loader
that yields the batches, so that limits and random draws can depend on that position only.

It assumes what evaluation loaders do: an unshuffled sampler, batches taken in order from the start of the epoch.
Loaders whose order it cannot know (a shuffled or custom sampler, a custom batch sampler, an iterable dataset) give
``None``; callers then fall back to per-batch limits and seeds.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["BatchPositions", "batch_positions", "derive_seed", "running_loader", "unknown_order_message"]

_MASK = (1 << 64) - 1


def derive_seed(seed: int, *keys: int) -> int:
    """A seed in [0, 2**63) that depends on ``seed`` and ``keys`` only (SplitMix64 finalizer, chained over the keys).

    Nearby inputs (``seed + 1``, the next sample) give unrelated seeds, unlike ``seed + index``.
    """
    state = seed & _MASK
    for key in keys:
        state = ((state ^ (key & _MASK)) + 0x9E3779B97F4A7C15) & _MASK
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
        state ^= state >> 31
    return state >> 1


@dataclass(frozen=True)
class BatchPositions:
    """The rows of one evaluation batch, placed in the evaluation set.

    Attributes:
        batch_idx: Index of the batch on this process.
        size: Rows in the batch.
        indices: Global index of every row (``None`` when the loader's order is unknown).
        batch_size: The loader's batch size per process (``None`` when the order is unknown).
    """

    batch_idx: int
    size: int
    indices: torch.Tensor | None = None
    batch_size: int | None = None

    def among_first(self, num_batches: int | None) -> torch.Tensor:
        """Mask of the rows among the set's first ``num_batches`` × ``batch_size`` samples by global index.

        With an unknown order, the whole batch if it is among this process's first ``num_batches`` batches.
        ``None`` selects every row.
        """
        if num_batches is None:
            return torch.ones(self.size, dtype=torch.bool)
        if self.indices is None or self.batch_size is None:
            return torch.full((self.size,), self.batch_idx < num_batches)
        return self.indices < num_batches * self.batch_size


def _sample_order(sampler: Any) -> tuple[int, int, int] | None:
    """``(rank, num_replicas, dataset size)`` of an unshuffled sampler that deals samples out in turn, else ``None``."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    if type(sampler) is SequentialSampler and isinstance(sampler.data_source, Sized):
        return 0, 1, len(sampler.data_source)
    # exact types: a subclass (Lightning's DistributedSamplerWrapper, a resumable sampler) may order samples otherwise
    distributed = type(sampler) in (DistributedSampler, UnrepeatedDistributedSampler)
    if distributed and not sampler.shuffle and isinstance(sampler.dataset, Sized):
        return sampler.rank, sampler.num_replicas, len(sampler.dataset)
    return None


def batch_positions(loader: object, batch_idx: int, size: int) -> BatchPositions:
    """Global indices of the ``size`` samples of batch ``batch_idx`` that ``loader`` yielded on this process.

    Known for a :class:`~torch.utils.data.DataLoader` with automatic batching over an unshuffled
    :class:`~torch.utils.data.SequentialSampler`, :class:`~torch.utils.data.DistributedSampler` or Lightning's
    ``UnrepeatedDistributedSampler``: local position ``p`` of rank ``r`` of ``W`` is global index ``r + p·W``
    (modulo the set's size: a padding ``DistributedSampler`` repeats the first samples). Otherwise ``indices`` is
    ``None``.
    """
    positions = BatchPositions(batch_idx, size)
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return positions
    order = _sample_order(loader.sampler)
    if order is None:
        return positions
    rank, replicas, total = order
    local = batch_idx * loader.batch_size + torch.arange(size)
    return BatchPositions(batch_idx, size, (rank + local * replicas) % max(total, 1), loader.batch_size)


def running_loader(trainer: pl.Trainer | None, stage: Literal["test", "validate"], dataloader_idx: int = 0) -> object:
    """The ``dataloader_idx``-th loader of the test or validation loop that ``trainer`` runs (``None`` if unknown)."""
    if trainer is None:
        return None
    if stage == "test":
        iterables = trainer.test_dataloaders
    elif trainer.state.fn == "validate":  # trainer.validate(): not the fit loop's loaders of an earlier fit
        combined = getattr(trainer.validate_loop, "_combined_loader", None)
        iterables = combined.iterables if combined is not None else None
    else:
        iterables = trainer.val_dataloaders
    if isinstance(iterables, dict):
        iterables = list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        return iterables[dataloader_idx] if 0 <= dataloader_idx < len(iterables) else None
    return iterables if dataloader_idx == 0 else None


def unknown_order_message(owner: str, loader: object, num_batches: int | None) -> str:
    """The warning for a loader whose sample order :func:`batch_positions` cannot know."""
    sampler = getattr(loader, "sampler", None)
    what = (
        f"its sampler is {type(sampler).__name__}, not an unshuffled sequential or distributed sampler"
        if loader is not None and getattr(loader, "batch_size", None) is not None
        else "it is not a DataLoader with automatic batching"
    )
    limit = " and `num_batches` counts this process's batches" if num_batches is not None else ""
    return (
        f"{owner}: cannot tell which samples of the evaluation set a batch holds ({what}); random draws are seeded "
        f"per batch{limit}, so the results depend on the number of processes and the batch size. Use an unshuffled "
        f"evaluation loader to make them independent of both."
    )
