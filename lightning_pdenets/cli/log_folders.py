"""Where a run logs: its folder is named after its config, checked before anything is written, continued on a
resume, and removed again when a bad input stopped the run before it logged anything.

Each config logs into ``logs/<config path under configs/>/version_N`` (``logs/quickstart/version_0``; a config
outside ``configs/`` adds a hash of its path to its stem); ``--trainer.default_root_dir DIR`` puts it under ``DIR``.
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
from lightning.pytorch.utilities.rank_zero import rank_zero_info

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
    and place it under ``--trainer.default_root_dir`` when one is given (instead of ``logs``)."""
    trainer = config.get("trainer") or Namespace()
    root = trainer.get("default_root_dir")
    if root is not None:
        check_folder(root, "--trainer.default_root_dir")
    logger = trainer.get("logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is not None and "name" in init_args and init_args.get("name") is None:
        init_args["name"] = experiment_name(config.get("config") or [])
    if init_args is not None and init_args.get("save_dir") is not None:
        if root is not None and str(init_args["save_dir"]) == DEFAULT_LOG_DIR:
            init_args["save_dir"] = str(root)
        check_folder(init_args["save_dir"], "--trainer.logger.init_args.save_dir")


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
    """The folder a run's ``version_N`` folders go into: the logger's ``save_dir``/``name``."""
    logger = config.get("trainer", {}).get("logger")
    init_args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init_args.get("save_dir") or config["trainer"].get("default_root_dir") or "."
    return Path(save_dir) / (init_args.get("name") or "")


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
