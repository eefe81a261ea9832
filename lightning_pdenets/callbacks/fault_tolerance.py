"""Save a checkpoint when a run is interrupted, so that no work is lost."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_pdenets.callbacks.sigterm import set_received_sigterm
from lightning_pdenets.errors import ModelFailure, is_peer_crash
from lightning_pdenets.interruption import release_peers_after_local_failure

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
    resumes from; it says so only when the user stopped the run (Ctrl-C, SIGTERM), since after an error the error
    is the news. Nor, under DDP, after an error that this process met alone (a corrupt image in its shard): saving
    would wait in collectives its peers never join, so it leaves the process group instead, within seconds, and
    the peers end with one line naming it
    (:func:`~lightning_pdenets.interruption.release_peers_after_local_failure`); an error every rank met at the
    same point still writes the checkpoint. After a run that completes, the
    file is removed, as Lightning's ``OnExceptionCheckpoint`` does.

    Not a subclass of ``OnExceptionCheckpoint``: with one of those present, Lightning turns every
    ``fit(ckpt_path=None)`` into ``ckpt_path="last"``. A fresh run then warns that "the last model of
    the previous fit call will be used" and, when the checkpoint folder is fixed, silently resumes
    an older run. Resuming stays explicit here.

    If writing the checkpoint fails (a full disk), it warns and lets the exception that stopped the
    run propagate, instead of hiding it behind the write error.

    A resumed run logs what an uninterrupted one would: a SIGTERM that arrives during the validation
    at an epoch's end takes effect once that validation is over (Lightning would stop after the next
    validation batch, and a resume would skip the rest of it), and the logger step Lightning adds when
    resuming from inside a batch is undone in the checkpoint.

    Args:
        dirpath: Folder of the checkpoint; default: the ``ModelCheckpoint`` folder of the run.
        filename: File stem of the checkpoint.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, filename: str = "interrupted") -> None:
        super().__init__()
        # checked here: a bad one would otherwise surface only when the run is interrupted, replacing the interrupt
        if (
            not isinstance(filename, str)
            or not filename
            or os.sep in filename
            or (os.altsep is not None and os.altsep in filename)
            or filename.endswith(self.FILE_EXTENSION)
        ):
            raise ValueError(
                f"`filename` must be a plain file stem such as 'interrupted' (no folder, no {self.FILE_EXTENSION}: "
                f"it is added), got {filename!r}."
            )
        if dirpath is not None and (not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath)):
            raise ValueError(
                f"`dirpath` must be a folder path or None (the run's ModelCheckpoint folder), got {dirpath!r}."
            )
        self.dirpath = str(dirpath) if dirpath is not None else "."
        self.filename = filename
        self.follow_model_checkpoint = dirpath is None
        self._steps_at_train_start: int | None = None
        self._deferred_sigterm = False
        self._saving = False

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is (or would be) written."""
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_at_train_start = trainer.global_step  # after a checkpoint was restored
        self._deferred_sigterm = False

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning stops a validation inside fit at the next batch on SIGTERM. A checkpoint of that state
        # resumes as if the validation had finished: its metrics and the epoch's end would be lost. So the
        # validation runs to its end first, and the run stops right after it (a state Lightning resumes exactly).
        if trainer.received_sigterm and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            set_received_sigterm(trainer, False)  # no public way to defer it
            self._deferred_sigterm = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred_sigterm:
            self._deferred_sigterm = False
            set_received_sigterm(trainer, True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        steps_at_start, self._steps_at_train_start = self._steps_at_train_start, None
        if isinstance(exception, ModelFailure) or is_peer_crash(exception):
            return  # a peer crash: saving needs the collectives that just failed, and the peer's error is the news
        stopped_by_user = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        where = f"{trainer.state.fn}/{trainer.state.stage}/{trainer.global_step}"
        if not stopped_by_user and release_peers_after_local_failure(exception, where):
            return  # under DDP an error may be this rank's alone: saving would wait in collectives no peer joins
        if steps_at_start is None or trainer.global_step == steps_at_start:
            if stopped_by_user:  # after an error (a bad setting, say) the error alone is the news
                rank_zero_info(
                    f"CheckpointOnInterrupt: no {self.filename}{self.FILE_EXTENSION} written, the run stopped before "
                    f"its first optimizer step (nothing newer than where it started)."
                )
            return
        self._follow_model_checkpoint(trainer)
        self._saving = True
        try:
            # A save, not a load (nothing is unpickled): weights_only=False asks for the full checkpoint (optimizers,
            # loops) explicitly, since Lightning warns when it is unset. Every load of it uses weights_only=True.
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        except Exception as save_error:  # e.g. a full disk: the exception that stopped the run stays the news
            rank_zero_warn(
                f"CheckpointOnInterrupt: the run stopped with {type(exception).__name__}: {exception}; writing "
                f"{self.ckpt_path} failed too ({type(save_error).__name__}: {save_error}), so no interrupt checkpoint "
                f"was written. `--ckpt_path last` resumes from the last good checkpoint."
            )
        finally:
            self._saving = False

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._saving:
            _undo_logger_step_on_resume(checkpoint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls callback teardown only when the stage did not raise: after a completed fit an
        # interrupt checkpoint of this run is stale, and `--ckpt_path last` must not pick it up later.
        if stage == "fit":
            self._steps_at_train_start = None
            self._follow_model_checkpoint(trainer)
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    def _follow_model_checkpoint(self, trainer: pl.Trainer) -> None:
        dirpaths = [c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if self.follow_model_checkpoint and dirpaths:
            self.dirpath = os.fspath(dirpaths[0])


def _undo_logger_step_on_resume(checkpoint: dict) -> None:
    """Compensate the logger step Lightning adds when it resumes from inside a training batch.

    Resuming, Lightning 2.6 counts one more stepped batch (``_batches_that_stepped``, the logger's
    step) unless the checkpoint was written after a batch's end hooks, assuming a save inside the
    batch that the count has not reached yet. An exception stops the run before the next batch's
    step (in ``on_train_batch_start`` or inside ``training_step``), after the last batch was counted:
    every later scalar would be logged one step late.
    """
    epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = epoch_loop.get("epoch_loop.batch_progress", {}).get("total")
    state = epoch_loop.get("epoch_loop.state_dict")
    if not progress or not state or not state.get("_batches_that_stepped"):
        return
    ready, started, processed, completed = (progress[k] for k in ("ready", "started", "processed", "completed"))
    after_batch_end_hooks = ready == started == processed and completed in (processed, processed - 1)
    if not after_batch_end_hooks:
        state["_batches_that_stepped"] -= 1
