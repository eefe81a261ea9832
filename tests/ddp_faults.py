"""Test-only callbacks that misbehave on purpose, for tests/test_ddp_cli.py (given on the command line)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class SkipCollectiveOnRank1(Callback):
    """At ``epoch``'s second batch rank 0 enters a barrier that rank 1 never joins (rank 1 busy-waits instead).

    Writes ``blocked`` into the working directory first, so the test knows when to send SIGTERM.
    """

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != 1:
            return
        Path(f"blocked_rank{trainer.global_rank}").touch()
        if trainer.global_rank == 0:
            torch.distributed.barrier()
        while True:  # rank 1: stuck in Python, ignoring the stop flag (a hung data loader, say)
            time.sleep(0.2)


class TouchWhenStarted(Callback):
    """Write ``started_<stage>`` into the working directory at the first batch of ``stage`` (test, fit)."""

    def __init__(self, stage: str = "test", epoch: int = 0, batch: int = 0) -> None:
        self.stage, self.epoch, self.batch = stage, epoch, batch

    def _touch(self, trainer: pl.Trainer, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            Path(f"started_{self.stage}_rank{trainer.global_rank}").touch()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.stage == "test":
            self._touch(trainer, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.stage == "fit":
            self._touch(trainer, batch_idx)
            if trainer.current_epoch == self.epoch and batch_idx == self.batch:
                time.sleep(3)  # room for the test's SIGTERM to arrive in this epoch


class SigtermOnRank(Callback):
    """Send SIGTERM to this process on rank ``rank`` alone, as ``batch`` of ``epoch`` starts (a scheduler that
    signals one process, a ``kill`` of one worker)."""

    def __init__(self, rank: int = 1, epoch: int = 0, batch: int = 2) -> None:
        self.rank, self.epoch, self.batch = rank, epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if (trainer.global_rank, trainer.current_epoch, batch_idx) == (self.rank, self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)
