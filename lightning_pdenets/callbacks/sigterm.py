"""A SIGTERM handler that only raises Lightning's stop flag, with no collective inside the signal handler."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_pdenets.interruption import beat

__all__ = ["SigtermFlagOnly"]


class SigtermFlagOnly(Callback):
    """Make SIGTERM only mark the run as stopping; the loops then stop every rank together between batches.

    Lightning 2.6's own handler (``_SignalConnector._sigterm_notifier_fn``) broadcasts a tensor from rank 0
    *inside the signal handler*, wherever the main thread happens to be. Under DDP that broadcast pairs with
    whatever collective the other ranks are in at that moment (a gradient all-reduce, a metric sync), and a
    rank that receives the signal twice (from the scheduler and from the launcher) broadcasts twice: the ranks'
    collectives no longer match and the job hangs or fails. This callback re-registers SIGTERM, after Lightning
    registered its handler at the start of each stage, with one that sets a flag and nothing else. Lightning
    restores the previous handler when the stage ends.

    Alone (one process) and in evaluation stages the handler sets the trainer's stop flag, which Lightning checks
    between batches (:func:`lightning_pdenets.interruption.stop_requested` in the long evaluation grids). In a
    fit under DDP it only marks the signal as pending: Lightning's per-batch check reads rank 0's flag alone and
    then stops the flagged rank alone, whose peers wait for it in their next collective. So at every training
    batch's end and at every validation's end, all ranks all-reduce (max) their pending marks and, if any rank
    has one, set the trainer's flag on every rank together: all ranks stop at the same batch and write the
    interrupt checkpoint together. The handler never sets the trainer's flag in that mode, so a signal that
    arrives after the all-reduce waits for the next one instead of stopping one rank.

    Every batch's end also calls :func:`~lightning_pdenets.interruption.beat`, which tells
    :class:`~lightning_pdenets.interruption.StopWatchdog` that the process makes progress. The watchdog also
    signals this process's child processes (DDP workers that Lightning launched) in ``pdenets``; a Lightning
    project without it keeps relying on its scheduler signalling every process, as SLURM and ``torchrun`` do.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None
        self._pending = False

    def _install(self, trainer: pl.Trainer) -> None:
        beat()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._raise_stop_flag)

    def _raise_stop_flag(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if _ranks_agree_on_stopping(trainer):
            self._pending = True
        else:
            set_received_sigterm(trainer)

    def _agree_on_stopping(self, trainer: pl.Trainer) -> None:
        """Every rank of a DDP fit: set the trainer's stop flag on all ranks if any rank received SIGTERM."""
        if not _ranks_agree_on_stopping(trainer):
            return
        pending = torch.tensor([1 if self._pending else 0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
        if pending.item():
            self._pending = False
            set_received_sigterm(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = False

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        beat()
        self._agree_on_stopping(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree_on_stopping(trainer)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        beat()

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        beat()

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        beat()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None


def _ranks_agree_on_stopping(trainer: pl.Trainer) -> bool:
    """Whether SIGTERM waits for the ranks' agreement: a fit under DDP (the same answer on every rank)."""
    return (
        trainer.state.fn == TrainerFn.FITTING
        and trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def set_received_sigterm(trainer: pl.Trainer, value: bool = True) -> None:
    """Set the flag behind ``trainer.received_sigterm``, which Lightning's loops check between batches.

    Lightning has no public setter; this is the one place in the package that writes it
    (``tests/test_interruption.py`` fails, naming this function, if the attribute moves).
    """
    trainer._signal_connector.received_sigterm = value
