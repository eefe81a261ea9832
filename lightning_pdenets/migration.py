"""Checkpoints of earlier releases: recognise them, say which release wrote them, and upgrade them.

Each release records itself in the checkpoints it writes, under :data:`VERSION_KEY` (from 0.2.0 on). The
hyperparameter layout changed twice:

* 0.2.0: ODE models take one ``solver`` hyperparameter (a dict of :class:`~lightning_pdenets.solvers.SolverConfig`
  fields) instead of the flat ``method``, ``step_size``, ``rtol``, ... of 0.1.x; PR-Net models take one optimizer
  dict per parameter group (``theta: {optimizer: adam, lr: 0.001}``, ``query``, ``alpha``) instead of the 21 flat
  ``theta_lr``, ``query_optimizer``, ``alpha_lr``, ....
* 0.3.0: every model takes its architecture's arguments as one ``network`` dict (``network: {width: 64}``)
  instead of flat ``width``, ``num_downsamples``, ... (the data facts ``num_classes``, ``in_channels``,
  ``image_size`` and ``input_dim`` stay model arguments).

A checkpoint in an earlier layout cannot be rebuilt as it is, so loading one stops with an error naming the
release and the upgrade command::

    python -m lightning_pdenets.migration OLD.ckpt NEW.ckpt

which writes a copy with the hyperparameters in the current layout (weights unchanged; loaded with
``weights_only=True`` and written atomically). A checkpoint saved without the CLI does not name its model class;
``--model lightning_pdenets.models.ODENetModule`` then says which architecture its flat arguments belong to; a class
the checkpoint does not fit (its hyperparameters do not build one, or its weights have other names or shapes) is
refused, naming the classes it fits.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

import lightning_pdenets
import lightning_pdenets.architectures
from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import (
    ARCHITECTURES,
    DATA_FACTS,
    MODEL_SUPPLIED_ARGUMENTS,
    architecture_parameters,
)
from lightning_pdenets.checkpoints import load_checkpoint, save_atomically
from lightning_pdenets.errors import CorruptCheckpointError, UntrustedCheckpointError
from lightning_pdenets.solvers import SolverConfig

__all__ = [
    "UPGRADED_FROM_KEY",
    "VERSION_KEY",
    "LegacyCheckpointError",
    "check_layout",
    "model_mismatch",
    "upgrade_checkpoint",
    "written_by",
]

VERSION_KEY = "lightning_pdenets_version"
"""Checkpoint key holding the release of lightning_pdenets that wrote the checkpoint (from 0.2.0 on)."""

UPGRADED_FROM_KEY = "lightning_pdenets_upgraded_from"
"""Checkpoint key of an upgraded copy: the release that wrote the original."""

LEGACY_SOLVER_KEYS = ("method", "step_size", "rtol", "atol", "adjoint", "t0", "t1", "max_num_steps", "min_step")
"""The flat solver hyperparameters of 0.1.x ODE models, now fields of ``solver``."""

LEGACY_OPTIMIZER_GROUPS = ("theta", "query", "alpha")
LEGACY_OPTIMIZER_SETTINGS = ("optimizer", "lr", "weight_decay", "momentum", "lr_scheduler", "lr_milestones", "lr_gamma")
"""PR-Net's flat ``<group>_<setting>`` hyperparameters of 0.1.x, now the keys of one dict per group."""


class LegacyCheckpointError(ValueError):
    """A checkpoint written by an earlier release, in a layout this release cannot load directly."""


def written_by(checkpoint: dict[str, Any]) -> str:
    """The release that wrote ``checkpoint`` (``'0.1.x'`` for checkpoints from before the version was recorded)."""
    return str(checkpoint.get(VERSION_KEY, "0.1.x"))


def _has_flat_solver(hparams: dict[str, Any]) -> bool:
    # every 0.1.x ODE model stored `method` (other models' `step_size` is their own, e.g. the PDE-CNNs')
    return "solver" not in hparams and "method" in hparams


