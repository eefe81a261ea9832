"""``PDENetsCLI``: LightningCLI with the framework's defaults, wired to the checks of this package's other modules.

Only public LightningCLI hooks are overridden. The order the CLI relies on (checked by
``tests/test_library_adapters.py``): :meth:`PDENetsCLI.parse_arguments` names the log folder and checks the
checkpoint; Lightning then merges the checkpoint's hyperparameters into the config; then
:meth:`PDENetsCLI.before_instantiate_classes` puts back what this run gives (:mod:`.overrides`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Checkpoint, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

import lightning_pdenets.callbacks  # makes callback class names resolvable in configs (as do the next two)
import lightning_pdenets.data
import lightning_pdenets.models  # noqa: F401
from lightning_pdenets.callbacks.progress_bar import ResumeAwareProgressBar
from lightning_pdenets.checkpoints import AtomicCheckpointIO
from lightning_pdenets.cli._library_adapters import command_name, constructor_error, interrupted_by_ctrl_c
from lightning_pdenets.cli.arguments import PDENetsArgumentParser, debugging, short_message, usage_error
from lightning_pdenets.cli.data_facts import check_linked_values, link_data_to_model
from lightning_pdenets.cli.exit_codes import EXIT_INTERRUPTED, USER_ERRORS, after_ctrl_c_advice
from lightning_pdenets.cli.log_folders import (
    DEFAULT_LOG_DIR,
    NewLogFolders,
    log_root,
    name_log_folder,
    run_folder_without_logger,
)
from lightning_pdenets.cli.overrides import GivenSettings
from lightning_pdenets.cli.resume import CheckedCheckpoint, resolve_ckpt_path
from lightning_pdenets.errors import CorruptCheckpointError, DivergedError, UntrustedCheckpointError


class PDENetsCLI(LightningCLI):
    """LightningCLI with the framework's defaults: TensorBoard, best/last checkpoints, LR monitor, prediction files,
    a progress bar that survives a mid-epoch resume.

    On top of Lightning's: each config logs into a folder of its own (:mod:`.log_folders`), a checkpoint is checked
    before anything loads it (:mod:`.resume`), learning rates and an evaluation solver given for this run win over
    the checkpoint's (:mod:`.overrides`), a constructor's argument error ends as one line with exit code 2, a bad
    input found before the first step leaves no version folder behind, Ctrl-C ends with exit code 130, and a fit
    whose model diverged fails (unless ``--allow_divergence``) before the best checkpoint is tested.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._checked = CheckedCheckpoint()
        self._given: GivenSettings | None = None
        self._hidden_ckpt_path: Any = None
        self._new_folders: NewLogFolders | None = None  # set when the subcommand starts to run
        try:
            super().__init__(*args, **kwargs)
        except USER_ERRORS:
            if self._new_folders is not None and self.trainer.global_step == 0:  # its event files hold no curve
                self._new_folders.remove_unused()
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            if self._new_folders is None or not interrupted_by_ctrl_c(stop):
                raise
            sys.stderr.write(
                f"pdenets: {self.subcommand} interrupted by Ctrl-C (exit code {EXIT_INTERRUPTED}). "
                f"{after_ctrl_c_advice(self.subcommand)}\n"
            )
            raise SystemExit(EXIT_INTERRUPTED) from None

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the best checkpoint (the last one if none was kept).",
        )
        parser.add_argument(
            "--allow_divergence",
            type=bool,
            default=False,
            help="Let a `fit` whose model diverged (a loss that exploded or is not finite, accuracy at chance after "
            "the first epochs) end with a warning and exit code 0 instead of an error and exit code 1.",
        )
        link_data_to_model(parser)
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    # name null: named after the config file (see log_folders.name_log_folder)
                    # save_dir: --trainer.default_root_dir replaces it when given (see log_folders.name_log_folder)
                    "init_args": {"save_dir": DEFAULT_LOG_DIR, "name": None},
                },
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"monitor": "val/acc_top1", "mode": "max", "filename": "best-{epoch:02d}"},
                    },
                    {
                        # last.ckpt at the end of every training epoch (after its validation). Lightning 2.6's
                        # save_last=True rewrites it only when a new best checkpoint is saved.
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {
                            "filename": "last",
                            "save_top_k": 1,
                            "enable_version_counter": False,
                            "save_on_train_epoch_end": True,
                        },
                    },
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                    {"class_path": "lightning_pdenets.callbacks.CheckpointOnInterrupt"},
                    {"class_path": "lightning_pdenets.callbacks.SigtermFlagOnly"},
                    {"class_path": "lightning_pdenets.callbacks.NFEMonitor"},
                    {"class_path": "lightning_pdenets.callbacks.PredictionWriter"},
                ],
            }
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as Lightning does; then name the log folder, resolve ``--ckpt_path last`` in it, and check the
        checkpoint before anything loads it (Lightning reads its hyperparameters next, and would fail on a corrupt
        file with a bare torch error)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand is not None else self.config
        name_log_folder(config)
        if subcommand is None:
            return
        self._checked = resolve_ckpt_path(config, subcommand)
        if self._checked.config_alone:  # trusted pickled file: the config alone builds the model
            self._hidden_ckpt_path, config["ckpt_path"] = config["ckpt_path"], None  # Lightning would load it
            return
        self._given = GivenSettings.read(config, subcommand)

    @override
    def before_instantiate_classes(self) -> None:
        """Give back the checkpoint path hidden from Lightning's hyperparameter merge, or put this run's learning
        rates and evaluation solver over the merged ones; a default callback the user gives again is dropped."""
        subcommand = self.config.get("subcommand")
        drop_replaced_default_callbacks(self.config[subcommand] if subcommand is not None else self.config)
        if subcommand is None:
            return
        if self._hidden_ckpt_path is not None:
            self.config[subcommand]["ckpt_path"] = self._hidden_ckpt_path
        if self._given is not None:
            self._given.apply(self.config[subcommand])

    @override
    def instantiate_classes(self) -> None:
        """Instantiate as Lightning does; a constructor's argument error ends as a short message with exit code 2."""
        try:
            super().instantiate_classes()
        except (
            ValueError,
            FileNotFoundError,
            UntrustedCheckpointError,
            CorruptCheckpointError,
            MisconfigurationException,  # the Trainer's own checks of its settings (e.g. a negative max_epochs)
        ) as error:
            found = constructor_error(error)
            if found is None or not self.parser.exit_on_error or debugging():
                raise
            owner, cause = found
            owner = "Trainer" if owner == CLITrainer.__name__ else owner  # the user configures `trainer`
            message = f"{owner}: {cause}" if owner else str(cause)
            if "No supported gpu backend" in message:  # Lightning's message names neither the setting nor the fix
                message += " --trainer.accelerator=gpu needs a CUDA or MPS device; use --trainer.accelerator=cpu."
            usage_error(self._command(), short_message(message))

    def _command(self) -> str:
        """The command as the user typed it, e.g. ``pdenets fit``, for error messages."""
        subcommand = self.config.get("subcommand")
        return command_name(self.parser) + (f" {subcommand}" if subcommand else "")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's trainer, saving checkpoints through :class:`AtomicCheckpointIO` unless a plugin says another.

        Its default progress bar is :class:`~lightning_pdenets.callbacks.ResumeAwareProgressBar` (Lightning's tqdm
        bar, which keeps its epoch, total and ETA after a mid-epoch ``--ckpt_path`` resume). A progress bar given in
        ``trainer.callbacks`` is kept, and ``enable_progress_bar: false`` still means no bar.
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        check_trainer_counts(trainer_config, self._command())
        callbacks = without_switched_off_callbacks(trainer_config, callbacks)
        kwargs["callbacks"] = with_progress_bar(trainer_config, callbacks, self._command())
        check_one_state_per_callback(kwargs["callbacks"], self._command())
        run_folder = run_folder_without_logger(
            self.config[self.subcommand] if self.subcommand else self.config, self._checked.path
        )
        if run_folder is not None:  # not in the config: its saved copy keeps the user's default_root_dir
            kwargs["default_root_dir"] = str(run_folder)
        # test/validate/predict of `--ckpt_path last` log into the training run's folder: its config.yaml stays fit's
        self.save_config_kwargs["config_filename"] = (
            "config.yaml" if self.subcommand in (None, "fit") else f"config_{self.subcommand}.yaml"
        )
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_linked_values(config.get("model"), self.datamodule, self._checked.path, self._checked.data_facts)
        if self.subcommand:  # what the run adds from now on is removed if a bad input stops it before its first step
            self._new_folders = NewLogFolders(log_root(self.config[self.subcommand]))

    def after_fit(self) -> None:
        """Fail a diverged fit (see :meth:`_check_divergence`), then test the best checkpoint (``--test_after_fit``)."""
        if getattr(self.trainer, "interrupted", False) or getattr(self.trainer, "fast_dev_run", False):
            return
        self._check_divergence()
        if not self.config.fit.get("test_after_fit", True):
            return
        best = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.best_model_path]
        best.sort(key=lambda c: c.monitor is None)  # a monitored best before the unmonitored last.ckpt
        ckpt_path: str | None = best[0].best_model_path if best else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, weights_only=True)

    def _check_divergence(self) -> None:
        """End a fit whose model diverged with :class:`DivergedError` (exit code 1), unless ``--allow_divergence``."""
        symptom = getattr(self.model, "divergence_symptom", lambda: None)()
        if symptom is None:
            return
        if self.config.fit.get("allow_divergence", False):
            rank_zero_warn(f"The model diverged: {symptom}. Accepted by --allow_divergence true.")
            return
        raise DivergedError(f"the model diverged: {symptom}. {self.model.divergence_advice(symptom)}")


