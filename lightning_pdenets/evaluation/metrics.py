"""Accuracy metrics: one definition of the top-1 and top-5 collections models and callbacks log."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["accuracy_metrics", "compute_on_every_rank"]


def accuracy_metrics(
    num_classes: int,
    prefix: str = "",
    key: str = "top{k}",
    device: torch.device | None = None,
) -> MetricCollection:
    """Micro top-1 accuracy and, with more than 5 classes, top-5 accuracy, as one collection.

    Args:
        num_classes: Number of classes of the logits.
        prefix: Put before every key in the collection's output (``"val/"`` gives ``val/acc_top1``).
        key: The key of each metric, with ``{k}`` for the k of top-k: ``"top{k}"`` (``top1``, ``top5``, what the
            robustness callbacks log per attack), ``"acc_top{k}"`` (the models' ``train/acc_top1``, ...).
        device: Where to put the metrics' states (``None``: left where they are created, e.g. for a
            LightningModule's attribute, which Lightning moves).
    """
    metrics: dict[str, Metric | MetricCollection] = {
        key.format(k=1): MulticlassAccuracy(num_classes, top_k=1, average="micro")
    }
    if num_classes > 5:
        metrics[key.format(k=5)] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    collection = MetricCollection(metrics, prefix=prefix or None)
    return collection if device is None else collection.to(device)


def compute_on_every_rank(
    trainer: pl.Trainer | None,
    metrics: dict[str, MetricCollection],
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Compute the accuracy collections of ``metrics`` with the same collectives, in the same order, on every rank.

    Callbacks create a collection on a rank's first batch of its kind, so a rank that attacked or perturbed
    fewer batches (fewer evaluation batches than ``num_batches``, or none) holds fewer collections than its
    peers, and skipping their ``compute()`` (a collective) would leave the peers waiting forever. Here the
    ranks first exchange which keys they updated and the number of classes (one gather, on every rank); then
    every rank creates the missing collections empty and computes all keys in sorted order.

    Args:
        trainer: The running trainer (``None``: a single process).
        metrics: Collections from :func:`accuracy_metrics`, by key; completed in place.
        device: Where to create missing collections.

    Returns:
        ``{key: {"top1": ..., "top5": ...}}`` for every key some rank updated, the same on every rank
        (empty when no rank updated any).
    """
    local = (
        next((int(cast(Any, c["top1"]).num_classes) for c in metrics.values()), 0),
        sorted(key for key, collection in metrics.items() if collection["top1"].update_called),
    )
    gathered: list[Any] = [local]
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)  # on every rank, whatever it holds
    num_classes = max(classes for classes, _ in gathered)
    results = {}
    for key in sorted({key for _, keys in gathered for key in keys}):
        collection = metrics.setdefault(key, accuracy_metrics(num_classes, device=device))
        with warnings.catch_warnings():  # an empty collection of this rank: its zeros join the others' sums
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            results[key] = {name: float(value) for name, value in collection.compute().items()}
    return results