def _group_solver(hparams: dict[str, Any]) -> None:
    flat = {key: hparams.pop(key) for key in LEGACY_SOLVER_KEYS if key in hparams}
    hparams["solver"] = SolverConfig.from_options(flat).as_options()


def _flat_optimizer_keys(hparams: dict[str, Any], group: str) -> list[str]:
    return [f"{group}_{setting}" for setting in LEGACY_OPTIMIZER_SETTINGS if f"{group}_{setting}" in hparams]


def _has_flat_prnet_optimizers(hparams: dict[str, Any]) -> bool:
    # every PR-Net model stores `step_order` (another model's own `alpha_lr` is left alone)
    return "step_order" in hparams and any(_flat_optimizer_keys(hparams, group) for group in LEGACY_OPTIMIZER_GROUPS)


def _group_prnet_optimizers(hparams: dict[str, Any]) -> None:
    for group in LEGACY_OPTIMIZER_GROUPS:
        flat = {key[len(group) + 1 :]: hparams.pop(key) for key in _flat_optimizer_keys(hparams, group)}
        if flat:  # the model completes the dict with its defaults
            hparams[group] = {**(hparams.get(group) or {}), **flat}


CLASS_PATH_KEY = "_class_path"
"""Hyperparameter in which LightningCLI records the model class of a checkpoint."""


def _flat_architecture_names() -> set[str]:
    names = {name for entry in ARCHITECTURES for name in architecture_parameters(entry)}
    return names - set(DATA_FACTS) - set(MODEL_SUPPLIED_ARGUMENTS)


def _has_flat_architecture(hparams: dict[str, Any]) -> bool:
    # every model of 0.1.x and 0.2.0 stored its architecture's arguments next to the others
    return "network" not in hparams and any(key in _flat_architecture_names() for key in hparams)


def _model_architecture(class_path: str | None) -> str | None:
    return getattr(import_class(class_path), "architecture", None) if class_path else None


def _group_architecture(hparams: dict[str, Any], model: str | None) -> None:
    class_path = hparams.get(CLASS_PATH_KEY) or model
    architecture = _model_architecture(class_path)
    if architecture is None:
        raise LegacyCheckpointError(
            f"cannot tell which architecture the checkpoint's flat arguments belong to: it names no model class"
            f"{f' and {class_path!r} names no registered architecture' if class_path else ''}; pass the model class "
            f"of the run, e.g. --model lightning_pdenets.models.ODENetModule."
        )
    names = set(architecture_parameters(architecture)) - set(DATA_FACTS) - set(MODEL_SUPPLIED_ARGUMENTS)
    hparams["network"] = {key: hparams.pop(key) for key in list(hparams) if key in names}


_LEGACY_LAYOUTS: tuple[
    tuple[str, str, Callable[[dict[str, Any]], bool], Callable[[dict[str, Any], str | None], None]], ...
] = (
    (
        "ODE models took flat solver arguments (method, step_size, rtol, ...)",
        "one `solver` dict",
        _has_flat_solver,
        lambda hparams, model: _group_solver(hparams),
    ),
    (
        "PR-Net models took flat optimizer arguments (theta_lr, query_optimizer, alpha_lr, ...)",
        "one dict per parameter group (`theta`, `query`, `alpha`, e.g. theta: {optimizer: adam, lr: 0.001})",
        _has_flat_prnet_optimizers,
        lambda hparams, model: _group_prnet_optimizers(hparams),
    ),
    # after the solver's: a 0.1.x ODE model's flat `step_size` is its solver's
    (
        "models took flat architecture arguments (width, num_downsamples, depth, ...)",
        "one `network` dict (e.g. network: {width: 64})",
        _has_flat_architecture,
        _group_architecture,
    ),
)
"""Per layout change: the old form, the current form, whether hyperparameters are in the old one, the conversion."""


