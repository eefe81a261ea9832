"""Train a tiny model with N CPU processes (gloo) and save every rank's parameters and metrics.

Run by tests/test_ddp.py as a script, because Lightning's "ddp" strategy relaunches the script
for the other ranks:  python tests/ddp_runner.py OUT_DIR DEVICES PER_PROCESS_BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_pdenets.data import DigitsDataModule  # noqa: E402
from lightning_pdenets.models import RKNetModule  # noqa: E402


def main(out_dir: Path, devices: int, batch_size: int) -> None:
    pl.seed_everything(7)
    model = RKNetModule(width=8, num_downsamples=1, step_size=0.5, optimizer="sgd", lr=0.1, momentum=0.0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        limit_train_batches=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=batch_size))
    parameters = torch.cat([p.detach().flatten() for p in model.parameters()])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.save({"parameters": parameters, "metrics": metrics, "steps": trainer.global_step},
               out_dir / f"rank{trainer.global_rank}_of_{devices}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
