"""Exact resume for every LightningModule and every callback (the cases of tests/ddp_cases.py).

Each case trains for two epochs without interruption, and again with a simulated pre-emption in
the middle of the second epoch (``CheckpointOnInterrupt``, the default of ``pdenets``, then ``fit(ckpt_path=...)``
with a fresh model and fresh callbacks). In deterministic mode both runs must end bit-identical:
parameters, buffers, solver settings, callback state (adapted step sizes and tolerances, NFE
history, refinement level) and every logged metric, the training-epoch means and accuracies of the
interrupted epoch included: the final values, and every scalar sent to the logger at every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger

from lightning_pdenets.callbacks import CheckpointOnInterrupt
from lightning_pdenets.protocols import find_ode_blocks
from tests.ddp_cases import CASES, DDPCase

pytestmark = pytest.mark.cli

BATCH_SIZE = 16
EPOCHS = 2
RESUMABLE = [name for name, case in CASES.items() if not (case.expect_error or case.rank_errors)]


class PreemptAfterBatches(pl.Callback):
    """Raise once ``batches`` training batches are complete, when the next one starts.

    Between batches, like Lightning's SIGTERM handling (which raises after the batch's hooks have
    run), and counted in batches, not optimizer steps (PR-Net takes four per batch).
    """

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batches:
            raise RuntimeError("simulated pre-emption")


class RecordingLogger(Logger):
    """Keeps every scalar Lightning logs as ``{(name, step): value}``; a resumed run writes into the same dict."""

    def __init__(self, scalars: dict[tuple[str, int], float]) -> None:
        super().__init__()
        self.scalars = scalars

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None  # no figures

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            if not name.startswith("inference/"):  # wall time
                self.scalars[(name, step)] = float(value)


def run(
    case: DDPCase,
    root: Path,
    extra_callbacks: list[pl.Callback],
    ckpt_path: str | None = None,
    scalars: dict[tuple[str, int], float] | None = None,
) -> dict[str, Any]:
    pl.seed_everything(7, workers=True)
    model, callbacks = case.model(), case.callbacks()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max(EPOCHS, case.epochs),
        limit_train_batches=case.train_batches,
        limit_val_batches=2,
        limit_test_batches=2,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=root,
        logger=RecordingLogger({} if scalars is None else scalars),
        log_every_n_steps=1,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        callbacks=callbacks + extra_callbacks,
        enable_checkpointing=bool(extra_callbacks),
    )
    datamodule = case.data(BATCH_SIZE)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if case.test:
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return {
        "state": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "solver_settings": [block.solver_settings() for block in find_ode_blocks(model)],
        "callback_states": {type(c).__name__: c.state_dict() for c in callbacks},
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("inference/")},  # wall time
        "steps": trainer.global_step,
        "scalars": trainer.logger.scalars,
    }


@pytest.mark.parametrize("name", RESUMABLE)
def test_preempted_and_resumed_run_matches_the_uninterrupted_one(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    reference = run(case, tmp_path / "reference", [])
    checkpoint = tmp_path / "ckpt" / "interrupted.ckpt"
    scalars: dict[tuple[str, int], float] = {}
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run(
            case,
            tmp_path / "run",
            [PreemptAfterBatches(case.train_batches + 1), CheckpointOnInterrupt(dirpath=str(checkpoint.parent))],
            scalars=scalars,
        )
    resumed = run(case, tmp_path / "run", [], ckpt_path=str(checkpoint), scalars=scalars)

    assert resumed["steps"] == reference["steps"]
    for key, value in reference["state"].items():
        assert torch.equal(resumed["state"][key], value), f"{key} differs after resume"
    assert resumed["solver_settings"] == reference["solver_settings"]
    assert resumed["callback_states"] == reference["callback_states"]
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["scalars"] == reference["scalars"]  # every logged scalar at the same step, none shifted
