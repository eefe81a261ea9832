"""The ``pdenets`` command: Lightning's CLI over every model and datamodule of the package.

``pdenets fit --config configs/quickstart.yaml`` trains, then (unless ``--test_after_fit false``)
tests the best checkpoint, so one command reports test accuracy.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
import inspect
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lightning_pdenets.callbacks  # noqa: F401  (makes callback class names resolvable in configs)
import lightning_pdenets.data  # noqa: F401
import lightning_pdenets.models  # noqa: F401
from lightning_pdenets.checkpoints import check_checkpoint, find_resume_checkpoint
from lightning_pdenets.migration import check_layout


class PDENetsCLI(LightningCLI):
    """LightningCLI with the framework's defaults: TensorBoard, best/last checkpoints, LR monitor, prediction files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the best checkpoint (the last one if none was kept).",
        )
        _link_data_to_model(parser)
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
                    {"class_path": "lightning_pdenets.callbacks.CheckpointOnInterrupt"},
                    {"class_path": "lightning_pdenets.callbacks.NFEMonitor"},
                    {"class_path": "lightning_pdenets.callbacks.PredictionWriter"},
                ],
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` across logger versions and refuse unreadable checkpoints early.

        Overrides LightningCLI's hook that reads the checkpoint's hyperparameters (Lightning 2.4-2.6),
        which runs before any public hook and would fail on a corrupt file with a bare torch error.
        """
        self._resolve_ckpt_path()
        evaluation_solver = self._evaluation_solver()
        super()._parse_ckpt_path()
        if evaluation_solver is not None:
            self.config[self.config["subcommand"]]["model"]["init_args"]["solver"] = evaluation_solver

    def _evaluation_solver(self) -> Any:
        """The config's ``model.init_args.solver`` in ``test``/``validate``/``predict``, or ``None``.

        Lightning parses a checkpoint's hyperparameters over the config, which would make the training
        solver win over one given for evaluation; the model applies the differences after loading
        (:class:`lightning_pdenets.models.solver.ODESolverMixin`).
        """
        subcommand = self.config.get("subcommand")
        if subcommand not in ("test", "validate", "predict"):
            return None
        init_args = (self.config[subcommand].get("model") or {}).get("init_args")
        return init_args.get("solver") if hasattr(init_args, "get") else None

    def _resolve_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            log_root = _log_root(config)
            found = find_resume_checkpoint(log_root)
            if found is None:
                raise FileNotFoundError(
                    f"--ckpt_path last: no last.ckpt or interrupted.ckpt under {str(log_root)!r}. Pass a checkpoint "
                    f"path, or run without --ckpt_path to start afresh."
                )
            config["ckpt_path"] = ckpt_path = str(found)
            _continue_logger_version(config, found)
            rank_zero_info(f"Resuming from {found}")
        if ckpt_path not in (None, "best", "hpc", "registry") and not str(ckpt_path).startswith("registry:"):
            check_layout(check_checkpoint(ckpt_path), ckpt_path)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_linked_values(config.get("model"), self.model, self.datamodule)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        if getattr(self.trainer, "interrupted", False):
            return
        best = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.best_model_path]
        ckpt_path: Optional[str] = best[0].best_model_path if best else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


DATA_TO_MODEL_LINKS = ("num_classes", "in_channels", "input_dim")
"""Model arguments taken from the datamodule's attribute of the same name, so configs never repeat them."""

CHECKED_AGAINST_DATA = ("image_size",)
"""Model arguments that only some models take (a link would hand them to the others' ``**kwargs``): a config
value is checked against the datamodule's instead."""


def _first_side(size: Any) -> Any:
    """A datamodule's ``image_size`` (height, width) as the models' ``image_size`` (square images)."""
    return size[0] if isinstance(size, (tuple, list)) else size


def _link_data_to_model(parser: LightningArgumentParser) -> None:
    """Link the datamodule's data facts to the model's arguments (LightningCLI argument linking).

    Applied when the classes are instantiated; a model without such an argument, or a datamodule without
    such an attribute, is left alone.
    """
    for name in DATA_TO_MODEL_LINKS:
        parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def _check_linked_values(model_config: Any, model: Any, datamodule: Any) -> None:
    """Refuse a config value that contradicts the datamodule: a linked one (linking would drop it silently) or a checked one."""
    init_args = model_config.get("init_args") if hasattr(model_config, "get") else None
    if datamodule is None or not hasattr(init_args, "get"):
        return
    parameters = inspect.signature(type(model)).parameters
    for name in DATA_TO_MODEL_LINKS + CHECKED_AGAINST_DATA:
        if not hasattr(datamodule, name) or name not in parameters:
            continue
        linked = name in DATA_TO_MODEL_LINKS
        # a linked argument: what the config said (the model got the data's); a checked one: what the model got
        given = init_args.get(name) if linked else model.hparams.get(name)
        expected = _first_side(getattr(datamodule, name)) if name == "image_size" else getattr(datamodule, name)
        if given is None or given == expected or (linked and given == parameters[name].default):
            continue
        fix = "it is taken from the datamodule, so remove it from the model's config" if linked else \
            f"set `model.init_args.{name}: {expected!r}`"
        raise ValueError(
            f"`model.init_args.{name}` is {given!r}, but {type(datamodule).__name__} gives {expected!r}: {fix}."
        )


def _log_root(config) -> Path:
    logger = config.get("trainer", {}).get("logger")
    init_args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init_args.get("save_dir") or config["trainer"].get("default_root_dir") or "."
    return Path(save_dir) / (init_args.get("name") or "")


def _continue_logger_version(config, checkpoint: Path) -> None:
    """Log into the resumed run's version folder, so its curves continue and new checkpoints land beside it."""
    logger = config.get("trainer", {}).get("logger")
    version = checkpoint.parent.parent.name
    if hasattr(logger, "get") and version.startswith("version_") and logger.get("init_args") is not None:
        logger["init_args"]["version"] = int(version.removeprefix("version_"))


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
