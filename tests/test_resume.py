"""Interrupted runs: a checkpoint on exception, exact resume (mid-epoch included), bit-for-bit determinism."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import RKNetModule


class Interrupt(pl.Callback):
    """Raise after ``step`` optimizer steps, like a pre-empted job."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated pre-emption")


def make_trainer(root: Path, callbacks: list, max_epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=6,
        limit_val_batches=2,
        deterministic=True,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=True,
    )


def train(root: Path, callbacks: list, ckpt_path: str | None = None, lr_scheduler: str = "multistep") -> RKNetModule:
    pl.seed_everything(123, workers=True)
    schedule = dict(lr_milestones=[1]) if lr_scheduler == "multistep" else {}
    model = RKNetModule(
        solver=dict(step_size=0.5),
        network=dict(width=8, num_downsamples=1),
        optimizer="sgd",
        lr=0.05,
        lr_scheduler=lr_scheduler,
        **schedule,
    )
    make_trainer(root, callbacks).fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return model


def parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """Parameters after an uninterrupted deterministic run."""
    return parameters(train(tmp_path_factory.mktemp("reference"), []))


def test_same_seed_reproduces_bit_for_bit(reference: torch.Tensor, tmp_path: Path) -> None:
    assert torch.equal(parameters(train(tmp_path, [])), reference)


@pytest.mark.parametrize("interrupt_step", [4, 9])  # mid-epoch 1 (inside a hook), mid-epoch 2
def test_interrupted_and_resumed_run_matches_uninterrupted(
    interrupt_step: int, reference: torch.Tensor, tmp_path: Path
) -> None:

    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "ckpt", filename="interrupted")
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        train(tmp_path / "run", [Interrupt(interrupt_step), on_exception])
    checkpoint = tmp_path / "ckpt" / "interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == interrupt_step

    resumed = parameters(train(tmp_path / "run", [], ckpt_path=str(checkpoint)))
    assert torch.equal(resumed, reference)


class SigTerm(pl.Callback):
    """Send SIGTERM to this process after ``step`` optimizer steps, as a cluster scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_resume_matches(reference: torch.Tensor, tmp_path: Path) -> None:
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "ckpt", filename="interrupted")
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        train(tmp_path / "run", [SigTerm(3), on_exception])
    checkpoint = tmp_path / "ckpt" / "interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    assert torch.equal(parameters(train(tmp_path / "run", [], ckpt_path=str(checkpoint))), reference)


def test_resume_mid_epoch_is_exact_when_the_schedule_sizes_itself_from_the_loader(tmp_path: Path) -> None:
    """One-cycle asks ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, so Lightning builds the
    training loader before it restores the checkpoint and never hands it the saved loader state; the resumed epoch
    must still skip the batches already trained on (it restarted the epoch's data at batch 0 before)."""
    reference = parameters(train(tmp_path / "reference", [], lr_scheduler="onecycle"))
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "ckpt", filename="interrupted")
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        train(tmp_path / "run", [Interrupt(4), on_exception], lr_scheduler="onecycle")
    checkpoint = str(tmp_path / "ckpt" / "interrupted.ckpt")
    assert torch.equal(
        parameters(train(tmp_path / "run", [], ckpt_path=checkpoint, lr_scheduler="onecycle")), reference
    )
