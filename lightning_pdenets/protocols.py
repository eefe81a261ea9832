"""The small protocols through which callbacks find the parts of a network they act on.

Callbacks in :mod:`lightning_pdenets.callbacks` never import model classes. They walk
``pl_module.modules()`` and use any submodule that *looks like* one of these protocols, so a
network from another project only has to provide the listed attributes.

ODE blocks (:class:`ODESolverBlock`)
    Any ``nn.Module`` that integrates ``dy/dt = f(t, y)`` from its forward input ``y0`` and exposes:

    * ``vector_field(t, y)``: the right-hand side f.
    * ``solver_settings() -> dict``: at least ``method``, ``step_size``, ``rtol``, ``atol``,
      ``t0``, ``t1`` and ``max_num_steps``.
    * ``configure_solver(**changes)``: validates and applies new settings (raise ``ValueError``).
    * ``nfe_forward`` / ``nfe_backward``: function evaluations since the last ``reset_nfe()``.
    * ``reset_nfe()``.

    :class:`lightning_pdenets.blocks.ODEBlock` is the reference implementation.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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

    def reset_nfe(self) -> None: ...


def find_ode_blocks(module: nn.Module) -> list[nn.Module]:
    """Return every submodule of ``module`` (itself included) that follows :class:`ODESolverBlock`."""
    return [m for m in module.modules() if isinstance(m, ODESolverBlock)]
