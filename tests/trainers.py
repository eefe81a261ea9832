"""The quiet Lightning Trainer most tests build: one CPU device, no logger, checkpoints, progress bar or summary."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

QUIET_TRAINER: dict[str, Any] = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A Trainer with :data:`QUIET_TRAINER`'s settings, any of them overridden by ``overrides``."""
    return pl.Trainer(**{**QUIET_TRAINER, **overrides})
