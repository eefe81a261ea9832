"""ODE block: integrates a vector field (with the native Runge–Kutta loops or torchdiffeq), counts function
evaluations and solver steps, and integrates RNODE's regularization terms along the solve when asked to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from lightning_pdenets._compat.torchdiffeq import rms_norm
from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.solvers import SOLVERS, SolverConfig
from lightning_pdenets.solvers.runge_kutta import AdjointPlan, Field, adjoint_solve, solve

__all__ = ["ODEBlock", "SolverConfig", "explain_solver_failure"]


class ODEBlock(nn.Module):
    """Solve dy/dt = f(t, y) on [t0, t1] from the input y(t0) and return y(t1).

    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018. The solver is configured by one
    :class:`~lightning_pdenets.solvers.SolverConfig`: with ``backend: native`` (the default) it is the explicit
    Runge–Kutta loop of :mod:`lightning_pdenets.solvers.runge_kutta` (backpropagated through, or by its adjoint
    with ``adjoint=True``); with ``backend: torchdiffeq``, and for the methods the native loop leaves to it,
    torchdiffeq's ``odeint`` (or ``odeint_adjoint``). The block follows
    :class:`lightning_pdenets.protocols.ODESolverBlock`, so solver callbacks can change its
    settings between steps, and it stores those settings in its ``state_dict`` so that an
    adapted step size or tolerance survives a checkpoint.

    ``nfe_forward`` and ``nfe_backward`` count every evaluation of f, in the forward solve and in
    backward (through the solver, or the adjoint solve); they only ever increase, so a reader takes
    the difference over the span it cares about. So do the solver-step counters ``steps_accepted_forward``,
    ``steps_rejected_forward``, ``steps_accepted_backward`` and ``steps_rejected_backward`` (read from
    torchdiffeq's step callbacks; a fixed-step solver accepts every step, and backpropagating through the
    solver takes no backward steps of its own). ``last_step_sizes`` holds the accepted step sizes of the latest
    forward solve.

    With ``kinetic_weight`` or ``jacobian_weight`` > 0 (RNODE, Finlay et al., "How to train your neural ODE",
    ICML 2020), a forward pass in training mode with gradients enabled also integrates, per sample, the
    kinetic energy ∫‖f‖² dt and the Jacobian norm ∫‖∂f/∂y‖²_F dt as extra states of the same solve (norms
    summed over the state's entries; the Jacobian term by Hutchinson's estimator ‖εᵀ ∂f/∂y‖² with one probe
    ε per solve). These extra states are left out of the step-size control, so the solver takes the steps of
    the unregularized solve. The weighted batch means are collected until :meth:`pop_regularization` returns
    them for the training loss (``ClassifierModule`` adds them; a foreign training loop calls
    :func:`lightning_pdenets.protocols.pop_regularization` once per step).

    Args:
        vector_field: ``nn.Module`` computing f(t, y) with the shape of y.
        solver: A :class:`SolverConfig` or a dict of its fields (``None``: the defaults, dopri5 at 1e-3).
        **options: Individual :class:`SolverConfig` fields over ``solver``, e.g. ``method="rk4", step_size=0.25``.

    Raises:
        ValueError: on an unknown solver name or an invalid setting, listing the allowed values.
        TypeError: in forward, when the input is not one floating-point (or complex) tensor, or the vector field
            does not return a tensor of the state's shape and dtype (checked at the first evaluation of each solve).
        SolverFailedError: when the solver underflows or exceeds ``max_num_steps`` during forward (after
            ``failure_retries`` loosened retries, if any).
    """

    def __init__(
        self,
        vector_field: nn.Module,
        solver: SolverConfig | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(
                f"`vector_field` must be an nn.Module computing f(t, y), got {type(vector_field).__name__}."
            )
        self.field = vector_field
        if solver is None or isinstance(solver, Mapping):  # one validation of the merged settings
            self.solver = SolverConfig.from_options({**(solver or {}), **options})
        else:  # a SolverConfig is taken as it is (validated when built); anything else is refused
            config = SolverConfig.from_options(solver)
            self.solver = config.replace(**options) if options else config
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.steps_accepted_forward = 0
        self.steps_rejected_forward = 0
        self.steps_accepted_backward = 0
        self.steps_rejected_backward = 0
        self.last_step_sizes = torch.empty(0)
        self._solving_forward = False
        self._regularization: dict[str, torch.Tensor] = {}

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

    def pop_regularization(self) -> dict[str, torch.Tensor]:
        """The weighted RNODE terms of the training forward passes since the last call, and forget them.

        Returns:
            ``{"kinetic_energy": λ_K·mean ∫‖f‖² dt, "jacobian_frobenius": λ_J·mean ∫‖∂f/∂y‖²_F dt}`` (batch means,
            differentiable; the terms whose weight is 0 are left out), or ``{}`` when no regularized pass ran.
        """
        terms, self._regularization = self._regularization, {}
        return terms

    # -- checkpointing of run-time solver changes -----------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"solver_settings": self.solver_settings()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.solver = SolverConfig.from_options(state["solver_settings"])

    # -- integration --------------------------------------------------------------------------
    def _counted_field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._count(self.field(t, y))

    def _count(self, out: torch.Tensor) -> torch.Tensor:
        """Count one evaluation of f whose value is ``out`` (in backward too, once its gradient is taken)."""
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
        if self.solver.uses_native:
            return self._solve_native(y0)
        return self._solve_torchdiffeq(y0)

    def _solve_native(self, y0: torch.Tensor) -> torch.Tensor:
        s = self.solver
        regularized = s.is_regularized and self.training and torch.is_grad_enabled()
        dynamics = _SolveDynamics(self, y0, regularized)
        state: tuple[torch.Tensor, ...] = (y0,)
        controlled = None
        field: Field
        if regularized:
            per_sample = torch.zeros(y0.shape[:1] if y0.dim() > 1 else (), dtype=y0.dtype, device=y0.device)
            state, controlled = (y0, per_sample, per_sample), (0,)  # the integrals follow the steps chosen for y
            field = dynamics
        else:

            def state_only(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                return (dynamics(t, y[0]),)

            field = state_only

        forward_observer = dynamics.observer(backward=False)
        self._solving_forward = True
        try:
            if s.adjoint:
                plan = AdjointPlan(
                    field,
                    s.t0,
                    s.t1,
                    s.step_control(),
                    s.step_control(backward=True),
                    controlled,
                    seminorm=(s.adjoint_options or {}).get("norm") == "seminorm",
                    forward_observer=forward_observer,
                    backward_observer=dynamics.observer(backward=True),
                )
                solution = adjoint_solve(plan, state, tuple(self.field.parameters()))
            else:
                solution = solve(field, state, s.t0, s.t1, s.step_control(), controlled, forward_observer)
        finally:
            self._solving_forward = False
            self.last_step_sizes = dynamics.step_sizes()
        if regularized:
            self._collect_regularization(solution[1], solution[2])
        return solution[0]

    def _collect_regularization(self, kinetic: torch.Tensor, jacobian: torch.Tensor) -> None:
        s = self.solver
        for name, weight, integral in (
            ("kinetic_energy", s.kinetic_weight, kinetic),
            ("jacobian_frobenius", s.jacobian_weight, jacobian),
        ):
            if weight > 0:
                term = weight * integral.mean()
                self._regularization[name] = self._regularization[name] + term if name in self._regularization else term

    def _solve_torchdiffeq(self, y0: torch.Tensor) -> torch.Tensor:
        s = self.solver
        real = torch.empty(0, dtype=y0.dtype).real.dtype  # torchdiffeq takes a complex state, but real times
        times = torch.tensor([s.t0, s.t1], dtype=real, device=y0.device)
        kwargs = s.odeint_kwargs()
        if s.adjoint:
            kwargs["adjoint_params"] = tuple(self.field.parameters())
        solve = odeint_adjoint if s.adjoint else odeint
        regularized = s.is_regularized and self.training and torch.is_grad_enabled()
        dynamics = _SolveDynamics(self, y0, regularized)
        state: Any = y0
        if regularized:
            per_sample = torch.zeros(y0.shape[:1] if y0.dim() > 1 else (), dtype=y0.dtype, device=y0.device)
            state = (y0, per_sample, per_sample)
            if s.is_adaptive:  # the integrals follow the steps chosen for y (their error is not controlled)
                kwargs["options"]["norm"] = lambda tensors: rms_norm(tensors[0])
        self._solving_forward = True
        try:
            solution = solve(dynamics, state, times, **kwargs)
        finally:
            self._solving_forward = False
            self.last_step_sizes = dynamics.step_sizes()
        if not regularized:
            return solution[-1]
        self._collect_regularization(solution[1][-1], solution[2][-1])
        return solution[0][-1]

    def _loosened(self) -> SolverConfig | None:
        """The configuration of the next retry after a failure, or ``None`` when no retry is left."""
        s = self.solver
        if not s.is_adaptive or s.rtol >= s.failure_max_tol:
            return None
        cap, factor = s.failure_max_tol, s.failure_tol_factor
        return s.replace(rtol=min(s.rtol * factor, cap), atol=max(s.atol, min(s.atol * factor, cap)))

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        _check_state(y0)
        if y0.numel() == 0:  # an empty batch: nothing to integrate (torchdiffeq's controller fails on it)
            return y0.clone()
        retries_left = self.solver.failure_retries
        while True:
            try:
                return self._solve(y0)
            except (AssertionError, RuntimeError) as error:
                if isinstance(error, AssertionError) and "non-finite values in state" in str(error):
                    # torchdiffeq's check, reached with min_step > 0; the native backend's wording
                    raise SolverFailedError(f"the state held NaN/Inf in the solve: {str(error)[:200]}") from error
                if not is_solver_failure(error):
                    raise
                loosened = self._loosened() if retries_left > 0 else None
                if loosened is None:
                    raise explain_solver_failure(error, [self.solver_settings()], "forward") from error
                self.solver, retries_left = loosened, retries_left - 1


def _check_state(y0: Any) -> None:
    """Refuse an input that is not one floating-point or complex tensor, naming the fix."""
    if not isinstance(y0, torch.Tensor):
        kind = type(y0).__name__
        hint = " (e.g. torch.cat the parts along a feature axis)" if isinstance(y0, (tuple, list)) else ""
        raise TypeError(f"ODEBlock integrates one tensor state y(t0), got a {kind}{hint}.")
    if not (y0.is_floating_point() or y0.is_complex()):
        raise TypeError(
            f"ODEBlock needs a floating-point (or complex) state, got {y0.dtype}: convert it with y0.float() "
            "(or .double())."
        )


def _check_output(out: Any, state: torch.Tensor) -> None:
    """Refuse a vector-field value that is not a tensor of the state's shape, dtype and device."""
    if (
        isinstance(out, torch.Tensor)
        and out.shape == state.shape
        and out.dtype == state.dtype
        and out.device == state.device
    ):
        return
    expected = f"{list(state.shape)} {str(state.dtype).removeprefix('torch.')} on {state.device}"
    if isinstance(out, torch.Tensor):
        got = f"{list(out.shape)} {str(out.dtype).removeprefix('torch.')} on {out.device}"
    else:
        got = f"a {type(out).__name__}"
    raise TypeError(f"the vector field must return a tensor of the state's shape and dtype {expected}, got {got}.")