SINGLE_DEFAULT_CALLBACKS = frozenset(
    {"LearningRateMonitor", "CheckpointOnInterrupt", "SigtermFlagOnly", "NFEMonitor", "PredictionWriter"}
)
"""The default callbacks of which a run needs one (their state keys clash): one the user gives replaces the default."""


def drop_replaced_default_callbacks(config: Any) -> None:
    """Keep only the last of several :data:`SINGLE_DEFAULT_CALLBACKS` entries of one class in ``trainer.callbacks``.

    ``--trainer.callbacks+=...NFEMonitor`` appends to the defaults, which hold one already: Lightning would refuse
    two stateful callbacks of one type with a traceback. The user's entry comes later and wins, with its settings.
    """
    trainer: Any = config.get("trainer") if hasattr(config, "get") else None
    callbacks = trainer.get("callbacks") if hasattr(trainer, "get") else None
    if not isinstance(callbacks, list):
        return

    def name(entry: Any) -> str | None:
        class_path = entry.get("class_path") if hasattr(entry, "get") else None
        return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None

    names = [name(entry) for entry in callbacks]
    trainer["callbacks"] = [
        entry
        for index, entry in enumerate(callbacks)
        if names[index] not in SINGLE_DEFAULT_CALLBACKS or names[index] not in names[index + 1 :]
    ]


