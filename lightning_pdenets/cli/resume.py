"""Which checkpoint a run starts from, and whether it may: ``--ckpt_path last`` and ``pretrained:NAME`` resolved,
the file checked (readable, safe to load, of this layout and model class) and compared with the config before
anything loads it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import ARCHITECTURES, DATA_FACTS, architecture_parameters
from lightning_pdenets.checkpoints import (
    check_checkpoint,
    checkpoint_class_path,
    find_resume_checkpoint,
    needs_unpickling,
)
from lightning_pdenets.cli.data_facts import stored_facts
from lightning_pdenets.cli.log_folders import continue_logger_version, log_root, older_log_folder_note
from lightning_pdenets.cli.overrides import EVALUATION_SUBCOMMANDS, is_learning_rate
from lightning_pdenets.errors import CheckpointMismatchError, CheckpointNotFoundError
from lightning_pdenets.migration import check_layout
from lightning_pdenets.pretrained import PRETRAINED_PREFIX
from lightning_pdenets.pretrained import resolve_ckpt_path as resolve_pretrained

DATA_SETTINGS_FREE_TO_CHANGE = ("data_dir", "download", "num_workers")
"""Datamodule arguments a resumed fit may change: where the files are and how they are read, not what is trained on."""


@dataclass
class CheckedCheckpoint:
    """What :func:`resolve_ckpt_path` found out about the run's checkpoint.

    Attributes:
        path: The checkpoint file, or ``None`` without one (or with Lightning's ``best``/``hpc``/``registry``).
        data_facts: The data facts its model was trained with (see :func:`~.data_facts.stored_facts`).
        config_alone: Whether the model is built from the config alone, the file's hyperparameters not merged: a
            file trusted with ``--weights_only false`` that needs unpickling, or one that records no model class.
    """

    path: str | None = None
    data_facts: dict[str, Any] = field(default_factory=dict)
    config_alone: bool = False


def resolve_ckpt_path(config: Namespace, subcommand: str) -> CheckedCheckpoint:
    """Resolve ``--ckpt_path last`` (in this config's log folder) and ``pretrained:NAME`` in ``config``, and check
    the file before anything loads it.

    Raises:
        CheckpointNotFoundError: ``last`` finds no checkpoint.
        CheckpointMismatchError: The checkpoint was trained with other settings than the config gives.
    """
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "last":
        root = log_root(config)
        found = find_resume_checkpoint(root)
        if found is None:
            raise CheckpointNotFoundError(
                f"--ckpt_path last: no readable last.ckpt or interrupted.ckpt under {str(root)!r}, the log "
                f"folder of this config. Pass a checkpoint path, or run without --ckpt_path to start afresh."
                f"{older_log_folder_note(root)}"
            )
        config["ckpt_path"] = ckpt_path = str(found)
        continue_logger_version(config, found)
        rank_zero_info(f"{'Resuming from' if subcommand == 'fit' else f'Running {subcommand} on'} {found}")
    if str(ckpt_path).startswith(PRETRAINED_PREFIX):  # a named pretrained model: its file, SHA-256 verified
        config["ckpt_path"] = ckpt_path = resolve_pretrained(ckpt_path)
    if ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        # Lightning's names for the checkpoints of a Trainer that has just run fit (or of a cluster or model
        # registry): a fresh pdenets process has none, and Lightning would end with a traceback
        raise CheckpointNotFoundError(
            f"--ckpt_path {ckpt_path}: a fresh pdenets run has no {ckpt_path!r} checkpoint (Lightning resolves it "
            f"inside the process that trained). Pass a checkpoint file, 'last' (the last.ckpt or interrupted.ckpt of "
            f"this config with the most training progress) or '{PRETRAINED_PREFIX}NAME'; the best checkpoints of a "
            f"run are logs/<config>/version_N/checkpoints/epoch=*.ckpt."
        )
    if ckpt_path is None:
        if subcommand in EVALUATION_SUBCOMMANDS:
            rank_zero_warn(
                f"pdenets {subcommand} without --ckpt_path: the model is built from the config, with freshly "
                f"initialized weights (unless it loads weights itself). Pass --ckpt_path (a checkpoint file, 'last' "
                f"or '{PRETRAINED_PREFIX}NAME') to {subcommand} a trained model."
            )
        return CheckedCheckpoint()
    # Lightning's own load runs with torch's default, which an environment variable can turn into unpickling.
    trusted = config.get("weights_only") is False
    if config.get("weights_only") is None:
        config["weights_only"] = True
    model = config.get("model")
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    checkpoint = check_checkpoint(ckpt_path, class_path, trusted=trusted)
    check_layout(checkpoint, ckpt_path, model=class_path)
    check_checkpoint_settings(checkpoint, ckpt_path, config, subcommand)
    checked = CheckedCheckpoint(str(ckpt_path), stored_facts(checkpoint))
    if trusted and needs_unpickling(ckpt_path):
        rank_zero_info(
            f"{ckpt_path} needs unpickling, trusted by --weights_only false; the model is built from "
            f"the config alone, not from the hyperparameters stored in the file."
        )
        checked.config_alone = True
    elif checkpoint.get("hyper_parameters") and checkpoint_class_path(checkpoint) is None:
        # saved by a plain Trainer (no LightningCLI): Lightning would merge its arguments without a class and fail;
        # its network (and for fit its training settings) were compared with the config's above
        rank_zero_info(
            f"{ckpt_path} records no model class (it was not saved by pdenets); the model is the config's "
            f"{class_path}, whose settings match the file's."
        )
        checked.config_alone = True
    return checked


def check_checkpoint_settings(checkpoint: dict, ckpt_path: Any, config: Namespace, subcommand: str) -> None:
    """Refuse a checkpoint whose ``network`` (or, for ``fit``, datamodule) settings contradict the resolved config.

    Lightning takes the checkpoint's model arguments over the config's, so a contradicting ``network`` would
    be dropped silently (or fail as a wall of ``size mismatch`` lines); a resumed fit on other data would
    continue another experiment's curves.
    """
    stored = checkpoint.get("hyper_parameters") or {}
    model = config.get("model")
    class_path = (model.get("class_path") if isinstance(model, Namespace) else None) or stored.get("_class_path")
    init_args: Any = model.get("init_args") if isinstance(model, Namespace) else None
    differences = []
    architecture = getattr(import_class(class_path), "architecture", None) if isinstance(class_path, str) else None
    if architecture in ARCHITECTURES and isinstance(stored.get("network"), dict) and hasattr(init_args, "get"):
        given = _plain(init_args.get("network") or {})
        defaults = {
            name: parameter.default
            for name, parameter in architecture_parameters(architecture).items()
            if parameter.default is not inspect.Parameter.empty
        }
        for key, trained in stored["network"].items():
            value = given.get(key, defaults.get(key, trained))
            if _plain(value) != _plain(trained):
                differences.append(f"network.{key} (checkpoint {trained!r}, config {value!r})")
    if subcommand == "fit" and hasattr(init_args, "items"):
        differences += _changed_training_settings(stored, init_args)
        ignored = _changed_solver_settings(stored, init_args)
        if ignored:  # Lightning rebuilds the model with the checkpoint's solver: say so instead of dropping them
            rank_zero_warn(
                f"--ckpt_path: a resumed fit continues with the checkpoint's solver (adapted settings included); "
                f"the config's different solver.{{{', '.join(ignored)}}} are not applied. Evaluate with them "
                f"(pdenets test ... --model.init_args.solver...), or start a fresh run to train with them."
            )
    stored_data = checkpoint.get("datamodule_hyper_parameters")
    data = config.get("data")
    if subcommand == "fit" and isinstance(stored_data, dict) and isinstance(data, Namespace):
        data_class, data_args = data.get("class_path"), data.get("init_args")
        if stored_data.get("_class_path") not in (None, data_class) and import_class(
            stored_data["_class_path"]
        ) is not import_class(data_class):
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
    action = (
        "resume it with the settings it was trained with"
        if subcommand == "fit"
        else f"{subcommand} it with the settings it was trained with"
    )
    raise CheckpointMismatchError(
        f"checkpoint {str(ckpt_path)!r} was trained with other settings than this config gives: "
        f"{'; '.join(differences)}. Either {action}: drop the overrides, or pass its config{source}; or start a fresh "
        f"run without --ckpt_path."
    )


def _changed_training_settings(stored: dict[str, Any], init_args: Any) -> list[str]:
    """The model arguments (besides ``network`` and learning rates) that a resumed fit's config changes.

    Lightning rebuilds the model from the checkpoint's arguments, so a changed optimizer, schedule or weight decay
    would be dropped in silence. Dict-valued arguments (PR-Net's ``theta: {...}``) compare the settings given.
    """
    changed = []
    for key, value in init_args.items():
        # compared elsewhere: network (above), the data facts (stored_facts); applied: learning rates; announced
        # and kept from the checkpoint by the model (ODESolverMixin.on_fit_start): the possibly adapted solver
        if key in ("network", "solver", *DATA_FACTS) or key not in stored or value is None or is_learning_rate(key):
            continue
        given, trained = _plain(value), _plain(stored[key])
        if isinstance(given, dict) and isinstance(trained, dict):
            given = {name: setting for name, setting in given.items() if not is_learning_rate(name)}
            trained = {name: trained.get(name) for name in given}
        if given != trained:
            changed.append(f"{key} (checkpoint {_plain(stored[key])!r}, config {_plain(value)!r})")
    return changed


def _changed_solver_settings(stored: dict[str, Any], init_args: Any) -> list[str]:
    """The solver settings the config gives that differ from the checkpoint's (a resumed fit keeps the latter's)."""
    given, trained = _plain(init_args.get("solver")), stored.get("solver")
    if not isinstance(given, dict) or not isinstance(trained, dict):
        return []
    return sorted(key for key, value in given.items() if trained.get(key, value) != value)


def _plain(value: Any) -> Any:
    """``value`` with Namespaces as dicts and tuples as lists, so a config value compares equal to a stored one."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
