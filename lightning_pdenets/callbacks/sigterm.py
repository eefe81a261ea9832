"""A SIGTERM handler that only raises Lightning's stop flag, with no collective inside the signal handler."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["SigtermFlagOnly"]


class SigtermFlagOnly(Callback):
    """Make SIGTERM only mark the run as stopping; the loops then stop every rank together between batches.

    Lightning 2.6's own handler (``_SignalConnector._sigterm_notifier_fn``) broadcasts a tensor from rank 0
    *inside the signal handler*, wherever the main thread happens to be. Under DDP that broadcast pairs with
    whatever collective the other ranks are in at that moment (a gradient all-reduce, a metric sync), and a
    rank that receives the signal twice (from the scheduler and from the launcher) broadcasts twice: the ranks'
    collectives no longer match and the job hangs or fails. This callback re-registers SIGTERM, after Lightning
    registered its handler at the start of each stage, with one that sets the trainer's stop flag and nothing
    else. The collective decision is then made where every rank is at the same point: Lightning's per-batch
    check in training, and :func:`lightning_pdenets.interruption.stop_requested` in the long evaluation grids.
    Lightning restores the previous handler when the stage ends.

    The process's child processes (DDP workers that Lightning launched) are signalled by
    :class:`lightning_pdenets.interruption.StopWatchdog` in ``pdenets``; a Lightning project without it keeps
    relying on its scheduler signalling every process, as SLURM and ``torchrun`` do.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None

    def _install(self, trainer: pl.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._raise_stop_flag)

    def _raise_stop_flag(self, signum: int, frame: FrameType | None) -> None:
        if self._trainer is not None:
            set_received_sigterm(self._trainer)

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
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None


def set_received_sigterm(trainer: pl.Trainer, value: bool = True) -> None:
    """Set the flag behind ``trainer.received_sigterm``, which Lightning's loops check between batches.

    Lightning has no public setter; this is the one place in the package that writes it
    (``tests/test_interruption.py`` fails, naming this function, if the attribute moves).
    """
    trainer._signal_connector.received_sigterm = value
