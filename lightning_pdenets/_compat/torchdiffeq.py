"""torchdiffeq: its solver names and its default error norm, which its public API does not expose.

* :func:`solver_names`: torchdiffeq keeps its method table in the private ``torchdiffeq._impl.odeint.SOLVERS``;
  the solvers package checks at import that every method the framework offers is among them.
* :func:`rms_norm`: the norm torchdiffeq's adaptive solvers use by default (``torchdiffeq._impl.misc._rms_norm``),
  written out here so that an ODE block's RNODE integrals can be left out of the error control of its state.

``tests/test_library_adapters.py`` checks both against the installed torchdiffeq (through ``odeint``, its public
function) and names the function to update when one changes.
"""

from __future__ import annotations

import torch


def solver_names() -> frozenset[str] | None:
    """The method names torchdiffeq's ``odeint`` accepts, or ``None`` where its private table moved."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:  # a release that reorganised its internals: odeint still reports an unknown method
        return None
    return frozenset(SOLVERS)


def rms_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square of ``tensor``: the norm torchdiffeq's adaptive step-size control applies by default."""
    return tensor.abs().pow(2).mean().sqrt()
