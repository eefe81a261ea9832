"""Logging of values that every DDP process already holds identically, and the one rule for collectives.

**The collective rule.** Under DDP every rank must enter every collective (an all-reduce, all-gather,
broadcast or barrier) in the same order, whatever its rank-local state: the progress bar (Lightning shows it
on rank 0 only), the loggers (rank 0 writes), rank-zero-only callbacks, and the number of evaluation batches
(ranks may hold different numbers). In this package that means:

1. Reduce explicitly, at a point every rank reaches unconditionally (``trainer.strategy.reduce``,
   ``reduce_boolean_decision``, a torchmetrics ``compute()``), and decide *after* the collective, never
   before it from rank-local state (``if not self._metrics: return`` before a ``compute()`` is the bug).
2. Log the reduced value with :func:`log_replicated`, which is no collective. Never hand Lightning an
   epoch-level value with ``sync_dist=True`` (or a torchmetrics object) from a training-epoch hook:
   Lightning syncs it lazily, when something first reads it, and the first reader is the progress bar's
   ``on_train_epoch_end`` on rank 0 only; the other ranks meanwhile enter the next collective of the
   epoch's end, and the job deadlocks (issue 26).
3. Step-level ``sync_dist=True`` values are synced when logged, so they are safe as long as whether they
   are logged depends on the configuration only (:func:`step_values_are_read`), never on the rank.
4. A stop request (SIGTERM) is checked rank-locally and ends the rank without another collective
   (:func:`lightning_pdenets.interruption.stop_requested`).
5. An error met by one rank alone (a corrupt image in its shard) ends that rank without another collective:
   it leaves the process group, which fails the peers' pending collective at once, and they end with one line
   naming it (:func:`lightning_pdenets.interruption.release_peers_after_local_failure`, called by
   ``CheckpointOnInterrupt``).

``tests/test_ddp_cli.py`` runs the ``pdenets`` CLI as users do (progress bar, TensorBoard, every callback
preset) on 2 gloo processes, so a break of this rule fails there with every rank's stack.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.warnings import PossibleUserWarning

__all__ = ["log_occasional_step_values", "log_replicated", "step_values_are_read"]

_SILENCED_NAMES: set[str] = set()


def log_replicated(module: pl.LightningModule, metrics: Mapping[str, Any], **log_kwargs: Any) -> None:
    """Log epoch-level values that are the same on every rank, e.g. a computed torchmetrics result or a parameter.

    No collective: the values are already reduced (or replicated, like parameters), so nothing is synced,
    now or when Lightning later reads them (see the collective rule above). Lightning would warn that such
    values should use ``sync_dist=True``; that advice is wrong here and is silenced for exactly these names.

    Args:
        module: The LightningModule to log through.
        metrics: Names and values (numbers or scalar tensors); logged once per epoch.
        **log_kwargs: Further arguments of :meth:`LightningModule.log_dict` (``prog_bar``, ...).
    """
    for name in metrics:
        if name not in _SILENCED_NAMES:
            _SILENCED_NAMES.add(name)
            # Lightning 2.x's text (logger_connector/result.py); tests/test_ddp_cli.py fails if it changes
            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`"),
                category=PossibleUserWarning,
            )
    module.log_dict(dict(metrics), on_step=False, on_epoch=True, sync_dist=False, reduce_fx="max", **log_kwargs)


def step_values_are_read(trainer: pl.Trainer, progress_bar: bool = False) -> bool:
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
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


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
