"""Checkpoints of earlier releases: recognise them, say which release wrote them, and upgrade them.

Release 0.2.0 gave the ODE models one ``solver`` hyperparameter (a dict of
:class:`~lightning_pdenets.solvers.SolverConfig` fields) instead of the flat ``method``, ``step_size``,
``rtol``, ... of 0.1.x, and records the release that wrote each checkpoint under
:data:`VERSION_KEY`. A 0.1.x checkpoint of an ODE model cannot be rebuilt as it is, so loading one stops
with an error naming the release and the upgrade command::

    python -m lightning_pdenets.migration OLD.ckpt NEW.ckpt

which writes a copy with the hyperparameters in the current layout (weights unchanged; loaded with
``weights_only=True`` and written atomically).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

import lightning_pdenets
from lightning_pdenets.solvers import SolverConfig

__all__ = ["VERSION_KEY", "LegacyCheckpointError", "check_layout", "upgrade_checkpoint", "written_by"]

VERSION_KEY = "lightning_pdenets_version"
"""Checkpoint key holding the release of lightning_pdenets that wrote the checkpoint (from 0.2.0 on)."""

LEGACY_SOLVER_KEYS = ("method", "step_size", "rtol", "atol", "adjoint", "t0", "t1", "max_num_steps", "min_step")
"""The flat solver hyperparameters of 0.1.x ODE models, now fields of ``solver``."""


class LegacyCheckpointError(ValueError):
    """A checkpoint written by an earlier release, in a layout this release cannot load directly."""


def written_by(checkpoint: dict[str, Any]) -> str:
    """The release that wrote ``checkpoint`` (``'0.1.x'`` for checkpoints from before the version was recorded)."""
    return str(checkpoint.get(VERSION_KEY, "0.1.x"))


def _is_legacy(hparams: dict[str, Any]) -> bool:
    # every 0.1.x ODE model stored `method` (other models' `step_size` is their own, e.g. the PDE-CNNs')
    return "solver" not in hparams and "method" in hparams


def check_layout(checkpoint: dict[str, Any], path: Union[str, Path]) -> None:
    """Raise :class:`LegacyCheckpointError` with the upgrade command when ``checkpoint`` needs upgrading."""
    if not _is_legacy(checkpoint.get("hyper_parameters") or {}):
        return
    upgraded = Path(path).with_name(Path(path).stem + "-v0.2.ckpt")
    raise LegacyCheckpointError(
        f"checkpoint {str(path)!r} was written by lightning_pdenets {written_by(checkpoint)}, whose ODE models took flat "
        f"solver arguments (method, step_size, rtol, ...); since 0.2.0 they take one `solver` dict. Upgrade a copy "
        f"with: python -m lightning_pdenets.migration {path} {upgraded}  (and use that file)."
    )


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with its hyperparameters in the current layout (a no-op for current checkpoints)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if _is_legacy(hparams):
        flat = {key: hparams.pop(key) for key in LEGACY_SOLVER_KEYS if key in hparams}
        hparams["solver"] = SolverConfig.from_options(flat).as_options()
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
