"""Multilevel (shallow-to-deep) training: refine the time discretization of chosen blocks during training.

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020, Sec. "Computational benefits"; Haber, Ruthotto, Holtham & Jun, "Learning
across scales — multiscale methods for convolution neural networks", AAAI 2018. Training starts
with few time steps; at the given epochs every chosen block doubles its steps at fixed final
time (halving δ_t) and its time-dependent weights are prolonged by interpolating their control
points, so the deeper network starts from the shallow one's solution.

Blocks are found through :class:`lightning_pdenets.protocols.TimeSteppingBlock`, so any
Lightning project's blocks can take part.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.protocols import find_time_stepping_blocks
from lightning_pdenets.validation import check_bool, check_positive_int

__all__ = ["MultilevelTraining"]


class MultilevelTraining(Callback):
    """At each epoch in ``refine_epochs``, multiply the time steps of the chosen blocks by ``factor``.

    The blocks resize their parameters in place, so optimizers keep their parameter objects;
    optimizer state (e.g. momentum) of a parameter whose shape changed is dropped, since it no
    longer matches. The learning-rate schedule continues unchanged. Refinements already applied
    are stored in the callback's state, and refined blocks store their depth and control points
    in the checkpoint, so resuming neither repeats nor loses a refinement. With
    ``refine_weights=True`` the parameter shapes change, which DDP cannot follow; the callback
    then refuses to run on more than one process (``refine_weights=False`` only changes the depth
    and works under DDP).

    Args:
        refine_epochs: Epochs (>= 1) at whose start the blocks are refined.
        factor: Multiplier of the number of time steps (2 doubles).
        refine_weights: Also refine the control points of θ(t) (more parameters at the finer level).
        block_names: ``fnmatch`` patterns of qualified module names selecting blocks
            (e.g. ``["network.units.6"]``); ``None`` selects every ``TimeSteppingBlock``.
    """

    def __init__(
        self,
        refine_epochs: Sequence[int] = (),
        factor: int = 2,
        refine_weights: bool = True,
        block_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        listed = isinstance(refine_epochs, Iterable) and not isinstance(refine_epochs, str)
        epochs = list(refine_epochs) if listed else []
        if not epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in epochs):
            raise ValueError(f"`refine_epochs` must be a non-empty list of epochs >= 1, got {refine_epochs!r}.")
        check_positive_int(factor, "factor", minimum=2)
        check_bool(refine_weights, "refine_weights")
        if block_names is not None and (
            isinstance(block_names, str) or not all(isinstance(n, str) for n in block_names)
        ):
            raise ValueError(f"`block_names` must be None or a list of fnmatch patterns, got {block_names!r}.")
        self.refine_epochs = sorted(set(epochs))
        self.factor = factor
        self.refine_weights = refine_weights
        self.block_names = None if block_names is None else list(block_names)
        self.applied_epochs: list[int] = []

    def select_blocks(self, module: torch.nn.Module) -> list[tuple[str, Any]]:
        """(name, block) of the blocks to refine."""
        blocks = find_time_stepping_blocks(module)
        if self.block_names is None:
            return blocks
        return [(n, b) for n, b in blocks if any(fnmatch.fnmatchcase(n, p) for p in self.block_names)]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # ConfigurationError: a short message with exit code 2 in the CLI. Every DDP rank has the same model and
        # world size, so all of them raise alike and none waits in a collective for the others.
        if stage != "fit":
            return
        if not self.select_blocks(pl_module):
            names = [n for n, _ in find_time_stepping_blocks(pl_module)]
            raise ConfigurationError(
                f"MultilevelTraining found no TimeSteppingBlock matching `block_names`={self.block_names!r} in "
                f"{type(pl_module).__name__}; available blocks: {names}."
            )
        if self.refine_weights and trainer.world_size > 1:
            raise ConfigurationError(
                "MultilevelTraining(refine_weights=True) changes parameter shapes, which DDP cannot follow; "
                "set `refine_weights: false` (refine the depth only) or train on one process."
            )

    def refine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refine the chosen blocks now and reset the optimizer state of resized parameters."""
        shapes = {id(p): p.shape for p in pl_module.parameters()}
        for _, block in self.select_blocks(pl_module):
            block.refine_in_time(self.factor, self.refine_weights)
        resized = [p for p in pl_module.parameters() if shapes.get(id(p)) != p.shape]
        for optimizer in trainer.optimizers:
            for parameter in resized:
                optimizer.state.pop(parameter, None)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.refine_epochs and epoch not in self.applied_epochs:
            self.refine(trainer, pl_module)
            self.applied_epochs.append(epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # logged here, not at epoch start: Lightning skips on_train_epoch_start when resuming mid-epoch
        steps = [b.num_time_steps for _, b in self.select_blocks(pl_module)]
        log_replicated(pl_module, {"train/num_time_steps": float(max(steps))})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied_epochs": list(self.applied_epochs)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_epochs = list(state_dict.get("applied_epochs", []))
