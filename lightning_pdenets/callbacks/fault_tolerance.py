"""Save a checkpoint when a run is interrupted, so that no work is lost."""

from __future__ import annotations

import os
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from lightning_pdenets.errors import ModelFailure

__all__ = ["CheckpointOnInterrupt"]


class CheckpointOnInterrupt(OnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint``, saving beside the ``ModelCheckpoint`` files by default.

    On SIGTERM (Lightning turns it into an exception between steps), Ctrl-C or an exception it
    writes ``interrupted.ckpt``, from which ``pdenets fit --ckpt_path last`` resumes. It does not
    write one when the run stopped because the model itself failed (a NaN/Inf loss, an ODE solver
    that could not integrate): the last good checkpoint stays the newest one.

    Args:
        dirpath: Folder of the checkpoint; default: the ``ModelCheckpoint`` folder of the run.
        filename: File stem of the checkpoint.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "interrupted") -> None:
        super().__init__(dirpath=dirpath or ".", filename=filename)
        self.follow_model_checkpoint = dirpath is None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if isinstance(exception, ModelFailure):
            return
        model_checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if self.follow_model_checkpoint and model_checkpoints:
            self.dirpath = os.fspath(model_checkpoints[0].dirpath)
        super().on_exception(trainer, pl_module, exception)