def check_layout(checkpoint: dict[str, Any], path: str | os.PathLike[str], model: str | None = None) -> None:
    """Raise :class:`LegacyCheckpointError` with the upgrade command when ``checkpoint`` needs upgrading.

    Args:
        checkpoint: The loaded checkpoint.
        path: Its file, named in the message.
        model: Class path of the model it is loaded into, named in the command when the checkpoint names none.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    version = lightning_pdenets.__version__
    changes = [
        f"{old}; lightning_pdenets {version} takes {new}"
        for old, new, is_legacy, _ in _LEGACY_LAYOUTS
        if is_legacy(hparams)
    ]
    if not changes:
        return
    upgraded = Path(path).with_name(Path(path).stem + f"-v{version}.ckpt")
    needs_model = _has_flat_architecture(hparams) and not hparams.get(CLASS_PATH_KEY)
    model_option = f" --model {model or 'lightning_pdenets.models.<ModelClass of the run>'}" if needs_model else ""
    raise LegacyCheckpointError(
        f"checkpoint {str(path)!r} was written by lightning_pdenets {written_by(checkpoint)}, whose "
        f"{'. Its '.join(changes)}. Upgrade a copy with: python -m lightning_pdenets.migration {path} {upgraded}"
        f"{model_option}  (and use that file)."
    )


def upgrade_checkpoint(checkpoint: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """``checkpoint`` with its hyperparameters in the current layout (a no-op for current checkpoints).

    Args:
        checkpoint: The loaded checkpoint.
        model: Class path of its model, needed only when flat architecture arguments are grouped and the
            checkpoint does not name its class (one saved without the CLI).
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    converted = False
    for _, _, is_legacy, convert in _LEGACY_LAYOUTS:
        if is_legacy(hparams):
            convert(hparams, model)
            converted = True
    provenance = {UPGRADED_FROM_KEY: written_by(checkpoint)} if converted else {}
    return {**checkpoint, "hyper_parameters": hparams, VERSION_KEY: lightning_pdenets.__version__, **provenance}


def model_mismatch(checkpoint: dict[str, Any], model: str) -> str | None:
    """Why ``checkpoint`` (in the current layout) is not a checkpoint of the class ``model``, or ``None``.

    The class is built from the checkpoint's hyperparameters as ``load_from_checkpoint`` would build it, and its
    weights must have the checkpoint's names and shapes.
    """
    cls = import_class(model)
    if cls is None:
        return f"{model!r} names no class that imports"
    hparams = {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key[:1] != "_"}
    parameters = inspect.signature(cls).parameters
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        hparams = {key: value for key, value in hparams.items() if key in parameters}  # as Lightning filters them
    try:
        # a trial build: it must neither move the global random state nor print the model's own warnings
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _tensor_shapes(cls(**hparams).state_dict())
    except Exception as error:  # any failure to build means the hyperparameters are not this class's
        return f"its hyperparameters do not build a {cls.__name__} ({_first_line(error)})"
    stored = _tensor_shapes(checkpoint.get("state_dict") or {})
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & stored.keys() if expected[key] != stored[key])
    if not (missing or unexpected or reshaped):
        return None
    details = [
        f"{len(names)} {what} (e.g. {names[0]})"
        for names, what in ((missing, "weights missing"), (unexpected, "unknown weights"), (reshaped, "of other shape"))
        if names
    ]
    return f"its weights do not fit a {cls.__name__}: {', '.join(details)}"


