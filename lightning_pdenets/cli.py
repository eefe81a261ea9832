"""The ``pdenets`` command: Lightning's CLI over every model and datamodule of the package.

``pdenets fit --config configs/quickstart.yaml`` trains, then (unless ``--test_after_fit false``)
tests the best checkpoint, so one command reports test accuracy.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_pdenets.callbacks  # noqa: F401  (makes callback class names resolvable in configs)
import lightning_pdenets.data  # noqa: F401
import lightning_pdenets.models  # noqa: F401


class PDENetsCLI(LightningCLI):
    """LightningCLI with the framework's defaults: TensorBoard, best/last checkpoints, LR monitor."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the best checkpoint (the last one if none was kept).",
        )
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "logs", "name": "pdenets"},
                },
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"monitor": "val/acc_top1", "mode": "max", "save_last": True,
                                      "filename": "best-{epoch:02d}"},
                    },
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                ],
            }
        )

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        if getattr(self.trainer, "interrupted", False):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path: Optional[str] = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> PDENetsCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run=True``, execute the subcommand."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    return PDENetsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``pdenets`` and ``python -m lightning_pdenets``."""
    build_cli(args)


if __name__ == "__main__":
    main(sys.argv[1:])
