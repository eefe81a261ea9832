"""Logging of values that every DDP process already holds identically."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl

__all__ = ["log_replicated"]


def log_replicated(module: pl.LightningModule, metrics: Mapping[str, Any], **log_kwargs: Any) -> None:
    """Log epoch-level values that are the same on every rank, e.g. a computed torchmetrics result or a parameter.

    Lightning warns ("It is recommended to use sync_dist=True ...") about every epoch-level value logged
    without ``sync_dist`` under DDP, although these values need no averaging. Syncing them with a max
    reduction silences the warning, keeps the value exact (a mean over ranks could round it) and costs one
    small all-reduce per value. Like any ``sync_dist`` logging it is a collective: every rank must call it
    with the same names, as the epoch-end hooks that use it do.

    Args:
        module: The LightningModule to log through.
        metrics: Names and values (numbers or scalar tensors); logged once per epoch.
        **log_kwargs: Further arguments of :meth:`LightningModule.log_dict` (``prog_bar``, ...).
    """
    module.log_dict(dict(metrics), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", **log_kwargs)
