"""Checkpoints of earlier releases: recognise them, say which release wrote them, and upgrade them.

Release 0.2.0 changed two hyperparameter layouts, and records the release that wrote each checkpoint under
:data:`VERSION_KEY`:

* ODE models take one ``solver`` hyperparameter (a dict of :class:`~lightning_pdenets.solvers.SolverConfig`
  fields) instead of the flat ``method``, ``step_size``, ``rtol``, ... of 0.1.x;
* PR-Net models take one optimizer dict per parameter group (``theta: {optimizer: adam, lr: 0.001}``,
  ``query``, ``alpha``) instead of the 21 flat ``theta_lr``, ``query_optimizer``, ``alpha_lr``, ....

A checkpoint in an earlier layout cannot be rebuilt as it is, so loading one stops with an error naming the
release and the upgrade command::

    python -m lightning_pdenets.migration OLD.ckpt NEW.ckpt

which writes a copy with the hyperparameters in the current layout (weights unchanged; loaded with
``weights_only=True`` and written atomically).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

import lightning_pdenets
from lightning_pdenets.solvers import SolverConfig

__all__ = ["VERSION_KEY", "LegacyCheckpointError", "check_layout", "upgrade_checkpoint", "written_by"]

VERSION_KEY = "lightning_pdenets_version"
"""Checkpoint key holding the release of lightning_pdenets that wrote the checkpoint (from 0.2.0 on)."""

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
        flat = {key[len(group) + 1:]: hparams.pop(key) for key in _flat_optimizer_keys(hparams, group)}
        if flat:  # the model completes the dict with its defaults
            hparams[group] = {**(hparams.get(group) or {}), **flat}


_LEGACY_LAYOUTS: tuple[tuple[str, str, Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], None]], ...] = (
    ("ODE models took flat solver arguments (method, step_size, rtol, ...)", "one `solver` dict",
     _has_flat_solver, _group_solver),
    ("PR-Net models took flat optimizer arguments (theta_lr, query_optimizer, alpha_lr, ...)",
     "one dict per parameter group (`theta`, `query`, `alpha`, e.g. theta: {optimizer: adam, lr: 0.001})",
     _has_flat_prnet_optimizers, _group_prnet_optimizers),
)
"""Per layout change: the old form, the current form, whether hyperparameters are in the old one, the conversion."""


def check_layout(checkpoint: dict[str, Any], path: Union[str, Path]) -> None:
    """Raise :class:`LegacyCheckpointError` with the upgrade command when ``checkpoint`` needs upgrading."""
    hparams = checkpoint.get("hyper_parameters") or {}
    version = lightning_pdenets.__version__
    changes = [f"{old}; lightning_pdenets {version} takes {new}" for old, new, is_legacy, _ in _LEGACY_LAYOUTS
               if is_legacy(hparams)]
    if not changes:
        return
    upgraded = Path(path).with_name(Path(path).stem + f"-v{version}.ckpt")
    raise LegacyCheckpointError(
        f"checkpoint {str(path)!r} was written by lightning_pdenets {written_by(checkpoint)}, whose "
        f"{'. Its '.join(changes)}. Upgrade a copy with: python -m lightning_pdenets.migration {path} {upgraded}  "
        f"(and use that file)."
    )


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with its hyperparameters in the current layout (a no-op for current checkpoints)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    for _, _, is_legacy, convert in _LEGACY_LAYOUTS:
        if is_legacy(hparams):
            convert(hparams)
    return {**checkpoint, "hyper_parameters": hparams, VERSION_KEY: lightning_pdenets.__version__}


def _save_atomically(obj: Any, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lightning_pdenets.migration OLD.ckpt NEW.ckpt``: write an upgraded copy of a checkpoint."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source", type=Path, help="checkpoint of an earlier release")
    parser.add_argument("target", type=Path, help="where to write the upgraded copy (must differ from source)")
    args = parser.parse_args(argv)
    if args.source.resolve() == args.target.resolve():
        parser.error("target must differ from source: the original is kept unchanged")
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    checkpoint = torch.load(args.source, map_location="cpu", weights_only=True)
    _save_atomically(upgrade_checkpoint(checkpoint), args.target)
    print(f"wrote {args.target} (lightning_pdenets {lightning_pdenets.__version__} layout) from {args.source} "
          f"(written by {written_by(checkpoint)})")


if __name__ == "__main__":
    main()