class _SolveDynamics:
    """What one solve of an :class:`ODEBlock` integrates, and where torchdiffeq reports its steps.

    torchdiffeq looks its step callbacks up on the function it integrates (``callback_accept_step`` and
    ``callback_reject_step`` for adaptive solvers, ``callback_step`` for fixed-step ones, each also with an
    ``_adjoint`` suffix for the adjoint solve); a bound method cannot carry them, so each solve gets one of
    these. Only the callbacks the solver supports are set, since torchdiffeq warns about the others.

    Regularized (RNODE, Finlay et al. 2020), the state is ``(y, kinetic, jacobian)`` with per-sample
    integrands ‖f‖² and ‖εᵀ ∂f/∂y‖² (Hutchinson's estimator of ‖∂f/∂y‖²_F, as in FFJORD), the probe ε fixed
    for the whole solve, the adjoint solve included.
    """

    def __init__(self, block: ODEBlock, y0: torch.Tensor, regularized: bool) -> None:
        self.block = block
        self.regularized = regularized
        solver = block.solver
        self.probe: torch.Tensor | None = None
        if regularized and solver.jacobian_weight > 0:
            if solver.hutchinson_noise == "rademacher":
                self.probe = torch.randint_like(y0, 2) * 2 - 1
            else:
                self.probe = torch.randn_like(y0)
        self._step_sizes: list[torch.Tensor | float] = []
        self._checked = False  # the vector field's first value of this solve has the state's shape and dtype
        self._set_callbacks("", solver.is_adaptive)
        if solver.adjoint:
            self._set_callbacks("_adjoint", SOLVERS[solver.adjoint_method or solver.method].adaptive)

    def _set_callbacks(self, suffix: str, adaptive: bool) -> None:
        backward = bool(suffix)
        if adaptive:
            setattr(self, "callback_accept_step" + suffix, lambda t0, y0, dt: self._step(backward, True, dt))
            setattr(self, "callback_reject_step" + suffix, lambda t0, y0, dt: self._step(backward, False, dt))
        else:
            setattr(self, "callback_step" + suffix, lambda t0, y0, dt: self._step(backward, True, dt))

    def _step(self, backward: bool, accepted: bool, dt: torch.Tensor | float) -> None:
        block = self.block
        if backward:
            if accepted:
                block.steps_accepted_backward += 1
            else:
                block.steps_rejected_backward += 1
        elif accepted:
            block.steps_accepted_forward += 1
            self._step_sizes.append(dt.detach() if isinstance(dt, torch.Tensor) else dt)
        else:
            block.steps_rejected_forward += 1

    def observer(self, backward: bool) -> Callable[[bool, float], None]:
        """The native solver's step observer for the forward or the backward (adjoint) solve."""
        return lambda accepted, dt: self._step(backward, accepted, dt)

    def step_sizes(self) -> torch.Tensor:
        """The accepted forward step sizes of this solve, in order (float64)."""
        if not self._step_sizes:
            return torch.empty(0)
        return torch.stack([torch.as_tensor(dt, dtype=torch.float64) for dt in self._step_sizes])

    def __call__(self, t: torch.Tensor, state: Any) -> Any:
        if not self.regularized:
            if self._checked:
                return self.block._counted_field(t, state)
            out = self.block.field(t, state)
            _check_output(out, state)
            self._checked = True
            return self.block._count(out)
        y = state[0]
        field = self.block.field
        if self.probe is None:
            out = field(t, y)
            if not self._checked:
                _check_output(out, y)
                self._checked = True
            jacobian = torch.zeros_like(state[2])
        else:
            if not (torch.is_grad_enabled() and y.requires_grad):
                y = y.detach().requires_grad_(True)  # the adjoint's forward solve runs under no_grad
            with torch.enable_grad():
                out = field(t, y)
                if not self._checked:
                    _check_output(out, y)
                    self._checked = True
                (probe_jacobian,) = torch.autograd.grad(out, y, self.probe, create_graph=True)
            jacobian = _per_sample_squared_norm(probe_jacobian)
        # counted after the probe's product, whose gradient computation must not count as a backward evaluation
        self.block._count(out)
        return out, _per_sample_squared_norm(out), jacobian


