"""Projection of chosen weights onto a box after every optimizer step (projected gradient descent).

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020, Sec. 4: the PDE weights are constrained to −1 ≤ θ ≤ 1, enforced by projecting
onto the box after each step. The projection is a post-step hook on the optimizers themselves
(``Optimizer.register_step_post_hook``), so it follows *every* step under automatic and manual
optimization, with gradient accumulation, and skips steps that AMP's scaler skips.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.protocols import find_time_dependent_weights

__all__ = ["WeightBoxProjection"]


class WeightBoxProjection(Callback):
    """Clip the chosen parameters into [``lower``, ``upper``] after every optimizer step.

    Args:
        parameter_names: ``fnmatch`` patterns matched against ``pl_module.named_parameters()``
            names (e.g. ``["network.units.*.kernel.control_points"]``). ``None`` (default) selects
            every parameter exposed through the
            :class:`lightning_pdenets.protocols.TimeDependentWeights` protocol.
        lower: Lower bound (−1 in the paper).
        upper: Upper bound (+1 in the paper).
        project_on_start: Also project once when fitting starts, so training starts feasible.
    """

    def __init__(
        self,
        parameter_names: Sequence[str] | None = None,
        lower: float = -1.0,
        upper: float = 1.0,
        project_on_start: bool = True,
    ) -> None:
        super().__init__()
        if parameter_names is not None and (
            isinstance(parameter_names, str) or not all(isinstance(n, str) and n for n in parameter_names)
        ):
            raise ValueError(
                f"`parameter_names` must be None or a list of non-empty fnmatch patterns, got {parameter_names!r}."
            )
        for name, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"`{name}` must be a number, got {value!r}.")
        if not lower < upper:
            raise ValueError(f"`lower` must be smaller than `upper`, got lower={lower!r}, upper={upper!r}.")
        self.parameter_names = None if parameter_names is None else list(parameter_names)
        self.lower = float(lower)
        self.upper = float(upper)
        self.project_on_start = project_on_start
        self._parameters: list[torch.nn.Parameter] = []
        self._handles: list[Any] = []

    def select_parameters(self, pl_module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters this callback projects, each once."""
        if self.parameter_names is None:
            candidates = [
                t for owner in find_time_dependent_weights(pl_module) for t in owner.time_dependent_parameters()
            ]
        else:
            candidates = [
                p
                for name, p in pl_module.named_parameters()
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.parameter_names)
            ]
        unique = {id(p): p for p in candidates}
        return list(unique.values())

    def project(self) -> None:
        """Clip the selected parameters in place."""
        with torch.no_grad():
            for parameter in self._parameters:
                parameter.clamp_(self.lower, self.upper)

    def _selected_or_error(self, pl_module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """:meth:`select_parameters`, or a :class:`ConfigurationError` (exit code 2 in the CLI) when it is empty."""
        selected = self.select_parameters(pl_module)
        if not selected:
            what = (
                "no TimeDependentWeights module"
                if self.parameter_names is None
                else (f"no parameter matching {self.parameter_names}")
            )
            example = next(iter(dict(pl_module.named_parameters())), "weight")
            raise ConfigurationError(
                f"WeightBoxProjection found {what} in {type(pl_module).__name__}; pass `parameter_names` as fnmatch "
                f"patterns of names in `named_parameters()` (e.g. {example!r}), or remove the callback."
            )
        return selected

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the fit starts (every DDP rank holds the same model, so all decide alike)
        if stage == "fit":
            self._selected_or_error(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parameters = self._selected_or_error(pl_module)
        self._handles = [
            optimizer.register_step_post_hook(lambda *args: self.project()) for optimizer in trainer.optimizers
        ]
        if self.project_on_start:
            self.project()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