def _tensor_shapes(state_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    # extra states (a solver's adapted settings) are not weights
    return {key: tuple(value.shape) for key, value in state_dict.items() if torch.is_tensor(value)}


def _fitting_models(checkpoint: dict[str, Any]) -> list[str]:
    """The loaded model classes of this package that ``checkpoint`` fits (see :func:`model_mismatch`).

    Found among the loaded subclasses of ``LightningModule`` (importing the models here would invert the layers);
    naming one of them as ``--model`` has loaded them all.
    """
    found: set[str] = set()
    pending, seen = list(LightningModule.__subclasses__()), set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending += cls.__subclasses__()
        if cls.__module__.startswith(f"{lightning_pdenets.__name__}.") and (
            getattr(cls, "architecture", None) in ARCHITECTURES
        ):
            path = _public_path(cls)
            if model_mismatch(checkpoint, path) is None:
                found.add(path)
    return sorted(found)


def _public_path(cls: type) -> str:
    """``lightning_pdenets.models.RKNetModule`` rather than ``lightning_pdenets.models.odenet.RKNetModule``."""
    package = cls.__module__.rpartition(".")[0]
    exported = getattr(sys.modules.get(package), cls.__name__, None) is cls
    return f"{package if exported else cls.__module__}.{cls.__name__}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_pdenets.migration OLD.ckpt NEW.ckpt``: write an upgraded copy of a checkpoint."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source", type=Path, help="checkpoint of an earlier release")
    parser.add_argument("target", type=Path, help="where to write the upgraded copy (must differ from source)")
    parser.add_argument(
        "--model",
        help="class path of the checkpoint's model (e.g. lightning_pdenets.models."
        "ODENetModule), needed when a checkpoint saved without the CLI holds flat architecture arguments",
    )
    args = parser.parse_args(argv)
    if args.source.resolve() == args.target.resolve():
        parser.error("target must differ from source: the original is kept unchanged")
    if args.source.is_dir():
        parser.error(f"source {str(args.source)!r} is a folder; pass the .ckpt file to upgrade")
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    if args.target.is_dir():
        suggestion = args.target / f"{args.source.stem}-v{lightning_pdenets.__version__}.ckpt"
        parser.error(f"target {str(args.target)!r} is a folder; pass the file to write, e.g. {suggestion}")
    if not args.target.parent.is_dir():
        parser.error(f"the folder of target {str(args.target)!r} does not exist; create it or write elsewhere")
    try:
        checkpoint = load_checkpoint(args.source, how_to_trust="a script of your own (the migration never unpickles)")
    except CorruptCheckpointError as error:
        cause = error.__cause__
        reason = _first_line(cause) if cause is not None else error
        parser.error(
            f"{args.source} cannot be read as a checkpoint ({reason}); it was damaged (truncated by a crash or a full "
            f"disk, or bytes changed on disk or in a copy). Upgrade an intact copy of it."
        )
    except UntrustedCheckpointError as error:
        parser.error(str(error))
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("hyper_parameters") or {}, dict)
        or "state_dict" not in checkpoint
    ):
        parser.error(
            f"{args.source} is not a Lightning checkpoint (no `state_dict` and hyperparameters); pass the "
            f".ckpt file of a run."
        )
    recorded = checkpoint["hyper_parameters"].get(CLASS_PATH_KEY) if checkpoint.get("hyper_parameters") else None
    if args.model and recorded and recorded != args.model and import_class(recorded) is not import_class(args.model):
        parser.error(
            f"{args.source} records its model class {recorded}, but --model names {args.model}; drop --model (it "
            f"is only needed for checkpoints that record no class)."
        )
    try:
        upgraded = upgrade_checkpoint(checkpoint, args.model)
    except LegacyCheckpointError as error:
        parser.error(str(error))
    mismatch = model_mismatch(upgraded, args.model) if args.model and not recorded else None
    if mismatch is not None:
        fitting = _fitting_models(upgraded)
        belongs = f"it fits {' or '.join(fitting)}" if fitting else "it fits none of lightning_pdenets.models"
        parser.error(
            f"{args.source} is not a checkpoint of --model {args.model}: {mismatch}; {belongs}. Pass the model "
            f"class of the run that wrote it as --model."
        )
    save_atomically(upgraded, args.target)
    # the command's one line of output
    print(  # noqa: T201
        f"wrote {args.target} (lightning_pdenets {lightning_pdenets.__version__} layout) from {args.source} "
        f"(written by {written_by(checkpoint)})"
    )


if __name__ == "__main__":
    main()
