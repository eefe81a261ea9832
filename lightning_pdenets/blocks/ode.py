"""ODE block: integrates a vector field with torchdiffeq and counts function evaluations."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.solvers import SolverConfig

__all__ = ["ODEBlock", "SolverConfig", "explain_solver_failure"]


class ODEBlock(nn.Module):
    """Solve dy/dt = f(t, y) on [t0, t1] from the input y(t0) and return y(t1).

    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018. The solver is
    torchdiffeq's ``odeint`` (or ``odeint_adjoint`` with ``adjoint=True``), configured by one
    :class:`~lightning_pdenets.solvers.SolverConfig`. The block follows
    :class:`lightning_pdenets.protocols.ODESolverBlock`, so solver callbacks can change its
    settings between steps, and it stores those settings in its ``state_dict`` so that an
    adapted step size or tolerance survives a checkpoint.

    ``nfe_forward`` and ``nfe_backward`` count every evaluation of f, in the forward solve and in
    backward (through the solver, or the adjoint solve); they only ever increase, so a reader takes
    the difference over the span it cares about.

    Args:
        vector_field: ``nn.Module`` computing f(t, y) with the shape of y.
        solver: A :class:`SolverConfig` or a dict of its fields (``None``: the defaults, dopri5 at 1e-3).
        **options: Individual :class:`SolverConfig` fields over ``solver``, e.g. ``method="rk4", step_size=0.25``.

    Raises:
        ValueError: on an unknown solver name or an invalid setting, listing the allowed values.
        SolverFailedError: when the solver underflows or exceeds ``max_num_steps`` during forward (after
            ``failure_retries`` loosened retries, if any).
    """

    def __init__(
        self,
        vector_field: nn.Module,
        solver: Union[SolverConfig, Mapping[str, Any], None] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(f"`vector_field` must be an nn.Module computing f(t, y), got {type(vector_field).__name__}.")
        self.field = vector_field
        base = solver.as_options() if isinstance(solver, SolverConfig) else solver
        self.solver = SolverConfig.from_options(options, defaults=base)
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._solving_forward = False

    # -- protocol ---------------------------------------------------------------------------
    def vector_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluate f(t, y) without counting it."""
        return self.field(t, y)

    def solver_settings(self) -> dict[str, Any]:
        """Every :class:`SolverConfig` field as a plain dict."""
        return self.solver.as_options()

    def configure_solver(self, **changes: Any) -> None:
        """Change solver settings; the result is validated as a whole before it is applied."""
        self.solver = self.solver.replace(**changes)

    # -- checkpointing of run-time solver changes -----------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"solver_settings": self.solver_settings()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.solver = SolverConfig.from_options(state["solver_settings"])

    # -- integration --------------------------------------------------------------------------
    def _counted_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.field(t, y)
        if not self._solving_forward:
            self.nfe_backward += 1  # adjoint solve, called from autograd's backward
            return out
        self.nfe_forward += 1
        if not self.solver.adjoint and out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.nfe_backward += 1

    def extra_repr(self) -> str:
        return self.solver.describe()

    def _solve(self, y0: torch.Tensor) -> torch.Tensor:
        s = self.solver
        times = torch.tensor([s.t0, s.t1], dtype=y0.dtype, device=y0.device)
        kwargs = s.odeint_kwargs()
        if s.adjoint:
            kwargs["adjoint_params"] = tuple(self.field.parameters())
        solve = odeint_adjoint if s.adjoint else odeint
        self._solving_forward = True
        try:
            return solve(self._counted_field, y0, times, **kwargs)[-1]
        finally:
            self._solving_forward = False

    def _loosened(self) -> Optional[SolverConfig]:
        """The configuration of the next retry after a failure, or ``None`` when no retry is left."""
        s = self.solver
        if not s.is_adaptive or s.rtol >= s.failure_max_tol:
            return None
        cap, factor = s.failure_max_tol, s.failure_tol_factor
        return s.replace(rtol=min(s.rtol * factor, cap), atol=max(s.atol, min(s.atol * factor, cap)))

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        retries_left = self.solver.failure_retries
        while True:
            try:
                return self._solve(y0)
            except (AssertionError, RuntimeError) as error:
                if not is_solver_failure(error):
                    raise
                loosened = self._loosened() if retries_left > 0 else None
                if loosened is None:
                    raise explain_solver_failure(error, [self.solver_settings()], "forward") from error
                self.solver, retries_left = loosened, retries_left - 1


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
        f"ODE solver failed{where}: {error} ({blocks}). The dynamics became too stiff for this tolerance. Try: a "
        f"looser `rtol`/`atol`, a `min_step` > 0 (accept steps of that size instead of failing), a larger "
        f"`max_num_steps`, `failure_retries` > 0 (loosen the tolerance and retry), or a fixed-step solver (`method: "
        f"rk4` with a `step_size`), all in the model's `solver` settings (e.g. --model.init_args.solver.rtol 1e-2); "
        f"or the ToleranceAdaptation callback, or a lower learning rate."
    )