_TRAINER_COUNTS = {
    # setting: (smallest value, what it means); Lightning divides by the first three (a ZeroDivisionError mid-run)
    # and reads values below the smallest of the others as "none" in silence
    "accumulate_grad_batches": (1, "an integer >= 1 (batches per optimizer step)"),
    "check_val_every_n_epoch": (1, "an integer >= 1 (epochs), or null to validate by val_check_interval alone"),
    "val_check_interval": (None, "an integer >= 1 (batches) or a float in (0.0, 1.0] (a fraction of the epoch)"),
    "num_sanity_val_steps": (-1, "an integer >= 0 (batches), or -1 for the whole validation set"),
    "log_every_n_steps": (0, "an integer >= 0 (steps; 0 logs no per-step values)"),
    "min_epochs": (0, "an integer >= 0"),
    "min_steps": (0, "an integer >= 0"),
}


def check_trainer_counts(trainer_config: Any, command: str) -> None:
    """Refuse the trainer counts that Lightning accepts and then divides by or ignores, with one short message.

    Lightning's own checks (e.g. a negative ``max_epochs``) end as short messages through
    :meth:`PDENetsCLI.instantiate_classes`; these are the values it lets through.
    """
    for key, (smallest, allowed) in _TRAINER_COUNTS.items():
        value = trainer_config.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # unset, or a form Lightning checks itself (e.g. a time interval)
        # val_check_interval (no smallest): Lightning itself refuses negative values and floats above 1
        bad = value == 0 if smallest is None else not isinstance(value, int) or value < smallest
        if bad:
            usage_error(command, f"--trainer.{key} must be {allowed}, got {value!r}.")


