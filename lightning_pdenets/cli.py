"""The ``pdenets`` command: Lightning's CLI over every model and datamodule of the package.

``pdenets fit --config configs/quickstart.yaml`` trains, then (unless ``--test_after_fit false``)
tests the best checkpoint, so one command reports test accuracy. Each config logs into a folder of
its own, ``logs/<config path under configs/>/version_N`` (``logs/quickstart/version_0``; a config outside
``configs/`` adds a hash of its path to its stem); ``--trainer.default_root_dir DIR`` puts it under ``DIR`` instead.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import os
import re
import shutil
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

import lightning_pdenets.callbacks  # noqa: F401  (makes callback class names resolvable in configs)
import lightning_pdenets.data  # noqa: F401
import lightning_pdenets.models  # noqa: F401
from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import ARCHITECTURES, DATA_FACTS, architecture_parameters
from lightning_pdenets.checkpoints import AtomicCheckpointIO, check_checkpoint, find_resume_checkpoint, needs_unpickling
from lightning_pdenets.interruption import EXIT_SIGTERM, StopWatchdog
from lightning_pdenets.migration import LegacyCheckpointError, check_layout
from lightning_pdenets.pretrained import PRETRAINED_PREFIX, resolve_ckpt_path as resolve_pretrained
from lightning_pdenets.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    DatasetDownloadError,
    DivergedError,
    ModelFailure,
    UntrustedCheckpointError,
)

DEFAULT_LOG_DIR = "logs"
"""Folder of the logs and checkpoints of every run, unless ``--trainer.default_root_dir`` names another."""

DEFAULT_EXPERIMENT_NAME = "pdenets"
"""Log folder name under ``logs/`` of a run without a config file that sets the model."""

EXIT_USAGE = 2
"""Exit status of bad arguments, as argparse uses."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C, as a shell reports a process that SIGINT ended."""

EXIT_MODEL_FAILURE = 1
"""Exit status when the model failed (a NaN loss, a solver that could not integrate): a run that did not succeed."""

SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Errors of the user's input that reach the user as one message, not a traceback.
USER_ERRORS = (
    ConfigurationError, CheckpointMismatchError, CheckpointNotFoundError, CorruptCheckpointError, UntrustedCheckpointError,
    LegacyCheckpointError, DatasetDownloadError,
)


# Where a misspelled class_path of each argument finds its closest valid classes.
CLASS_PACKAGES = {
    "model": ("lightning_pdenets.models",),
    "data": ("lightning_pdenets.data",),
    "callbacks": ("lightning_pdenets.callbacks", "lightning.pytorch.callbacks"),
    "logger": ("lightning.pytorch.loggers",),
}
# Lines of jsonargparse's union-type report that say nothing about the user's mistake.
_NOISE = re.compile(r"^\s*(- )?(Expected a <class 'NoneType'>|Given value type:|Given value:|Subtypes:|Errors:"
                    r"|Does not validate against any of the Union subtypes)")


class PDENetsArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are a hint and the message (exit code 2), not the whole usage."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or _debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"tip: `{prog} --help` lists every option and its default.\nerror: {_short_message(message)}\n")
        self.exit(EXIT_USAGE)

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse's, with a file that is not text (an image, a checkpoint) refused in one line."""
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError as error:
            raise TypeError(f'Parser key "config": {str(path)!r} is not a text file (byte {error.start} is '
                            f'{error.object[error.start:error.start + 1]!r}), so not a YAML or JSON config; pass a '
                            f'.yaml config file (a checkpoint goes to --ckpt_path).') from None