def _per_sample_squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Σ of squares over every axis but the first (the batch), or over all of a 1-D tensor."""
    return tensor.pow(2).flatten(1).sum(1) if tensor.dim() > 1 else tensor.pow(2).sum()


def _settings_text(settings: Mapping[str, Any], backward: bool = False) -> str:
    """The settings that stepped the failed solve: the forward ones, or the adjoint's effective ones."""
    if not backward:
        return ", ".join(
            f"{name}={settings[name]!r}" for name in ("method", "rtol", "atol", "max_num_steps", "min_step")
        )
    options = settings.get("adjoint_options") or {}
    effective = {
        "adjoint_method": settings.get("adjoint_method") or settings["method"],
        "adjoint_rtol": settings["rtol"] if settings.get("adjoint_rtol") is None else settings["adjoint_rtol"],
        "adjoint_atol": settings["atol"] if settings.get("adjoint_atol") is None else settings["adjoint_atol"],
        **{f"adjoint_options.{name}": options.get(name, settings[name]) for name in ("max_num_steps", "min_step")},
    }
    return ", ".join(f"{name}={value!r}" for name, value in effective.items())


def explain_solver_failure(error: Exception, settings: Sequence[Mapping[str, Any]], phase: str) -> Exception:
    """``SolverFailedError`` with remedies for a torchdiffeq failure in the ``phase`` pass; other errors unchanged.

    A backward failure names the adjoint solve's effective settings (``adjoint_rtol``/``adjoint_atol``, or
    ``rtol``/``atol`` where unset, and ``adjoint_options`` over the forward step settings) of the blocks that
    solve an adjoint, and advises changing those (``failure_retries`` only retries forward solves).

    Args:
        error: What torchdiffeq raised.
        settings: ``solver_settings()`` of the ODE block(s) that may have failed (a backward failure cannot
            name its block).
        phase: ``'forward'`` or ``'backward (adjoint)'``.
    """
    if isinstance(error, SolverFailedError):  # explained where it was raised; a backward one says so
        return error if phase == "forward" else SolverFailedError(f"ODE solver failed in the {phase} pass: {error}")
    if not is_solver_failure(error):
        return error
    if phase == "forward":
        blocks = "; ".join(_settings_text(s) for s in settings) or "no ODE block found"
        return SolverFailedError(
            f"ODE solver failed: {error} ({blocks}). The dynamics became too stiff for this tolerance. Try: a "
            f"looser `rtol`/`atol`, a `min_step` > 0 (accept steps of that size instead of failing), a larger "
            f"`max_num_steps`, `failure_retries` > 0 (loosen the tolerance and retry), or a fixed-step solver "
            f"(`method: rk4` with a `step_size`), all in the model's `solver` settings (e.g. "
            f"--model.init_args.solver.rtol 1e-2); or the ToleranceAdaptation callback, or a lower learning rate."
        )
    adjoint = [s for s in settings if s.get("adjoint")] or list(settings)  # only adjoint blocks solve in backward
    blocks = "; ".join(_settings_text(s, backward=True) for s in adjoint) or "no ODE block found"
    return SolverFailedError(
        f"ODE solver failed in the {phase} pass: {error} (the adjoint solve's settings: {blocks}). The adjoint "
        f"dynamics became too stiff for its tolerance. Try, in the model's `solver` settings: a looser "
        f"`adjoint_rtol`/`adjoint_atol`, `adjoint_options: {{min_step: ...}}` > 0 (accept steps of that size "
        f"instead of failing), a larger `adjoint_options: {{max_num_steps: ...}}`, `adjoint_options: {{norm: "
        f"seminorm}}` (fewer backward steps), or a fixed-step `adjoint_method` with `adjoint_options: {{step_size: "
        f"...}}` (e.g. --model.init_args.solver.adjoint_rtol 1e-2); `failure_retries` does not help here (it "
        f"retries forward solves only); or a lower learning rate."
    )
