"""Where a run logs: its folder is named after its config, checked before anything is written, continued on a
resume, and removed again when a bad input stopped the run before it logged anything.

Each config logs into ``logs/<config path under configs/>/version_N`` (``logs/quickstart/version_0``; a config
outside ``configs/`` adds a hash of its path to its stem); ``--trainer.default_root_dir DIR`` puts it under ``DIR``.
A run without a logger (``--trainer.logger false``) writes its config and checkpoints into such a folder too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_pdenets._discovery import import_class
from lightning_pdenets.errors import ConfigurationError

DEFAULT_LOG_DIR = "logs"
"""Folder of the logs and checkpoints of every run, unless ``--trainer.default_root_dir`` names another."""

DEFAULT_EXPERIMENT_NAME = "pdenets"
"""Log folder name under ``logs/`` of a run without a config file that sets the model."""


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
        return "/".join(parts[last + 1 :])
    return f"{chosen.stem}-{_path_digest(chosen)}"


def _path_digest(path: Path) -> str:
    """8 hex digits naming the resolved ``path``: two files of the same name in different folders never share one."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _sets_model(config_file: Path) -> bool:
    try:
        content = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and "model" in content


def name_log_folder(config: Namespace) -> None:
    """Give a TensorBoard/CSV logger left without a ``name`` the experiment's name (see :func:`experiment_name`),
    and place it under ``--trainer.default_root_dir`` when one is given (instead of ``logs``); refuse a logger that
    gives the run no local folder (:func:`check_local_log_folder`)."""
    trainer = config.get("trainer") or Namespace()
    root = trainer.get("default_root_dir")
    if root is not None:
        check_folder(root, "--trainer.default_root_dir")
    logger = trainer.get("logger")
    check_local_log_folder(logger[0] if isinstance(logger, list) and logger else logger)
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is not None and "name" in init_args and init_args.get("name") is None:
        init_args["name"] = experiment_name(config.get("config") or [])
    if init_args is not None and init_args.get("save_dir") is not None:
        if root is not None and str(init_args["save_dir"]) == DEFAULT_LOG_DIR:
            init_args["save_dir"] = str(root)
        check_folder(init_args["save_dir"], "--trainer.logger.init_args.save_dir")


def check_local_log_folder(logger: Any) -> None:
    """Refuse an MLFlowLogger whose tracking URI is a database or a server, before it starts an MLflow run.

    Lightning saves ``config.yaml`` into the first logger's local folder, and MLflow has one for its file store
    alone (Lightning's config saving ended in an ``AssertionError`` after the run was created); the checkpoints
    would land outside every folder that ``--ckpt_path last`` searches.
    """
    class_path = logger.get("class_path") if isinstance(logger, Namespace) else None
    cls = import_class(class_path) if isinstance(class_path, str) else None
    if cls is None or not issubclass(cls, MLFlowLogger):
        return
    uri = (logger.get("init_args") or Namespace()).get("tracking_uri")
    if uri is None or str(uri).startswith("file:"):
        return
    raise ConfigurationError(
        f"MLFlowLogger with tracking_uri {str(uri)!r} (--trainer.logger.tracking_uri or $MLFLOW_TRACKING_URI): only "
        f"MLflow's file store (a file: URI) gives the run a local folder for its config.yaml and checkpoints. Use it: "
        f"MLFLOW_ALLOW_FILE_STORE=true pdenets ... --trainer.logger.save_dir mlruns (without tracking_uri)."
    )


def check_folder(path: Any, option: str) -> None:
    """Refuse a log folder that names a file, lies under one, or cannot be created (before anything is written)."""
    path = Path(str(path)).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing == path and not path.is_dir():
        raise ConfigurationError(
            f"{option} {str(path)!r} is a file, not a folder: logs and checkpoints are written "
            f"into it. Pass a folder (a missing one is created)."
        )
    if existing is not None and existing != path and not existing.is_dir():
        raise ConfigurationError(
            f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file. Pass a "
            f"folder path (a missing one is created)."
        )
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"{option} {str(path)!r}: {str(existing)!r} is not writable. Pass a folder you can write to."
        )
    if existing != path and "LOCAL_RANK" not in os.environ:  # a DDP process started by a launcher: the launcher probed
        _probe_creation(path, option)


