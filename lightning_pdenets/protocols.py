"""The small protocols through which callbacks find the parts of a network they act on.

Callbacks in :mod:`lightning_pdenets.callbacks` never import model classes. They walk
``pl_module.modules()`` and use any submodule that *looks like* one of these protocols, so a
network from another project only has to provide the listed attributes.

ODE blocks (:class:`ODESolverBlock`)
    Any ``nn.Module`` that integrates ``dy/dt = f(t, y)`` from its forward input ``y0`` and exposes:

    * ``vector_field(t, y)``: the right-hand side f.
    * ``solver_settings() -> dict``: at least ``method``, ``step_size``, ``rtol``, ``atol``,
      ``t0``, ``t1`` and ``max_num_steps`` (:class:`lightning_pdenets.solvers.SolverConfig`'s fields).
    * ``configure_solver(**changes)``: validates and applies new settings (raise ``ValueError``).
    * ``nfe_forward`` / ``nfe_backward``: function evaluations of f in forward and backward passes
      since the block was built. They only ever increase: readers take differences over the span
      they care about, so nobody resets or restores them.

    :class:`lightning_pdenets.blocks.ODEBlock` is the reference implementation. Optionally, such a block also
    counts solver steps (read by :class:`lightning_pdenets.callbacks.NFEMonitor` when present): the only
    increasing ``steps_accepted_forward``, ``steps_rejected_forward``, ``steps_accepted_backward`` and
    ``steps_rejected_backward``, and ``last_step_sizes`` (a 1-D tensor: the accepted step sizes of its
    latest forward solve).

Regularization terms (:class:`RegularizedModule`)
    Any ``nn.Module`` whose forward pass produces terms for the training loss (e.g. RNODE's kinetic energy
    and Jacobian norm in :class:`lightning_pdenets.blocks.ODEBlock`) exposes ``pop_regularization() ->
    dict[str, Tensor]``: the weighted, differentiable terms collected since the last call, which it then
    forgets. A training step adds :func:`pop_regularization` of its network to the loss, once per step;
    :class:`lightning_pdenets.models.ClassifierModule` does, and logs each term as ``train/<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ODESolverBlock(Protocol):
    """Structural type of a block whose ODE solver callbacks may inspect and change."""

    nfe_forward: int
    nfe_backward: int

    def vector_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def solver_settings(self) -> dict[str, Any]: ...

    def configure_solver(self, **changes: Any) -> None: ...


ODEModule: TypeAlias = Any
"""An ``nn.Module`` following :class:`ODESolverBlock` (``Any`` to a type checker: typing has no intersection type)."""


def find_ode_blocks(module: nn.Module) -> list[ODEModule]:
    """Return every submodule of ``module`` (itself included) that follows :class:`ODESolverBlock`."""
    return [m for m in module.modules() if isinstance(m, ODESolverBlock)]


@runtime_checkable
class RegularizedModule(Protocol):
    """Structural type of a module whose forward pass produces terms for the training loss."""

    def pop_regularization(self) -> dict[str, torch.Tensor]: ...


def find_regularized_modules(module: nn.Module) -> list[Any]:
    """Return every submodule of ``module`` (itself included) that follows :class:`RegularizedModule`."""
    # the modules found are nn.Modules that also follow the protocol: Any, as typing has no intersection type
    return [m for m in module.modules() if isinstance(m, RegularizedModule)]


def pop_regularization(modules: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The terms of every module's ``pop_regularization()``, same names summed; ``{}`` when none is pending.

    Args:
        modules: Modules following :class:`RegularizedModule` (e.g. :func:`find_regularized_modules` of a network,
            found once per fit).
    """
    total: dict[str, torch.Tensor] = {}
    for module in modules:
        for name, term in module.pop_regularization().items():
            total[name] = total[name] + term if name in total else term
    return total


# -- time-dependent weights (PDE-motivated CNNs) -----------------------------------------------------
@runtime_checkable
class TimeDependentWeights(Protocol):
    """Structural type of a module holding weights θ(t) sampled on a uniform grid in time.

    Used by :class:`lightning_pdenets.callbacks.TimeTVRegularization` and
    :class:`lightning_pdenets.callbacks.WeightBoxProjection`. A module from another project
    provides:

    * ``time_dependent_parameters() -> list[Tensor]``: its parameters whose *first axis is time*
      (entry k is θ at the k-th grid point); each must be an ``nn.Parameter``.
    * ``weight_time_step() -> float``: the time h between neighbouring grid points, so that
      (θ_{k+1} − θ_k) / h approximates ∂_t θ.

    Implement it on the module that owns the parameters; the callbacks drop duplicates, so a
    parent that re-exports its children's parameters is harmless.
    """

    def time_dependent_parameters(self) -> list[torch.Tensor]: ...

    def weight_time_step(self) -> float: ...


@runtime_checkable
class TimeSteppingBlock(Protocol):
    """Structural type of a block integrating its features over a fixed number of time steps.

    Used by :class:`lightning_pdenets.callbacks.MultilevelTraining`:

    * ``num_time_steps``: the current number of state steps N.
    * ``refine_in_time(factor, refine_weights)``: multiply N by ``factor`` at fixed final time
      (the step size shrinks by ``factor``) and, with ``refine_weights=True``, re-sample its
      time-dependent weights on a finer grid by interpolation. Parameters must be resized in place
      (``param.data = ...``) so optimizers keep referring to the same ``nn.Parameter`` objects.
    """

    num_time_steps: int

    def refine_in_time(self, factor: int = 2, refine_weights: bool = True) -> None: ...


def find_time_dependent_weights(module: nn.Module) -> list[Any]:
    """Return every submodule of ``module`` (itself included) that follows :class:`TimeDependentWeights`."""
    # the modules found are nn.Modules that also follow the protocol: Any, as typing has no intersection type
    return [m for m in module.modules() if isinstance(m, TimeDependentWeights)]


def find_time_stepping_blocks(module: nn.Module) -> list[tuple[str, Any]]:
    """Return ``(qualified name, block)`` for every submodule that follows :class:`TimeSteppingBlock`."""
    # the modules found are nn.Modules that also follow the protocol: Any, as typing has no intersection type
    return [(name, m) for name, m in module.named_modules() if isinstance(m, TimeSteppingBlock)]
