"""The default progress bar keeps its epoch, total and ETA when a run resumes in the middle of an epoch."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import OnExceptionCheckpoint, TQDMProgressBar

from lightning_pdenets.callbacks import ResumeAwareProgressBar
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import RKNetModule
from tests.test_resume import Interrupt

BATCHES = 6


class BarAtFirstBatch(pl.Callback):
    """What the training bar shows while the first batch of this fit runs, and that batch's index."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not hasattr(self, "shown"):
            bar = trainer.progress_bar_callback.train_progress_bar
            self.shown = (bar.desc, bar.n, bar.total, bar.initial)
            self.first_batch = batch_idx


def fit(root: Path, callbacks: list, ckpt_path: str | None = None) -> pl.Trainer:
    pl.seed_everything(0)
    model = RKNetModule(solver=dict(step_size=0.5), network=dict(width=4, num_downsamples=1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=BATCHES,
        limit_val_batches=1,
        default_root_dir=root,
        logger=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def mid_epoch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint saved after 4 of epoch 1's 6 batches."""
    root = tmp_path_factory.mktemp("interrupted")
    on_exception = OnExceptionCheckpoint(dirpath=root / "ckpt", filename="interrupted")
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        fit(root, [Interrupt(BATCHES + 4), on_exception, ResumeAwareProgressBar()])
    return str(root / "ckpt" / "interrupted.ckpt")


def test_resumed_bar_shows_epoch_total_and_batches_done(mid_epoch_checkpoint: str, tmp_path: Path) -> None:
    probe = BarAtFirstBatch()
    fit(tmp_path, [probe, ResumeAwareProgressBar()], ckpt_path=mid_epoch_checkpoint)
    description, done, total, initial = probe.shown
    assert probe.first_batch == 4  # the fifth batch of epoch 1: four were trained on before the interruption
    assert description.startswith("Epoch 1") and (done, total, initial) == (4, BATCHES, 4)


def test_lightning_bar_loses_them(mid_epoch_checkpoint: str, tmp_path: Path) -> None:
    """Why the bar exists: Lightning's own bar, resumed the same way, has no epoch and no total."""
    probe = BarAtFirstBatch()
    fit(tmp_path, [probe, TQDMProgressBar()], ckpt_path=mid_epoch_checkpoint)
    description, _, total, _ = probe.shown
    assert description.startswith("Training") and total is None


def test_a_fresh_run_is_unchanged(tmp_path: Path) -> None:
    probe = BarAtFirstBatch()
    fit(tmp_path, [probe, ResumeAwareProgressBar()])
    description, done, total, initial = probe.shown
    assert description.startswith("Epoch 0") and (done, total, initial) == (0, BATCHES, 0)