def _probe_creation(path: Path, option: str) -> None:
    """Create the missing folders of ``path`` and remove them again: ``os.access`` passes places where creating a
    folder fails all the same (e.g. under /proc, or for root on a file system that refuses it)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]  # the deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"{option} {str(path)!r} cannot be created ({error.strerror or error}). Pass a folder you can write to."
        ) from None
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):  # not created after all, or no longer empty: leave it
                folder.rmdir()


def log_root(config: Namespace) -> Path:
    """The folder a run's ``version_N`` folders go into: the logger's ``save_dir``/``name``; without a logger, the
    one a TensorBoard logger would have (``logs/<config>``, see :func:`run_folder_without_logger`)."""
    logger = config.get("trainer", {}).get("logger")
    if logger is False or logger == []:
        root = config["trainer"].get("default_root_dir") or DEFAULT_LOG_DIR
        return Path(str(root)) / experiment_name(config.get("config") or [])
    init_args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init_args.get("save_dir") or config["trainer"].get("default_root_dir") or "."
    return Path(save_dir) / (init_args.get("name") or "")


def run_folder_without_logger(config: Namespace, checkpoint: str | None) -> Path | None:
    """The ``version_N`` folder a run without a logger saves its config and checkpoints in (Lightning would write
    them into ``default_root_dir`` itself, the working directory, over those of the run before); ``None`` for a
    run with a logger.

    A run from a checkpoint in a version folder of this config's :func:`log_root` continues that folder, as a
    TensorBoard run does; any other run takes a new one.
    """
    logger = config.get("trainer", {}).get("logger")
    if logger is not False and logger != []:
        return None
    root = log_root(config)
    resumed = Path(checkpoint).parent.parent if checkpoint is not None else None  # version_N/checkpoints/last.ckpt
    if resumed is not None and resumed.name.startswith("version_") and resumed.parent.resolve() == root.resolve():
        folder = resumed
    else:
        versions = [
            int(name[8:]) for name in (os.listdir(root) if root.is_dir() else []) if re.fullmatch(r"version_\d+", name)
        ]
        folder = root / f"version_{max(versions, default=-1) + 1}"
    rank_zero_info(f"No logger: this run's config and checkpoints go into {str(folder)!r}.")
    return folder


def continue_logger_version(config: Namespace, checkpoint: Path) -> None:
    """Log into the resumed run's version folder, so its curves continue and new checkpoints land beside it.

    Not with a CSVLogger: Lightning's CSV writer deletes the ``metrics.csv`` of an existing folder, so the
    resumed run logs into a new version folder instead, and the first run's rows stay.
    """
    logger = config.get("trainer", {}).get("logger")
    version = checkpoint.parent.parent.name
    if not (hasattr(logger, "get") and version.startswith("version_") and logger.get("init_args") is not None):
        return
    if str(logger.get("class_path", "")).endswith("CSVLogger"):
        rank_zero_info(
            f"CSVLogger rewrites metrics.csv in an existing folder, so the resumed run logs into a new "
            f"version folder beside {version} (whose metrics.csv keeps the rows before the resume)."
        )
        return
    logger["init_args"]["version"] = int(version.removeprefix("version_"))


def older_log_folder_note(root: Path) -> str:
    """A note naming the folder where releases up to 0.3.0 logged this config's runs (the stem alone), if it has any."""
    older = re.sub(r"-[0-9a-f]{8}$", "", root.name)
    if older == root.name or not any((root.parent / older).glob("**/*.ckpt")):
        return ""
    return (
        f" (Runs logged by lightning_pdenets 0.3.0 and earlier are in {str(root.parent / older)!r}, shared by every "
        f"config named {older}.yaml: pass one of their checkpoints as --ckpt_path PATH.)"
    )


class NewLogFolders:
    """The version folders a run adds under its log folder, to remove when a bad input stops it before it logged."""

    UNUSED_FILES = re.compile(r"config\.yaml|hparams\.yaml|events\.out\.tfevents\..*")
    """What such a folder holds when the run stopped before its first step (a checkpoint is always kept)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = set(os.listdir(root)) if root.is_dir() else set()
        missing = [folder for folder in (root, *root.parents) if not folder.exists()]
        self.created_from = missing[-1] if missing else None  # the top folder this run will create

    def remove_unused(self) -> None:
        """Remove the version folders added since construction that hold nothing but what a run writes first."""
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