def _debugging() -> bool:
    """Whether ``JSONARGPARSE_DEBUG=true`` asks for full tracebacks instead of short messages."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("true", "yes", "on")


def _short_message(message: str) -> str:
    """jsonargparse's message without its union-type noise; a bad class_path or argument name gets the closest valid ones."""
    key = re.search(r'Parser key "([^"]+)"', message)
    class_problem = re.search(r"Problem with given class_path '([^']+)':\s*\n?\s*(.+)", message)
    if key and class_problem:
        class_path, detail = class_problem.group(1), class_problem.group(2).strip()
        unknown_option = re.match(r"Option '([^']+)' is not accepted", detail) or \
            re.match(r"unrecognized arguments: --([A-Za-z_]\w*)", detail)  # a nested key under an unknown name
        if unknown_option:
            return (f"--{key.group(1)}: {class_path} has no argument {unknown_option.group(1)!r}. "
                    f"{_closest_arguments(class_path, unknown_option.group(1))}")
        if "has no attribute" in detail or "No module named" in detail:
            return f"--{key.group(1)}: there is no class {class_path!r}. {_closest_classes(key.group(1), class_path)}"
    bad_name = re.search(r"Expected a dot import path string: (\S+)", message)
    if key and bad_name:
        return f"--{key.group(1)}: there is no class {bad_name.group(1)!r}. {_closest_classes(key.group(1), bad_name.group(1))}"
    lines = [line.strip() for line in message.splitlines() if line.strip() and not _NOISE.match(line)]
    given = re.search(r"^\s*Given value: (?!NestedArg)(.*)$", message, flags=re.M)
    if given:
        lines.append(f"(got {given.group(1)!r})")
    short = re.sub(r'Parser key "([^"]+)":', r"--\1:", " ".join(lines))
    return re.sub(r"- Expected a <class '([^']+)'>", r"expected \1", short)


def _closest_arguments(class_path: str, given: str) -> str:
    cls = import_class(class_path)
    if cls is None:
        return ""
    initializers = [klass.__init__ for klass in inspect.getmro(cls) if "__init__" in vars(klass)]
    arguments = {p for init in initializers for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")}
    architecture = getattr(cls, "architecture", None)
    if architecture in ARCHITECTURES and given in set(architecture_parameters(architecture)) - set(DATA_FACTS):
        return (f"Did you mean network.{given}? Architecture arguments go in `network` since lightning_pdenets 0.3.0 "
                f"(`--model.init_args.network.{given} VALUE`, or `network: {{{given}: VALUE}}` in YAML)")
    nested = _nested_setting(initializers, given)
    if nested:
        group, key = nested
        return f"Did you mean {group}.{key}? (`--model.init_args.{group}.{key} VALUE`, or `{group}: {{{key}: VALUE}}` in YAML)"
    close = difflib.get_close_matches(given, sorted(arguments), n=3, cutoff=0.5)
    return f"Closest valid arguments: {', '.join(close)}." if close else f"Valid arguments: {', '.join(sorted(arguments))}."


def _nested_setting(initializers: list[Any], given: str) -> Optional[tuple[str, str]]:
    """``('theta', 'lr')`` for ``given='theta_lr'`` when ``theta`` is an argument typed by a TypedDict with key ``lr``."""
    for init in initializers:
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):  # an annotation that does not resolve: no hint from this class
            continue
        for name, hint in hints.items():
            keys = {key for option in (hint, *typing.get_args(hint)) for key in getattr(option, "__annotations__", {})
                    if typing.is_typeddict(option)}
            if given.startswith(f"{name}_") and given[len(name) + 1:] in keys:
                return name, given[len(name) + 1:]
    return None


def _closest_classes(key: str, given: str) -> str:
    packages = next((names for suffix, names in CLASS_PACKAGES.items() if key.split(".")[-1] == suffix), ())
    classes = {}
    for package in packages:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", dir(module)):
            if inspect.isclass(getattr(module, name, None)) and not name.startswith("_"):
                classes.setdefault(name, f"{package}.{name}")
    if not classes:
        return "Give a full import path (package.module.Class)."
    close = difflib.get_close_matches(given.rsplit(".", 1)[-1], list(classes), n=3, cutoff=0.5)
    if close:
        return f"Closest valid classes: {', '.join(classes[name] for name in close)}."
    return f"Valid classes: {', '.join(sorted(classes.values()))}."


