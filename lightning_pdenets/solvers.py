"""Catalogue of the ODE solvers the framework accepts, with their order and kind.

The names are torchdiffeq's; this module adds what the callbacks need to reason about
solvers (order of accuracy, fixed step or adaptive) and the validation every block and
callback shares, so that a bad name always produces the same actionable message.
"""

from __future__ import annotations

from dataclasses import dataclass
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

from lightning_pdenets.validation import check_positive  # noqa: F401  (re-exported for solver settings)


@dataclass(frozen=True)
class SolverInfo:
    """Static facts about one solver.

    Attributes:
        order: Order of accuracy p of the method (local error O(h^(p+1))).
        adaptive: True for embedded-error, step-size-controlled methods.
    """

    order: int
    adaptive: bool


SOLVERS: dict[str, SolverInfo] = {
    "euler": SolverInfo(order=1, adaptive=False),
    "midpoint": SolverInfo(order=2, adaptive=False),
    "heun2": SolverInfo(order=2, adaptive=False),
    "heun3": SolverInfo(order=3, adaptive=False),
    "rk4": SolverInfo(order=4, adaptive=False),
    "explicit_adams": SolverInfo(order=4, adaptive=False),
    "implicit_adams": SolverInfo(order=4, adaptive=False),
    "adaptive_heun": SolverInfo(order=2, adaptive=True),
    "fehlberg2": SolverInfo(order=2, adaptive=True),
    "bosh3": SolverInfo(order=3, adaptive=True),
    "dopri5": SolverInfo(order=5, adaptive=True),
    "dopri8": SolverInfo(order=8, adaptive=True),
}
"""Every solver name accepted anywhere in the framework (a subset of torchdiffeq's)."""

FIXED_STEP_SOLVERS = tuple(name for name, info in SOLVERS.items() if not info.adaptive)
ADAPTIVE_SOLVERS = tuple(name for name, info in SOLVERS.items() if info.adaptive)

missing = set(SOLVERS) - set(_TORCHDIFFEQ_SOLVERS)
if missing:  # pragma: no cover - guards against a torchdiffeq release renaming solvers
    raise ImportError(f"the installed torchdiffeq lacks solvers {sorted(missing)}; install torchdiffeq>=0.2.3")


def check_solver_name(method: str, argument: str = "method") -> SolverInfo:
    """Return the :class:`SolverInfo` for ``method`` or raise a ``ValueError`` listing the valid names."""
    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(
            f"`{argument}` must be one of {sorted(SOLVERS)} (fixed step: {list(FIXED_STEP_SOLVERS)}; "
            f"adaptive: {list(ADAPTIVE_SOLVERS)}), got {method!r}."
        )
    return SOLVERS[method]
