"""ODE block: integrates a vector field with torchdiffeq and counts function evaluations."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.solvers import SOLVERS, check_solver_name
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = ["ODEBlock", "SolverSettings", "explain_solver_failure"]


@dataclass(frozen=True)
class SolverSettings:
    """How an :class:`ODEBlock` integrates; every field can be changed at run time.

    Attributes:
        method: torchdiffeq solver name (see :data:`lightning_pdenets.solvers.SOLVERS`).
        step_size: Step of fixed-step solvers; ignored by adaptive ones.
        rtol: Relative tolerance of adaptive solvers.
        atol: Absolute tolerance of adaptive solvers.
        adjoint: Backpropagate with the adjoint method (O(1) memory) instead of through the solver.
        t0: Start of the integration interval.
        t1: End of the integration interval.
        max_num_steps: Upper bound on solver steps (adaptive solvers stop with an error past it).
        min_step: Smallest step an adaptive solver may take (torchdiffeq's ``min_step``); with
            ``min_step > 0`` it accepts steps at that size instead of failing with "underflow in dt".
    """

    method: str = "dopri5"
    step_size: Optional[float] = None
    rtol: float = 1e-3
    atol: float = 1e-3
    adjoint: bool = False
    t0: float = 0.0
    t1: float = 1.0
    max_num_steps: int = 1000
    min_step: float = 0.0

    def validate(self) -> "SolverSettings":
        """Raise ``ValueError`` naming the bad field; return ``self`` when all fields are valid."""
        info = check_solver_name(self.method)
        check_positive(self.rtol, "rtol")
        check_positive(self.atol, "atol")
        if not isinstance(self.adjoint, bool):
            raise ValueError(f"`adjoint` must be True or False, got {self.adjoint!r}.")
        if not (isinstance(self.t0, (int, float)) and isinstance(self.t1, (int, float)) and self.t1 > self.t0):
            raise ValueError(f"the integration interval needs t1 > t0, got t0={self.t0!r}, t1={self.t1!r}.")
        check_positive_int(self.max_num_steps, "max_num_steps")
        if isinstance(self.min_step, bool) or not isinstance(self.min_step, (int, float)) or not 0 <= self.min_step < self.t1 - self.t0:
            raise ValueError(f"`min_step` must be a number in [0, t1 - t0), got {self.min_step!r}.")
        if info.adaptive:
            return self
        if self.step_size is None:
            raise ValueError(
                f"fixed-step solver {self.method!r} needs `step_size` (e.g. step_size={(self.t1 - self.t0) / 10}); "
                f"or choose an adaptive method such as 'dopri5'."
            )
        check_positive(self.step_size, "step_size")
        if self.num_fixed_steps > self.max_num_steps:
            raise ValueError(
                f"`step_size`={self.step_size} needs {self.num_fixed_steps} steps over [{self.t0}, {self.t1}], more "
                f"than `max_num_steps`={self.max_num_steps}; raise max_num_steps or use a larger step_size."
            )
        return self

    @property
    def num_fixed_steps(self) -> int:
        """Number of steps a fixed-step solver takes over [t0, t1]."""
        return math.ceil((self.t1 - self.t0) / self.step_size - 1e-9)

    @property
    def is_adaptive(self) -> bool:
        return SOLVERS[self.method].adaptive


_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SolverSettings))


class ODEBlock(nn.Module):
    """Solve dy/dt = f(t, y) on [t0, t1] from the input y(t0) and return y(t1).

    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018. The solver is
    torchdiffeq's ``odeint`` (or ``odeint_adjoint`` with ``adjoint=True``). The block follows
    :class:`lightning_pdenets.protocols.ODESolverBlock`, so solver callbacks can change its
    settings between steps, and it stores those settings in its ``state_dict`` so that an
    adapted step size or tolerance survives a checkpoint.

    Args:
        vector_field: ``nn.Module`` computing f(t, y) with the shape of y.
        method, step_size, rtol, atol, adjoint, t0, t1, max_num_steps, min_step: see :class:`SolverSettings`.

    Raises:
        ValueError: on an unknown solver name or an invalid setting, listing the allowed values.
        SolverFailedError: when the solver underflows or exceeds ``max_num_steps`` during forward.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        method: str = "dopri5",
        step_size: Optional[float] = None,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = False,
        t0: float = 0.0,
        t1: float = 1.0,
        max_num_steps: int = 1000,
        min_step: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(f"`vector_field` must be an nn.Module computing f(t, y), got {type(vector_field).__name__}.")
        self.field = vector_field
        self.settings = SolverSettings(
            method, step_size, rtol, atol, adjoint, t0, t1, max_num_steps, min_step
        ).validate()
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._solving_forward = False

    # -- protocol ---------------------------------------------------------------------------
    def vector_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluate f(t, y) without counting it."""
        return self.field(t, y)

    def solver_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    def configure_solver(self, **changes: Any) -> None:
        """Change solver settings; the result is validated as a whole before it is applied."""
        unknown = sorted(set(changes) - set(_SETTING_NAMES))
        if unknown:
            raise ValueError(f"unknown solver setting(s) {unknown}; valid names are {list(_SETTING_NAMES)}.")
        self.settings = dataclasses.replace(self.settings, **changes).validate()

    def reset_nfe(self) -> None:
        self.nfe_forward = 0
        self.nfe_backward = 0

    # -- checkpointing of run-time solver changes -----------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"solver_settings": self.solver_settings()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.settings = SolverSettings(**state["solver_settings"]).validate()

    # -- integration --------------------------------------------------------------------------
    def _counted_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.field(t, y)
        if not self._solving_forward:
            self.nfe_backward += 1  # adjoint solve, called from autograd's backward
            return out
        self.nfe_forward += 1
        if not self.settings.adjoint and out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.nfe_backward += 1

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.solver_settings().items())

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        s = self.settings
        times = torch.tensor([s.t0, s.t1], dtype=y0.dtype, device=y0.device)
        if s.is_adaptive:
            options: dict[str, Any] = {"max_num_steps": s.max_num_steps, "min_step": s.min_step}
        else:
            options = {"step_size": s.step_size}
        kwargs: dict[str, Any] = dict(rtol=s.rtol, atol=s.atol, method=s.method, options=options)
        if s.adjoint:
            kwargs["adjoint_params"] = tuple(self.field.parameters())
        solve = odeint_adjoint if s.adjoint else odeint
        self._solving_forward = True
        try:
            return solve(self._counted_field, y0, times, **kwargs)[-1]
        except (AssertionError, RuntimeError) as error:
            if not is_solver_failure(error):
                raise
            raise explain_solver_failure(error, [dataclasses.asdict(s)], "forward") from error
        finally:
            self._solving_forward = False


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={settings[name]!r}" for name in ("method", "rtol", "atol", "max_num_steps", "min_step"))


def explain_solver_failure(error: Exception, settings: Sequence[Mapping[str, Any]], phase: str) -> Exception:
    """``SolverFailedError`` with remedies for a torchdiffeq failure in the ``phase`` pass; other errors unchanged.

    Args:
        error: What torchdiffeq raised.
        settings: ``solver_settings()`` of the ODE block(s) that may have failed (a backward failure cannot
            name its block).
        phase: ``'forward'`` or ``'backward (adjoint)'``.
    """
    if isinstance(error, SolverFailedError) or not is_solver_failure(error):
        return error
    where = "" if phase == "forward" else f" in the {phase} pass"
    blocks = "; ".join(_settings_text(s) for s in settings) or "no ODE block found"
    return SolverFailedError(
        f"ODE solver failed{where}: {error} ({blocks}). The dynamics became too stiff for "
        f"this tolerance. Try: a looser tolerance (rtol/atol), a min_step > 0 (accept steps of that size instead "
        f"of failing), a larger max_num_steps, a fixed-step solver (method='rk4' with a "
        f"step_size), the ToleranceAdaptation callback, or a lower learning rate."
    )