class PDENetsCLI(LightningCLI):
    """LightningCLI with the framework's defaults: TensorBoard, best/last checkpoints, LR monitor, prediction files."""

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
        _link_data_to_model(parser)
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    # name null: named after the config file (see _name_log_folder)
                    # save_dir: --trainer.default_root_dir replaces it when given (see _name_log_folder)
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
                        "init_args": {"filename": "last", "save_top_k": 1, "enable_version_counter": False,
                                      "save_on_train_epoch_end": True},
                    },
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                    {"class_path": "lightning_pdenets.callbacks.CheckpointOnInterrupt"},
                    {"class_path": "lightning_pdenets.callbacks.SigtermFlagOnly"},
                    {"class_path": "lightning_pdenets.callbacks.NFEMonitor"},
                    {"class_path": "lightning_pdenets.callbacks.PredictionWriter"},
                ],
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Name the log folder, resolve ``--ckpt_path last`` in it, and check the checkpoint before anything loads it.

        Overrides LightningCLI's hook that reads the checkpoint's hyperparameters (Lightning 2.4-2.6),
        which runs before any public hook and would fail on a corrupt file with a bare torch error.
        """
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        _name_log_folder(self.config[subcommand])
        if self._resolve_ckpt_path(self.config[subcommand], subcommand):
            return  # trusted pickled file: its hyperparameters are not merged, the config alone builds the model
        learning_rates = _learning_rates(self.config[subcommand]) if subcommand == "fit" else {}
        evaluation_solver = self._evaluation_solver()
        super()._parse_ckpt_path()
        _set_learning_rates(self.config[subcommand], learning_rates)
        if evaluation_solver is not None:
            self.config[subcommand]["model"]["init_args"]["solver"] = evaluation_solver

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

    def _resolve_ckpt_path(self, config: Namespace, subcommand: str) -> bool:
        """Resolve ``last`` and check the checkpoint; True when it is a trusted file that needs unpickling."""
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            log_root = _log_root(config)
            found = find_resume_checkpoint(log_root)
            if found is None:
                raise CheckpointNotFoundError(
                    f"--ckpt_path last: no readable last.ckpt or interrupted.ckpt under {str(log_root)!r}, the log "
                    f"folder of this config. Pass a checkpoint path, or run without --ckpt_path to start afresh."
                    f"{_older_log_folder_note(log_root)}"
                )
            config["ckpt_path"] = ckpt_path = str(found)
            _continue_logger_version(config, found)
            rank_zero_info(f"{'Resuming from' if subcommand == 'fit' else f'Running {subcommand} on'} {found}")
        if str(ckpt_path).startswith(PRETRAINED_PREFIX):  # a named pretrained model: its file, SHA-256 verified
            config["ckpt_path"] = ckpt_path = resolve_pretrained(ckpt_path)
        if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
            return False
        # Lightning's own load runs with torch's default, which an environment variable can turn into unpickling.
        trusted = config.get("weights_only") is False
        if config.get("weights_only") is None:
            config["weights_only"] = True
        model = config.get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        checkpoint = check_checkpoint(ckpt_path, class_path, trusted=trusted)
        check_layout(checkpoint, ckpt_path, model=class_path)
        _check_checkpoint_settings(checkpoint, ckpt_path, config, subcommand)
        self._checkpoint_facts = (str(ckpt_path), _stored_facts(checkpoint))
        if trusted and needs_unpickling(ckpt_path):
            rank_zero_info(f"{ckpt_path} needs unpickling, trusted by --weights_only false; the model is built from "
                           f"the config alone, not from the hyperparameters stored in the file.")
            return True
        return False

    def instantiate_classes(self) -> None:
        """Instantiate as Lightning does; a constructor's argument error ends as a short message with exit code 2."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, UntrustedCheckpointError, CorruptCheckpointError) as error:
            cause = _argument_error(error)
            if cause is None or _debugging():
                raise
            self._parser(self.config.get("subcommand")).error(cause)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's trainer, writing checkpoints through :class:`AtomicCheckpointIO` unless a plugin says otherwise."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.config.get("subcommand") is None:  # run=False: _parse_ckpt_path did not run
            _name_log_folder(self.config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_linked_values(config.get("model"), self.datamodule, *getattr(self, "_checkpoint_facts", (None, {})))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand as Lightning does; a bad input found before the first step leaves no version folder
        behind, and Ctrl-C ends with one line and exit code 130, as shells report SIGINT (Lightning exits 1)."""
        folders = _NewLogFolders(_log_root(self.config[subcommand]))
        try:
            super()._run_subcommand(subcommand)
        except USER_ERRORS:
            if self.trainer.global_step == 0:  # stopped before training: its event files hold no curve
                folders.remove_unused()
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            interrupted = isinstance(stop, KeyboardInterrupt) or (
                stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt))  # Lightning's sys.exit(1)
            if not interrupted:
                raise
            advice = ("The fit resumes with the same command and --ckpt_path last." if subcommand == "fit"
                      else f"Run the same command again to {subcommand} from the start.")
            sys.stderr.write(f"pdenets: {subcommand} interrupted by Ctrl-C (exit code {EXIT_INTERRUPTED}). {advice}\n")
            raise SystemExit(EXIT_INTERRUPTED) from None

    def after_fit(self) -> None:
        if getattr(self.trainer, "interrupted", False) or self.trainer.fast_dev_run:
            return
        self._check_divergence()
        if not self.config.fit.get("test_after_fit", True):
            return
        best = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.best_model_path]
        best.sort(key=lambda c: c.monitor is None)  # a monitored best before the unmonitored last.ckpt
        ckpt_path: Optional[str] = best[0].best_model_path if best else None
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


class _NewLogFolders:
    """The version folders a run adds under its log folder, to remove when a bad input stops it before it logged."""

    UNUSED_FILES = re.compile(r"config\.yaml|hparams\.yaml|events\.out\.tfevents\..*")
    """What such a folder holds when the run stopped before its first step (a checkpoint is always kept)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = set(os.listdir(root)) if root.is_dir() else set()
        missing = [folder for folder in (root, *root.parents) if not folder.exists()]
        self.created_from = missing[-1] if missing else None  # the top folder this run will create

    def remove_unused(self) -> None:
        if not self.root.is_dir():
            return
        for name in set(os.listdir(self.root)) - self.versions:
            folder = self.root / name
            if folder.is_dir() and all(self.UNUSED_FILES.fullmatch(f.name) for f in folder.rglob("*") if f.is_file()):
                shutil.rmtree(folder, ignore_errors=True)
        if self.created_from is not None:
            for folder in (self.root, *self.root.parents):
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
                if folder == self.created_from:
                    break


def _link_data_to_model(parser: LightningArgumentParser) -> None:
    """Link the datamodule's data facts (``DATA_FACTS``) to the model's arguments of the same name.

    LightningCLI argument linking, applied when the classes are instantiated, so configs never repeat them. Every
    model takes them (an architecture that does not use one ignores it); a datamodule without such an attribute
    leaves the model's argument alone.
    """
    for name in DATA_FACTS:
        parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def _stored_facts(checkpoint: dict) -> dict[str, Any]:
    """The data facts (``image_size``, ...) a checkpoint's model was trained with."""
    stored = checkpoint.get("hyper_parameters") or {}
    return {name: stored[name] for name in DATA_FACTS if isinstance(stored, dict) and stored.get(name) is not None}


def _check_linked_values(model_config: Any, datamodule: Any, ckpt_path: Optional[str] = None,
                         checkpoint_facts: Optional[dict[str, Any]] = None) -> None:
    """Refuse a config value that contradicts the datamodule: linking would drop it silently.

    A value that came from ``ckpt_path`` (Lightning merges the checkpoint's arguments into the config) is the
    trained model's, so the message says so instead of advising to edit the config.
    """
    init_args = model_config.get("init_args") if hasattr(model_config, "get") else None
    if datamodule is None or not hasattr(init_args, "get"):
        return
    for name in DATA_FACTS:
        given, expected = init_args.get(name), getattr(datamodule, name, None)
        if given is None or expected is None or _same_fact(given, expected):
            continue
        if name in (checkpoint_facts or {}) and _same_fact(given, checkpoint_facts[name]):
            raise ConfigurationError(
                f"checkpoint {ckpt_path!r} holds a model trained with `{name}` {checkpoint_facts[name]!r}, but "
                f"{type(datamodule).__name__} gives {expected!r}, which it cannot take. Use data with {name} "
                f"{checkpoint_facts[name]!r} (the datamodule it was trained on), or train a model for this data: a "
                f"fresh run without --ckpt_path."
            )
        raise ConfigurationError(
            f"`model.init_args.{name}` is {given!r}, but {type(datamodule).__name__} gives {expected!r}: it is taken "
            f"from the datamodule, so remove it from the model's config."
        )


def _same_fact(given: Any, expected: Any) -> bool:
    """Whether two values of a data fact agree (a square ``image_size`` may be one side or a pair)."""

    def as_pair(value: Any) -> tuple[Any, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    return as_pair(given) == as_pair(expected)


def _log_root(config) -> Path:
    logger = config.get("trainer", {}).get("logger")
    init_args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init_args.get("save_dir") or config["trainer"].get("default_root_dir") or "."
    return Path(save_dir) / (init_args.get("name") or "")


def experiment_name(config_files: Sequence[Any]) -> str:
    """Log folder name of a run: the path of its model's config file under ``configs/``, without the suffix.

    ``configs/mnist/odenet.yaml`` gives ``mnist/odenet`` (stems alone collide across datasets), a file
    outside a ``configs`` folder its stem and a short hash of its resolved path (``quickstart-1a2b3c4d``): stems
    alone let ``a/quickstart.yaml`` resume ``b/quickstart.yaml``'s run, and a path relative to the working
    directory would still collide across working directories sharing one ``default_root_dir``. The first
    config file that sets ``model`` counts, so that
    trainer and callback presets added with more ``--config`` do not rename the experiment; without
    one, the first config file, and without any, ``pdenets``.
    """
    paths = [Path(str(path)) for path in config_files]
    chosen = next((path for path in paths if _sets_model(path)), paths[0] if paths else None)
    if chosen is None:
        return DEFAULT_EXPERIMENT_NAME
    parts = chosen.resolve().with_suffix("").parts
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs")
        return "/".join(parts[last + 1:])
    return f"{chosen.stem}-{_path_digest(chosen)}"


def _older_log_folder_note(log_root: Path) -> str:
    """A note naming the folder where releases up to 0.3.0 logged this config's runs (its stem alone), if it holds any."""
    older = re.sub(r"-[0-9a-f]{8}$", "", log_root.name)
    if older == log_root.name or not any((log_root.parent / older).glob("**/*.ckpt")):
        return ""
    return (f" (Runs logged by lightning_pdenets 0.3.0 and earlier are in {str(log_root.parent / older)!r}, shared by every "
            f"config named {older}.yaml: pass one of their checkpoints as --ckpt_path PATH.)")


def _path_digest(path: Path) -> str:
    """8 hex digits naming the resolved ``path``: two files of the same name in different folders never share one."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _sets_model(config_file: Path) -> bool:
    try:
        content = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and "model" in content


def _name_log_folder(config: Namespace) -> None:
    """Give a TensorBoard/CSV logger left without a ``name`` the experiment's name (see :func:`experiment_name`),
    and place it under ``--trainer.default_root_dir`` when one is given (instead of ``logs``)."""
    trainer = config.get("trainer") or Namespace()
    root = trainer.get("default_root_dir")
    if root is not None:
        _check_folder(root, "--trainer.default_root_dir")
    logger = trainer.get("logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is not None and "name" in init_args and init_args.get("name") is None:
        init_args["name"] = experiment_name(config.get("config") or [])
    if init_args is not None and init_args.get("save_dir") is not None:
        if root is not None and str(init_args["save_dir"]) == DEFAULT_LOG_DIR:
            init_args["save_dir"] = str(root)
        _check_folder(init_args["save_dir"], "--trainer.logger.init_args.save_dir")


def _check_folder(path: Any, option: str) -> None:
    """Refuse a log folder that names a file, lies under one, or cannot be created (before anything is written)."""
    path = Path(str(path)).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing == path and not path.is_dir():
        raise ConfigurationError(f"{option} {str(path)!r} is a file, not a folder: logs and checkpoints are written "
                                 f"into it. Pass a folder (a missing one is created).")
    if existing is not None and existing != path and not existing.is_dir():
        raise ConfigurationError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file. Pass a "
                                 f"folder path (a missing one is created).")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{option} {str(path)!r}: {str(existing)!r} is not writable. Pass a folder you can "
                                 f"write to.")


def _is_learning_rate(key: str) -> bool:
    return key.split(".")[-1] == "lr" or key.endswith("_lr")


def _learning_rates(config: Namespace) -> dict[tuple[str, ...], Any]:
    """The model's learning-rate arguments as the config and command line set them, by path.

    ``lr`` and ``*_lr`` at any depth, in nested arguments and in dict-valued ones such as PR-Net's
    ``theta: {lr: 0.003}`` (path ``('theta', 'lr')``).
    """
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None:
        return {}
    rates = {}
    for key, value in init_args.items():
        if _is_learning_rate(key):
            rates[(key,)] = value
        elif isinstance(value, dict):
            rates.update({(key, name): rate for name, rate in value.items() if _is_learning_rate(name)})
    return rates


def _set_learning_rates(config: Namespace, learning_rates: dict[tuple[str, ...], Any]) -> None:
    """Put the given learning rates back over those read from the checkpoint's hyperparameters.

    A resumed fit takes every model argument from the checkpoint (LightningCLI), so a lower learning
    rate after a NaN would be lost; the model then applies it to the restored optimizers (see
    ``ClassifierModule.on_train_start``).
    """
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None:
        return
    for (key, *inner), value in learning_rates.items():
        if key not in init_args:
            continue
        if not inner:
            init_args[key] = value
        elif isinstance(init_args[key], dict):  # a dict from the checkpoint: a copy with the given rate
            init_args[key] = {**init_args[key], inner[0]: value}


def _argument_error(error: BaseException) -> Optional[str]:
    """The message of the constructor error behind jsonargparse's wrapping, prefixed by its class; None if none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = list(_traceback_frames(error))
        raised_in = frames[-1].f_code.co_filename if frames else ""
        if "jsonargparse" not in raised_in and not raised_in.endswith(os.path.join("pytorch", "cli.py")):
            owner = next((type(f.f_locals["self"]).__name__ for f in frames
                          if f.f_code.co_name == "__init__" and "self" in f.f_locals), None)
            return f"{owner}: {error}" if owner else str(error)
        error = error.__cause__ or error.__context__
    return None


def _traceback_frames(error: BaseException):
    traceback = error.__traceback__
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


DATA_SETTINGS_FREE_TO_CHANGE = ("data_dir", "download", "num_workers")
"""Datamodule arguments a resumed fit may change: where the files are and how they are read, not what is trained on."""


def _check_checkpoint_settings(checkpoint: dict, ckpt_path: Any, config: Namespace, subcommand: str) -> None:
    """Refuse a checkpoint whose ``network`` (or, for ``fit``, datamodule) settings contradict the resolved config.

    Lightning takes the checkpoint's model arguments over the config's, so a contradicting ``network`` would
    be dropped silently (or fail as a wall of ``size mismatch`` lines); a resumed fit on other data would
    continue another experiment's curves.
    """
    stored = checkpoint.get("hyper_parameters") or {}
    model = config.get("model")
    class_path = (model.get("class_path") if isinstance(model, Namespace) else None) or stored.get("_class_path")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    differences = []
    architecture = getattr(import_class(class_path), "architecture", None) if isinstance(class_path, str) else None
    if architecture in ARCHITECTURES and isinstance(stored.get("network"), dict) and hasattr(init_args, "get"):
        given = _plain(init_args.get("network") or {})
        defaults = {name: parameter.default for name, parameter in architecture_parameters(architecture).items()
                    if parameter.default is not inspect.Parameter.empty}
        for key, trained in stored["network"].items():
            value = given.get(key, defaults.get(key, trained))
            if _plain(value) != _plain(trained):
                differences.append(f"network.{key} (checkpoint {trained!r}, config {value!r})")
    stored_data = checkpoint.get("datamodule_hyper_parameters")
    data = config.get("data")
    if subcommand == "fit" and isinstance(stored_data, dict) and isinstance(data, Namespace):
        data_class, data_args = data.get("class_path"), data.get("init_args")
        if stored_data.get("_class_path") not in (None, data_class) and \
                import_class(stored_data["_class_path"]) is not import_class(data_class):
            differences.append(f"data (checkpoint {stored_data['_class_path']}, config {data_class})")
        elif hasattr(data_args, "get"):
            for key, trained in stored_data.items():
                if key.startswith("_") or key in DATA_SETTINGS_FREE_TO_CHANGE or key not in data_args:
                    continue
                if _plain(data_args.get(key)) != _plain(trained):
                    differences.append(f"data.{key} (checkpoint {trained!r}, config {_plain(data_args.get(key))!r})")
    if not differences:
        return
    config_file = Path(str(ckpt_path)).parent.parent / "config.yaml"
    source = f" (saved in {str(config_file)!r})" if config_file.is_file() else ""
    action = ("resume it with the settings it was trained with" if subcommand == "fit"
              else f"{subcommand} it with the settings it was trained with")
    raise CheckpointMismatchError(
        f"checkpoint {str(ckpt_path)!r} was trained with other settings than this config gives: "
        f"{'; '.join(differences)}. Either {action}: drop the overrides, or pass its config{source}; or start a fresh "
        f"run without --ckpt_path."
    )


def _plain(value: Any) -> Any:
    """``value`` with Namespaces as dicts and tuples as lists, so a config value compares equal to a stored one."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _continue_logger_version(config, checkpoint: Path) -> None:
    """Log into the resumed run's version folder, so its curves continue and new checkpoints land beside it.

    Not with a CSVLogger: Lightning's CSV writer deletes the ``metrics.csv`` of an existing folder, so the
    resumed run logs into a new version folder instead, and the first run's rows stay.
    """
    logger = config.get("trainer", {}).get("logger")
    version = checkpoint.parent.parent.name
    if not (hasattr(logger, "get") and version.startswith("version_") and logger.get("init_args") is not None):
        return
    if str(logger.get("class_path", "")).endswith("CSVLogger"):
        rank_zero_info(f"CSVLogger rewrites metrics.csv in an existing folder, so the resumed run logs into a new "
                       f"version folder beside {version} (whose metrics.csv keeps the rows before the resume).")
        return
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
        parser_class=PDENetsArgumentParser,
        parser_kwargs={"prog": "pdenets"},
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``pdenets`` and ``python -m lightning_pdenets``.

    Exits with 2 for bad arguments and checkpoints (one message, no traceback), with 1 when the model fails
    (a NaN loss, a solver failure: the message with its remedies, no traceback; the last good checkpoint is
    kept), and with 143 after SIGTERM (Lightning stops cleanly but would exit 0, which a scheduler or ``&&``
    reads as success). A process that cannot stop by itself within ``$PDENETS_STOP_GRACE_SECONDS`` (20 s) of
    SIGTERM, e.g. one blocked in a collective that another DDP process never joined, is ended by
    :class:`~lightning_pdenets.interruption.StopWatchdog` with 143 and one line. ``JSONARGPARSE_DEBUG=true``
    shows the tracebacks.
    """
    subcommand = _subcommand(sys.argv[1:] if args is None else args)
    watchdog = StopWatchdog(describe=lambda: _after_sigterm_advice(subcommand)).start()
    try:
        build_cli(args)
    except SIGTERMException as error:
        what = f" during {error}" if str(error) else ""
        sys.stderr.write(f"pdenets: {subcommand or 'the run'} stopped by SIGTERM{what} (exit code {EXIT_SIGTERM}). "
                         f"{_after_sigterm_advice(subcommand)}\n")
        sys.exit(EXIT_SIGTERM)
    except USER_ERRORS as error:
        if _debugging():
            raise
        sys.stderr.write(f"error: {error}\n")
        sys.exit(EXIT_USAGE)
    except ModelFailure as error:
        if _debugging():
            raise
        sys.stderr.write(f"error: {type(error).__name__}: {error}\n")
        sys.exit(EXIT_MODEL_FAILURE)
    finally:
        watchdog.stop()


def _subcommand(args: Sequence[str]) -> Optional[str]:
    """The subcommand (``fit``, ``test``, ...) among the command-line arguments, or ``None``."""
    return next((arg for arg in args if arg in SUBCOMMANDS), None)


def _after_sigterm_advice(subcommand: Optional[str]) -> str:
    """What to do after SIGTERM stopped ``subcommand``: resume a fit, rerun an evaluation."""
    if subcommand == "fit":
        return ("The last good checkpoint is kept; the fit resumes with the same command and --ckpt_path last "
                "(on any number of processes).")
    if subcommand in ("test", "validate", "predict"):
        return f"Nothing of this {subcommand} run was written; run the same command again to {subcommand} from the start."
    return ""


if __name__ == "__main__":
    main(sys.argv[1:])
