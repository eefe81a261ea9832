"""Run the DDP matrix of tests/ddp_cases.py on N CPU processes (gloo) and save every rank's results.

Run by tests/test_ddp.py as a script, because Lightning's "ddp" strategy relaunches the script
for the other ranks; all cases share one process group, so the launch cost is paid once:

    python tests/ddp_runner.py OUT_DIR DEVICES PER_PROCESS_BATCH [CASE ...]

A case that closes the process group (``breaks_process_group``) needs a 2-rank launch of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ProgressBar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_pdenets.protocols import find_ode_blocks
from tests.ddp_cases import CASES, DDPCase, FreezeBatchNorm


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items() if isinstance(value, torch.Tensor)}


def run_case(name: str, case: DDPCase, out_dir: Path, devices: int, batch_size: int) -> dict[str, Any]:
    workdir = out_dir / f"{name}_{devices}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    pl.seed_everything(7)
    model = case.model()
    callbacks = case.callbacks()
    helpers = [FreezeBatchNorm()] if case.freeze_batchnorm else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=case.strategy if devices > 1 else "auto",
        max_epochs=case.epochs,
        limit_train_batches=case.train_batches,
        limit_val_batches=2,
        limit_test_batches=2,
        num_sanity_val_steps=0,
        callbacks=helpers + callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
    )
    datamodule = case.data(batch_size)
    error, error_type, metrics = "", "", {}
    try:
        trainer.fit(model, datamodule=datamodule)
        metrics = _floats(trainer.callback_metrics)
        if case.test:
            trainer.test(model, datamodule=datamodule, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
        if case.predict:
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
    except RuntimeError as failure:
        if not (case.expect_error or case.rank_errors):
            raise
        error = str(failure)
        error_type = type(failure).__name__
    checkpoints = {
        path.name: _tensors(torch.load(path, weights_only=True)["state_dict"])
        for path in sorted(workdir.rglob("*.ckpt"))
    }
    return {
        "state": _tensors(model.state_dict()),
        "metrics": metrics,
        "steps": trainer.global_step,
        "solver_settings": [block.solver_settings() for block in find_ode_blocks(model)],
        "callback_states": {type(c).__name__: c.state_dict() for c in callbacks},
        "error": error,
        "error_type": error_type,
        "checkpoints": checkpoints,
        "predictions": {path.name: torch.load(path) for path in sorted(workdir.rglob("predictions*.pt"))},
    }


def main(out_dir: Path, devices: int, batch_size: int, names: list[str]) -> None:
    torch.set_num_threads(1)
    names = names or list(CASES)
    breaking = [name for name in names if CASES[name].breaks_process_group]
    if devices > 1 and breaking and len(names) > 1:
        raise SystemExit(f"{breaking} close the process group: run each in a launch of its own")
    results = {name: run_case(name, CASES[name], out_dir, devices, batch_size) for name in names}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.save(results, out_dir / f"rank{rank}_of_{devices}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
