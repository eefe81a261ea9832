"""DataLoaders that shard correctly under DDP and resume exactly, mid-epoch included.

* Training order is a pure function of (seed, epoch): a :class:`DistributedSampler` with
  ``num_replicas=1`` on a single process, sharded across ranks under DDP. Lightning calls its
  ``set_epoch`` every epoch, so a resumed run sees the same order as an uninterrupted one.
* :class:`ResumableDataLoader` is stateful, so Lightning saves its ``state_dict`` in checkpoints
  and (when it builds the loader after restoring) calls ``load_state_dict`` on resume. Every epoch
  skips, without loading them, the samples of the batches that Lightning's progress counts as
  completed in that epoch when the first batch is fetched (``completed_batches``: 0 for a new epoch,
  the restored count after a mid-epoch resume), so data and optimizer steps line up even when the
  interrupt struck inside a hook, between fetching a batch and finishing its step.
* Evaluation under DDP uses Lightning's ``UnrepeatedDistributedSampler``: every sample is
  evaluated exactly once, so padded duplicates never distort validation or test accuracy.

torch's DataLoader has no resumable state of its own; ``torchdata``'s StatefulDataLoader would
add a dependency for the ~30 lines below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_pdenets.errors import ConfigurationError

__all__ = ["ResumableDataLoader", "ResumableSampler", "check_global_batch_size", "check_split_size", "make_loader"]


def _world_size() -> int:
    """Processes of the initialized process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed() -> bool:
    return _world_size() > 1


def check_split_size(dataset: Dataset, world_size: int, split: str) -> None:
    """Refuse a non-empty ``split`` with fewer samples than processes: a process would hold none of it.

    Evaluation hands every process distinct samples (Lightning's ``UnrepeatedDistributedSampler`` asserts each holds
    one); training would pad every process's share with copies of the same few samples.

    Raises:
        ConfigurationError: naming the split, its size, the number of processes and the fixes.
    """
    if not isinstance(dataset, Sized) or not 0 < len(dataset) < world_size:
        return
    size = len(dataset)
    raise ConfigurationError(
        f"The {split} split has {size} sample{'s' if size > 1 else ''}, fewer than the {world_size} processes of this "
        f"run, and under DDP every process needs at least one; give the {split} split at least {world_size} samples "
        f"or run on at most {size} device{'s' if size > 1 else ''} (`trainer.devices`)."
    )


class ResumableSampler(DistributedSampler):
    """Epoch-seeded, rank-sharded sample order that can start after ``skip`` samples of the epoch."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int) -> None:
        replicas = {} if _distributed() else {"num_replicas": 1, "rank": 0}
        super().__init__(dataset, shuffle=shuffle, seed=seed, drop_last=False, **replicas)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose epoch position is checkpointed."""

    def __init__(self, *args: Any, completed_batches: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.completed_batches = completed_batches
        self.batches_consumed = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator: skips a resumed epoch's batches
        # This body runs at the first ``next()``, when the epoch loop has reset its progress: the batches of this
        # epoch it counts as completed are 0 for a new epoch and the restored count after a mid-epoch resume. It
        # does not wait for ``load_state_dict``: Lightning skips that call when the loader was built before the
        # checkpoint was restored (``trainer.estimated_stepping_batches`` in ``configure_optimizers``, e.g. the
        # one-cycle schedule), and iterates the loader built then.
        skip = self.completed_batches() if self.completed_batches is not None else 0
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.skip = skip * (self.batch_size or 1)
        self.batches_consumed = skip
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch if isinstance(self.sampler, ResumableSampler) else 0
        return {"batches_consumed": self.batches_consumed, "epoch": epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(int(state.get("epoch", 0)))


def check_global_batch_size(global_batch_size: int | None, world_size: int) -> int | None:
    """Per-process batch size for ``global_batch_size`` split over ``world_size`` processes."""
    if global_batch_size is None:
        return None
    if global_batch_size % world_size:
        raise ValueError(
            f"`global_batch_size`={global_batch_size} is not divisible by the {world_size} processes of this run; "
            f"use a multiple of {world_size} (e.g. {global_batch_size - global_batch_size % world_size or world_size}) "
            f"or set `batch_size` per process instead."
        )
    return global_batch_size // world_size


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    completed_batches: Callable[[], int] | None = None,
    split: str | None = None,
) -> DataLoader:
    """Training loader (shuffled, resumable) or evaluation loader (ordered, never duplicating samples).

    ``completed_batches`` returns how many batches of the current epoch the trainer has finished
    (read only when resuming). ``split`` names the dataset in errors (default: "training" or "evaluation").

    Raises:
        ConfigurationError: under DDP, for a non-empty dataset with fewer samples than processes.
    """
    check_split_size(dataset, _world_size(), split or ("training" if train else "evaluation"))
    common: dict[str, Any] = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    if train:
        sampler = ResumableSampler(dataset, shuffle=True, seed=seed)
        return ResumableDataLoader(dataset, sampler=sampler, completed_batches=completed_batches, **common)
    eval_sampler = UnrepeatedDistributedSampler(dataset, shuffle=False) if _distributed() else None
    return DataLoader(dataset, sampler=eval_sampler, shuffle=False, **common)