def without_switched_off_callbacks(trainer_config: Any, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` without the default ones that a trainer switch turns off, which Lightning would refuse.

    ``--trainer.logger false`` leaves out ``LearningRateMonitor`` (it needs a logger) and
    ``--trainer.enable_checkpointing false`` the checkpoint callbacks (``ModelCheckpoint``, ``CheckpointOnInterrupt``);
    each is said in one line.
    """
    dropped: list[Callback] = []
    if trainer_config.get("logger") is False:
        dropped += [c for c in callbacks if isinstance(c, LearningRateMonitor)]
    if trainer_config.get("enable_checkpointing") is False:
        dropped += [c for c in callbacks if isinstance(c, Checkpoint)]
    if dropped:
        names = sorted({type(c).__name__ for c in dropped})
        rank_zero_info(f"Left out {', '.join(names)}: --trainer.logger / --trainer.enable_checkpointing switch it off.")
    return [c for c in callbacks if c not in dropped]


def with_progress_bar(trainer_config: Any, callbacks: list[Callback], command: str) -> list[Callback]:
    """``callbacks`` with :class:`ResumeAwareProgressBar` added when the run shows a bar and names none.

    Where Lightning would stop with a traceback (a bar in the callbacks while the bar is switched off, or two bars),
    this ends with a short message and exit code 2 instead.
    """
    bars = [type(callback).__name__ for callback in callbacks if isinstance(callback, ProgressBar)]
    shown = trainer_config.get("enable_progress_bar") is not False and not trainer_config.get("barebones")
    if len(bars) > 1:
        usage_error(
            command,
            f"trainer.callbacks holds {len(bars)} progress bars ({', '.join(bars)}); a run shows one. "
            "Keep one of them.",
        )
    if bars and not shown:
        switch = "--trainer.enable_progress_bar=false"
        if trainer_config.get("barebones"):
            switch = "--trainer.barebones=true"
        usage_error(
            command,
            f"trainer.callbacks holds a progress bar ({bars[0]}), but {switch} switches the bar off. "
            f"Drop the bar's entry (its --config or --trainer.callbacks+=...) or drop {switch}.",
        )
    return callbacks if bars or not shown else [*callbacks, ResumeAwareProgressBar()]


def check_one_state_per_callback(callbacks: list[Callback], command: str) -> None:
    """Refuse two stateful callbacks with one checkpoint key (e.g. two SolverSwapChecks), as Lightning would, briefly.

    Lightning's Trainer raises a RuntimeError with a traceback for them; :data:`SINGLE_DEFAULT_CALLBACKS` given again
    have already replaced their defaults (:func:`drop_replaced_default_callbacks`), so what is left is the user's.
    """
    seen: set[str] = set()
    for callback in callbacks:
        if not is_overridden("state_dict", instance=callback, parent=Callback):
            continue
        if callback.state_key in seen:
            name = type(callback).__name__
            usage_error(
                command,
                f"trainer.callbacks holds {name} twice; a run takes one {name} (Lightning keeps one checkpoint state "
                f"per {name}). Keep one entry and put all its settings there (list-valued settings take several "
                f"values).",
            )
        seen.add(callback.state_key)


class CLITrainer(pl.Trainer):
    """Lightning's ``Trainer``, with its batch limits typed ``int | float`` so that ``1`` means one batch.

    Lightning annotates ``limit_{train,val,test,predict}_batches`` as ``float | int``; the CLI's parser tries the
    types in that order, so ``--trainer.limit_val_batches=1`` (or ``1`` in a YAML file) became 1.0: all the
    batches, where Lightning's docs (and ``Trainer(limit_val_batches=1)``) mean one. ``1.0`` still means all.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


def build_cli(args: list[str] | None = None, run: bool = True) -> PDENetsCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run=True``, execute the subcommand."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    if args is not None:  # the caller's own: Lightning's warning that sys.argv (a script's arguments) holds others
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return PDENetsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        run=run,
        trainer_class=CLITrainer,
        # no top-level --optimizer/--lr_scheduler: they would replace the model's configure_optimizers while the
        # checkpoint's hyperparameters still named the model's own (and a resume then failed on the optimizer state)
        auto_configure_optimizers=False,
        parser_class=PDENetsArgumentParser,
        parser_kwargs={"prog": "pdenets"},
    )
