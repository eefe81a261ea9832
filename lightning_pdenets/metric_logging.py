"""Logging of values that every DDP process already holds identically."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl

__all__ = ["log_occasional_step_values", "log_replicated", "step_values_are_read"]


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


def step_values_are_read(trainer: "pl.Trainer", progress_bar: bool = False) -> bool:
    """Whether a value logged on this training step reaches anyone: the loggers or, with ``progress_bar``, the bar.

    Lightning writes step-level values to the loggers only every ``log_every_n_steps`` steps and drops the
    others, yet each ``self.log`` call costs about half a millisecond, a noticeable share of a step on a GPU;
    so per-step values are logged only when read. Lightning's own decision is read from its logger connector.

    Args:
        trainer: The running trainer.
        progress_bar: Whether the value is shown in the progress bar (``prog_bar=True``), which reads it every step.
    """
    if progress_bar and trainer.progress_bar_callback is not None:
        return True
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))  # noqa: SLF001


def log_occasional_step_values(module: pl.LightningModule, metrics: Mapping[str, float]) -> None:
    """Log values computed on a few training steps only (a periodic check), so that the loggers always get them.

    ``self.log(..., on_step=True)`` reaches the loggers only on the trainer's ``log_every_n_steps`` steps and
    is silently dropped on the others; a check every 25 steps with logging every 50 would lose every other
    record. On the other steps the values are written to the loggers directly, at this global step. They
    reach ``trainer.callback_metrics`` either way.
    """
    trainer = module.trainer
    module.log_dict(dict(metrics), on_step=True, on_epoch=False)
    if not step_values_are_read(trainer):
        for logger in trainer.loggers:
            logger.log_metrics({name: float(value) for name, value in metrics.items()}, step=trainer.global_step)
