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
from lightning_pdenets.errors import CheckpointWriteError, ModelFailure, is_peer_crash
from lightning_pdenets.interruption import RUN_RECORD, beat, release_peers_after_local_failure

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

    Nor after Ctrl-C during a validation inside the fit or the epoch's end (its checkpoint saves): Lightning
    would resume such a file as if the validation or the epoch's end had completed, and that validation's metrics,
    its ``ModelCheckpoint`` scoring and the epoch's ``*_epoch`` values would be lost in silence. Ctrl-C asks for an
    immediate stop, so the callback does not finish that work first (as it does for SIGTERM): it keeps the last
    checkpoint as the resume point and says in one line that the progress since then is not saved.

    If writing the checkpoint fails (a full disk), it warns and lets the exception that stopped the
    run propagate, instead of hiding it behind the write error; after a failed checkpoint write it does not try.

    It keeps :data:`~lightning_pdenets.interruption.RUN_RECORD` (the checkpoints the fit resumed from and wrote),
    from which ``pdenets`` says after a stop what there is to resume from.

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
        self._validated_in_batch = False
        self._saving = False

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is (or would be) written."""
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            RUN_RECORD.reset()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        RUN_RECORD.fit_started = True
        RUN_RECORD.resumed_from = os.fspath(trainer.ckpt_path) if trainer.ckpt_path else None
        logger = trainer.logger  # pdenets' `--ckpt_path last` looks in the logger's save_dir/name
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
        RUN_RECORD.log_root = os.fspath(root)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_at_train_start = trainer.global_step  # after a checkpoint was restored
        self._deferred_sigterm = False

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._validated_in_batch = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_model_checkpoints(trainer)

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
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_in_batch = True
            self._note_model_checkpoints(trainer)
        if self._deferred_sigterm:
            self._deferred_sigterm = False
            set_received_sigterm(trainer, True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        steps_at_start, self._steps_at_train_start = self._steps_at_train_start, None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._note_model_checkpoints(trainer)
        if isinstance(exception, (ModelFailure, CheckpointWriteError)) or is_peer_crash(exception):
            # a peer crash: saving needs the collectives that just failed, and the peer's error is the news; after a
            # failed write (a full disk) another write fails too
            return
        stopped_by_user = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        where = f"{trainer.state.fn}/{trainer.state.stage}/{trainer.global_step}"
        if not stopped_by_user and release_peers_after_local_failure(exception, where):
            return  # under DDP an error may be this rank's alone: saving would wait in collectives no peer joins
        if steps_at_start is None or trainer.global_step == steps_at_start:
            if stopped_by_user and fitting:  # after an error (a bad setting, say) the error alone is the news
                rank_zero_info(
                    f"CheckpointOnInterrupt: no {self.filename}{self.FILE_EXTENSION} written, the run stopped before "
                    f"its first optimizer step (nothing newer than where it started)."
                )
            return
        if isinstance(exception, KeyboardInterrupt) and _in_epoch_end_or_validation(trainer):
            where_stopped = "a validation" if trainer.validating else "an epoch's end hooks (its checkpoint saves)"
            RUN_RECORD.not_saved_because = (
                f"Ctrl-C came during {where_stopped}, which a checkpoint cannot resume exactly (its metrics would be "
                f"lost), so no {self.filename}{self.FILE_EXTENSION} was written"
            )
            rank_zero_info(
                f"CheckpointOnInterrupt: {RUN_RECORD.not_saved_because}; the progress since the last "
                f"checkpoint is not saved."
            )
            return
        self._follow_model_checkpoint(trainer)
        self._saving = True
        beat()  # the save is progress too (for the watchdog): it can take a while
        try:
            # A save, not a load (nothing is unpickled): weights_only=False asks for the full checkpoint (optimizers,
            # loops) explicitly, since Lightning warns when it is unset. Every load of it uses weights_only=True.
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        except Exception as save_error:  # e.g. a full disk: the exception that stopped the run stays the news
            rank_zero_warn(
                f"CheckpointOnInterrupt: the run stopped with {type(exception).__name__}: {exception}; writing "
                f"{self.ckpt_path} failed too ({type(save_error).__name__}: {save_error}), so no interrupt checkpoint "
                f"was written."
            )
        else:
            RUN_RECORD.interrupt_checkpoint = self.ckpt_path
            RUN_RECORD.note_written(self.ckpt_path)
        finally:
            self._saving = False

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._saving:
            # stopped right after a validation inside the epoch: Lightning resumes by skipping that validation and
            # counts the batch's logger step once more
            after_mid_epoch_validation = (
                self._validated_in_batch and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            )
            _undo_logger_step_on_resume(checkpoint, after_mid_epoch_validation)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls callback teardown only when the stage did not raise: after a completed fit an
        # interrupt checkpoint of this run is stale, and `--ckpt_path last` must not pick it up later.
        if stage == "fit":
            self._steps_at_train_start = None
            self._note_model_checkpoints(trainer)
            self._follow_model_checkpoint(trainer)
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    def _note_model_checkpoints(self, trainer: pl.Trainer) -> None:
        """Note the files the ``ModelCheckpoint`` callbacks wrote (on every rank: they keep their paths there)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                for path in (callback.best_model_path, callback.last_model_path):
                    if path and os.path.isfile(path):
                        RUN_RECORD.note_written(path)

    def _follow_model_checkpoint(self, trainer: pl.Trainer) -> None:
        dirpaths = [c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if self.follow_model_checkpoint and dirpaths:
            self.dirpath = os.fspath(dirpaths[0])


def _in_epoch_end_or_validation(trainer: pl.Trainer) -> bool:
    """Whether a fit is inside a validation (not the sanity check) or its epoch's end hooks (the checkpoint saves)."""
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return False
    epoch = trainer.fit_loop.epoch_progress.current  # processed counts an epoch whose end hooks have begun
    return bool(trainer.validating) or getattr(epoch, "processed", 0) > epoch.completed


def _undo_logger_step_on_resume(checkpoint: dict, after_mid_epoch_validation: bool = False) -> None:
    """Compensate the logger step Lightning adds when it resumes from inside a training batch.

    Resuming, Lightning 2.6 counts one more stepped batch (``_batches_that_stepped``, the logger's
    step) unless the checkpoint was written after a batch's end hooks, assuming a save inside the
    batch that the count has not reached yet. An exception stops the run before the next batch's
    step (in ``on_train_batch_start`` or inside ``training_step``), after the last batch was counted:
    every later scalar would be logged one step late. After a batch's end hooks, it counts one more
    too when the batch ran a validation inside the epoch (it assumes a save during that validation),
    which ``after_mid_epoch_validation`` says: a stop deferred to that validation's end came after
    the count.
    """
    epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = epoch_loop.get("epoch_loop.batch_progress", {}).get("total")
    state = epoch_loop.get("epoch_loop.state_dict")
    if not progress or not state or not state.get("_batches_that_stepped"):
        return
    ready, started, processed, completed = (progress[k] for k in ("ready", "started", "processed", "completed"))
    after_batch_end_hooks = ready == started == processed and completed in (processed, processed - 1)
    if not after_batch_end_hooks or (after_mid_epoch_validation and completed == processed):
        state["_batches_that_stepped"] -= 1
