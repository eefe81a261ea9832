"""Save a checkpoint when a run is interrupted, so that no work is lost."""

from __future__ import annotations

import os
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_pdenets.errors import ModelFailure, is_peer_crash

__all__ = ["CheckpointOnInterrupt"]


class CheckpointOnInterrupt(Checkpoint):
    """Save a checkpoint when a run is interrupted, beside the ``ModelCheckpoint`` files by default.

    On SIGTERM (Lightning turns it into an exception between steps), Ctrl-C or an exception it
    writes ``interrupted.ckpt``, from which ``pdenets fit --ckpt_path last`` (or
    ``trainer.fit(..., ckpt_path=callback.ckpt_path)``) resumes. It does not write one when the run
    stopped because the model itself failed (a NaN/Inf loss, an ODE solver that could not
    integrate) or because another DDP process crashed: the last good checkpoint stays the newest
    one. Nor does it when no optimizer step was taken since training started (an error while setting
    up, or before the first step): the model then holds nothing newer than where the run started
    (an untrained or not yet restored model), and such a file would become what ``--ckpt_path last``
    resumes from. After a run that completes, the file is removed, as Lightning's
    ``OnExceptionCheckpoint`` does.

    Not a subclass of ``OnExceptionCheckpoint``: with one of those present, Lightning turns every
    ``fit(ckpt_path=None)`` into ``ckpt_path="last"``. A fresh run then warns that "the last model of
    the previous fit call will be used" and, when the checkpoint folder is fixed, silently resumes
    an older run. Resuming stays explicit here.

    If writing the checkpoint fails (a full disk), it warns and lets the exception that stopped the
    run propagate, instead of hiding it behind the write error.

    Args:
        dirpath: Folder of the checkpoint; default: the ``ModelCheckpoint`` folder of the run.
        filename: File stem of the checkpoint.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: Optional[str] = None, filename: str = "interrupted") -> None:
        super().__init__()
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"`filename` must be a non-empty file stem (without .ckpt), got {filename!r}.")
        self.dirpath = dirpath or "."
        self.filename = filename
        self.follow_model_checkpoint = dirpath is None
        self._steps_at_train_start: Optional[int] = None

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is (or would be) written."""
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._steps_at_train_start = trainer.global_step  # after a checkpoint was restored

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        steps_at_start, self._steps_at_train_start = self._steps_at_train_start, None
        if isinstance(exception, ModelFailure) or is_peer_crash(exception):
            return  # a peer crash: saving needs the collectives that just failed, and the peer's error is the news
        if steps_at_start is None or trainer.global_step == steps_at_start:
            rank_zero_info(
                f"CheckpointOnInterrupt: no {self.filename}{self.FILE_EXTENSION} written, the run stopped before "
                f"its first optimizer step (nothing newer than where it started)."
            )
            return
        self._follow_model_checkpoint(trainer)
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as save_error:  # e.g. a full disk: the exception that stopped the run stays the news
            rank_zero_warn(
                f"CheckpointOnInterrupt: the run stopped with {type(exception).__name__}: {exception}; writing "
                f"{self.ckpt_path} failed too ({type(save_error).__name__}: {save_error}), so no interrupt checkpoint "
                f"was written. `--ckpt_path last` resumes from the last good checkpoint."
            )

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Lightning calls callback teardown only when the stage did not raise: after a completed fit an
        # interrupt checkpoint of this run is stale, and `--ckpt_path last` must not pick it up later.
        if stage == "fit":
            self._steps_at_train_start = None
            self._follow_model_checkpoint(trainer)
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    def _follow_model_checkpoint(self, trainer: "pl.Trainer") -> None:
        model_checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if self.follow_model_checkpoint and model_checkpoints:
            self.dirpath = os.fspath(model_checkpoints[0].dirpath)
