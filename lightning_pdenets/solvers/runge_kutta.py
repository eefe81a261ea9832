"""Explicit Runge–Kutta solvers written out by hand.

They are the ``native`` backend of :class:`~lightning_pdenets.solvers.SolverConfig`.

Why this module exists (issue 27): torchdiffeq stores the stages of a step along a new last axis and combines
them with ``torch.sum(k * coefficients, dim=-1)``, which on ODE-Net's feature maps costs about as much as the
convolutions of the vector field (1.8–2.5× the time of the NFE evaluations of f). No library reached the target
of 1.15× at both 1 and 2 threads (BENCHMARKS.md, issue 27 section: torchdiffeq has no option for it; torchode took
1.30× and 1.15×; under ``torch.compile`` it compiled for minutes per shape on a CPU). Here each stage is one
chain of ``torch.add(..., alpha=...)``/``add_`` over the stages with a nonzero coefficient, in the state's own
layout, so the solve costs little more than its evaluations of f.

What is kept from torchdiffeq, so that trained models behave the same:

* the Butcher tableaux of every solver the project offers (``rk4`` is torchdiffeq's 3/8-rule variant,
  Kutta 1901), and its fixed grid (steps of ``step_size`` from t0, the last one shortened to end at t1);
* the initial step of Hairer, Nørsett & Wanner, "Solving Ordinary Differential Equations I" (2nd ed., 1993),
  Sec. II.4, with torchdiffeq's constants, and the same step-size controller (II.4, eq. 4.13: factor
  ``min(ifactor, max(dfactor, safety · err^(-1/order)))``, with no shrinking after an accepted step), the same
  error norm (RMS of ``err / (atol + rtol · max(|y0|, |y1|))``, the maximum over the controlled tensors), and the
  same handling of ``min_step``, ``max_step`` and ``max_num_steps`` (attempts, accepted or not);
* the adjoint of Chen et al. ("Neural Ordinary Differential Equations", NeurIPS 2018) with torchdiffeq's default
  norm (the maximum of the RMS errors of y, the adjoint and each parameter gradient) or the seminorm of Kidger,
  Chen & Lyons ("Hey, that's not an ODE", ICML 2021), which leaves the parameter gradients out.

Where it differs:

* an adaptive solve steps exactly to t1 (its last step is shortened to end there) instead of stepping past t1 and
  evaluating torchdiffeq's dense-output polynomial at t1. The returned state is then the method's own solution
  (order 5 for dopri5) rather than the 4th-order interpolant.
* the first stage of a step is f(t, y) at the step's start. For the FSAL methods (``bosh3``, ``dopri5``) that is
  the previous step's last stage, as in torchdiffeq, so their accepted steps are torchdiffeq's except the last,
  which ends at t1. For ``adaptive_heun`` and ``fehlberg2``, whose last stage is not evaluated at the solution,
  torchdiffeq still reuses that last stage as the next step's f(t, y) (``rk_common._runge_kutta_step`` returns
  ``k[-1]``), which is not the method as published; here f(t1, y1) is evaluated after each accepted step (one more
  evaluation per accepted step). Their states therefore differ from torchdiffeq's from the second step on and
  their step sizes from the third, and they take more evaluations. The fixed-step methods evaluate f(t, y) at
  every step in both backends and take torchdiffeq's steps exactly.
* so an adaptive native solve evaluates f ``1 + (1 without first_step) + (s - 1) · (accepted + rejected)`` times,
  plus ``accepted`` for ``adaptive_heun`` and ``fehlberg2``, where s is the number of stages (2, 3, 4 and 7 for
  adaptive_heun, fehlberg2, bosh3 and dopri5); a fixed-step one ``s · steps``.

The control arithmetic runs in Python floats (float64), as torchdiffeq's does in float64 tensors; only the
rounding of the last bits can differ. NaN/Inf in an adaptive step ends the solve at once (SolverFailedError), where
torchdiffeq rejects a few steps and fails with "underflow in dt nan".

Methods not written out here (``dopri8``, ``explicit_adams``, ``implicit_adams``) are solved by torchdiffeq
(:data:`NATIVE_METHODS` lists the others).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from lightning_pdenets.errors import SolverFailedError

__all__ = ["NATIVE_METHODS", "TABLEAUS", "StepControl", "Tableau", "adjoint_solve", "fixed_step_count", "solve"]

State = tuple[torch.Tensor, ...]
Field = Callable[[torch.Tensor, State], State]
StepObserver = Callable[[bool, float], None]
"""Called after every step attempt with ``(accepted, dt)``."""


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge–Kutta method (Butcher tableau).

    Attributes:
        c: Nodes of stages 2..s (stage 1 is at t).
        a: Rows of the stage matrix for stages 2..s (row i has i entries).
        b: Weights of the solution; ``None`` when the last stage is evaluated at the solution (first same as last,
            FSAL: y1 is the last stage's input and f(t1, y1) the next step's first stage).
        e: Weights of the error estimate (b - b̂) over all stages; ``None`` for fixed-step methods.
        order: The exponent of the step-size controller (torchdiffeq's ``order``).
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...] | None
    e: tuple[float, ...] | None
    order: int

    @property
    def fsal(self) -> bool:
        return self.b is None


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(c=(), a=(), b=(1.0,), e=None, order=1),
    "midpoint": Tableau(c=(0.5,), a=((0.5,),), b=(0.0, 1.0), e=None, order=2),
    "heun2": Tableau(c=(1.0,), a=((1.0,),), b=(0.5, 0.5), e=None, order=2),
    "heun3": Tableau(c=(1 / 3, 2 / 3), a=((1 / 3,), (0.0, 2 / 3)), b=(0.25, 0.0, 0.75), e=None, order=3),
    # torchdiffeq's rk4 is Kutta's 3/8 rule (rk4_alt_step_func), not the classical 1/6-1/3-1/3-1/6 scheme
    "rk4": Tableau(
        c=(1 / 3, 2 / 3, 1.0),
        a=((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        b=(0.125, 0.375, 0.375, 0.125),
        e=None,
        order=4,
    ),
    "adaptive_heun": Tableau(c=(1.0,), a=((1.0,),), b=(0.5, 0.5), e=(0.5, -0.5), order=2),
    "fehlberg2": Tableau(
        c=(0.5, 1.0),
        a=((0.5,), (1 / 256, 255 / 256)),
        b=(1 / 512, 255 / 256, 1 / 512),
        e=(-1 / 512, 0.0, 1 / 512),
        order=2,
    ),
    # Bogacki & Shampine (1989), FSAL
    "bosh3": Tableau(
        c=(0.5, 0.75, 1.0),
        a=((0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
        b=None,
        e=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        order=3,
    ),
    # Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", FSAL; torchdiffeq's order 5
    "dopri5": Tableau(
        c=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        b=None,
        e=(
            35 / 384 - 1951 / 21600,
            0.0,
            500 / 1113 - 22642 / 50085,
            125 / 192 - 451 / 720,
            -2187 / 6784 - -12231 / 42400,
            11 / 84 - 649 / 6300,
            -1 / 60,
        ),
        order=5,
    ),
}
"""The methods this module integrates, by torchdiffeq's names."""

NATIVE_METHODS = tuple(TABLEAUS)
"""Solver names the native backend integrates itself; the others fall back to torchdiffeq."""


@dataclass(frozen=True)
class StepControl:
    """How one solve steps: the method and either its fixed step or its adaptive controller.

    Attributes:
        method: A key of :data:`TABLEAUS`.
        step_size: Step of a fixed-step method.
        rtol, atol: Tolerances of an adaptive method.
        first_step: Initial step (``None``: Hairer's heuristic).
        min_step, max_step: Bounds of the step (a step of ``min_step`` is accepted whatever its error).
        safety, ifactor, dfactor: The controller's safety factor and its largest and smallest step factors.
        max_num_steps: Most step attempts, accepted or rejected.
    """

    method: str
    step_size: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-3
    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    max_num_steps: int = 2**31 - 1

    def __post_init__(self) -> None:
        if self.method not in TABLEAUS:
            raise ValueError(f"the native Runge-Kutta backend integrates {list(TABLEAUS)}, not {self.method!r}.")
        if TABLEAUS[self.method].e is None and self.step_size is None:
            raise ValueError(f"fixed-step method {self.method!r} needs a step_size > 0, got None.")
        for name in ("step_size", "first_step"):
            _check_number(getattr(self, name), name, "a finite number > 0 (or None)", lambda x: 0 < x < math.inf, True)
        for name in ("rtol", "atol"):
            _check_number(getattr(self, name), name, "a finite number > 0", lambda x: 0 < x < math.inf)
        _check_number(self.min_step, "min_step", "a finite number >= 0", lambda x: 0 <= x < math.inf)
        _check_number(
            self.max_step,
            "max_step",
            f"a number >= min_step={self.min_step!r} (inf: no bound)",
            lambda x: x > 0 and x >= self.min_step,
        )
        _check_number(self.safety, "safety", "a number in (0, 1]", lambda x: 0 < x <= 1)
        _check_number(self.ifactor, "ifactor", "a finite number >= 1", lambda x: 1 <= x < math.inf)
        _check_number(self.dfactor, "dfactor", "a number in (0, 1]", lambda x: 0 < x <= 1)
        if isinstance(self.max_num_steps, bool) or not isinstance(self.max_num_steps, int) or self.max_num_steps < 1:
            raise ValueError(f"`max_num_steps` must be an integer >= 1, got {self.max_num_steps!r}.")

    @property
    def tableau(self) -> Tableau:
        return TABLEAUS[self.method]


def _check_number(
    value: object, name: str, allowed: str, inside: Callable[[float], bool], allow_none: bool = False
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number for which ``inside`` holds."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not inside(value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


# -- stage arithmetic -------------------------------------------------------------------------------
def _combine(base: State | None, stages: Sequence[State], weights: Sequence[float], dt: float) -> State:
    """``base + dt · Σ_j weights[j] · stages[j]`` per tensor of the state, skipping zero weights.

    One ``torch.add(..., alpha=)`` and then in-place ``add_`` per nonzero weight: no stacking of the stages and no
    temporaries of the state's size beyond the result (autograd handles the in-place adds, whose backward needs
    no input).
    """
    terms = [(j, dt * w) for j, w in enumerate(weights) if w != 0.0]
    out = []
    for i in range(len(stages[0])):
        first, alpha = terms[0]
        if base is None:
            value = torch.mul(stages[first][i], alpha)
        else:
            value = torch.add(base[i], stages[first][i], alpha=alpha)
        for j, alpha in terms[1:]:
            value = value.add_(stages[j][i], alpha=alpha)
        out.append(value)
    return tuple(out)


def _step(
    field: Field, tableau: Tableau, t: float, dt: float, y: State, f0: State, time: Callable[[float], torch.Tensor]
) -> tuple[State, State, list[State]]:
    """One Runge–Kutta step from (t, y) with f(t, y) = f0: returns y1, the last stage's f and all stages."""
    stages = [f0]
    y_stage = y
    for c, row in zip(tableau.c, tableau.a):
        y_stage = _combine(y, stages, row, dt)
        stages.append(field(time(t + dt if c == 1.0 else t + c * dt), y_stage))
    y1 = y_stage if tableau.b is None else _combine(y, stages, tableau.b, dt)
    return y1, stages[-1], stages


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor) / math.sqrt(max(tensor.numel(), 1))


@torch.no_grad()
def _error_ratio(
    stages: list[State],
    weights: Sequence[float],
    dt: float,
    y0_abs: State,
    y1: State,
    controlled: Sequence[int],
    rtol: float,
    atol: float,
) -> tuple[float, State]:
    """Hairer's error measure: the largest over the controlled tensors of RMS(err / (atol + rtol·max(|y0|, |y1|))).

    Returns the ratio (NaN when y1 is not finite: an infinite |y1| would make the ratio 0 and the step accepted) and
    |y1| of the controlled tensors (the next step's |y0|, when this one is accepted).
    """
    terms = [(j, dt * w) for j, w in enumerate(weights) if w != 0.0]
    norms = []
    y1_abs = []
    for index, i in enumerate(controlled):
        first, alpha = terms[0]
        error = torch.mul(stages[first][i], alpha)
        for j, alpha in terms[1:]:
            error.add_(stages[j][i], alpha=alpha)
        magnitude = y1[i].abs()
        y1_abs.append(magnitude)
        scale = torch.maximum(y0_abs[index], magnitude).mul_(rtol).add_(atol)
        norms.append(_rms(error.div_(scale)))
    finite = torch.stack([torch.isfinite(v).all() for v in y1_abs]).all()
    ratio = norms[0] if len(norms) == 1 else torch.stack(norms).max()
    return torch.where(finite, ratio, math.nan).item(), tuple(y1_abs)


@torch.no_grad()
def _initial_step(
    field: Field,
    t0: float,
    y0: State,
    f0: State,
    order: int,
    rtol: float,
    atol: float,
    controlled: Sequence[int],
    time: Callable[[float], torch.Tensor],
) -> float:
    """Hairer, Nørsett & Wanner (1993), Sec. II.4 "Starting step size", with torchdiffeq's constants (one f call)."""
    scales = [y0[i].abs().mul(rtol).add_(atol) for i in controlled]

    def norm(tensors: Sequence[torch.Tensor]) -> float:
        return max(_rms(x / s).item() for x, s in zip(tensors, scales))

    d0 = norm([y0[i] for i in controlled])
    d1 = norm([f0[i] for i in controlled])
    if not (math.isfinite(d0) and math.isfinite(d1)):
        raise _non_finite(float(time(t0)), "state" if not math.isfinite(d0) else "vector field")
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = tuple(torch.add(y, f, alpha=h0) for y, f in zip(y0, f0))
    f1 = field(time(t0 + h0), y1)
    d2 = norm([f1[i] - f0[i] for i in controlled]) / h0
    if not math.isfinite(d2):
        raise _non_finite(float(time(t0 + h0)))
    h1 = max(1e-6, h0 * 1e-3) if d1 <= 1e-15 and d2 <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1)


def _non_finite(t: float, what: str = "vector field", end: float | None = None) -> SolverFailedError:
    """The failure of a solve whose ``what`` ("vector field" or "state") turned NaN/Inf at time ``t``."""
    returned = "returned" if what == "vector field" else "held"
    step = "" if end is None else f" (in the step to t = {end:g})"
    return SolverFailedError(
        f"the {what} {returned} NaN/Inf at t = {t:g}{step}: no step size can help; look for an overflow or a "
        "division by zero in the vector field, or lower the learning rate if training made it diverge."
    )


def _next_step(dt: float, ratio: float, control: StepControl) -> float:
    """Hairer's controller as torchdiffeq applies it: never shrink after an accepted step.

    ``ratio`` must be finite: Python's ``max``/``min`` would turn a NaN into ``ifactor`` and grow the step.
    """
    if not math.isfinite(ratio):
        raise ValueError(f"the error ratio must be finite, got {ratio!r}.")
    if ratio == 0.0:
        return dt * control.ifactor
    dfactor = 1.0 if ratio < 1.0 else control.dfactor
    factor = min(control.ifactor, max(control.safety / ratio ** (1.0 / control.tableau.order), dfactor))
    return dt * factor


# -- solves -----------------------------------------------------------------------------------------
def solve(
    field: Field,
    y0: State,
    t0: float,
    t1: float,
    control: StepControl,
    controlled: Sequence[int] | None = None,
    observer: StepObserver | None = None,
) -> State:
    """Integrate dy/dt = field(t, y) from y(t0) = y0 to t1 (t1 < t0 integrates backward) and return y(t1).

    Backpropagation goes through the solver's operations when autograd records them (``torch.is_grad_enabled()``
    and a state or parameter requiring grad); see :func:`adjoint_solve` for the adjoint method.

    Args:
        field: f(t, y) on tuples of tensors (t a 0-d tensor of the state's real dtype).
        y0: The initial state, a tuple of tensors.
        t0, t1: The interval.
        control: Method and step control.
        controlled: Indices of the tensors whose error controls the step (``None``: all).
        observer: Called with ``(accepted, dt)`` after each step attempt (dt > 0 whatever the direction).

    Raises:
        RuntimeError: "underflow in dt" when an adaptive step vanishes next to t, "max_num_steps exceeded" after
            ``control.max_num_steps`` attempts (torchdiffeq's wording, which
            :func:`~lightning_pdenets.errors.is_solver_failure` recognises).
        SolverFailedError: "the vector field returned NaN/Inf at t = ..." when an adaptive step meets NaN/Inf
            (at once: torchdiffeq fails on it with "underflow in dt nan" after a few rejected steps).
        ValueError: when ``t0`` or ``t1`` is not a finite number.
    """
    if not isinstance(y0, tuple) or not y0 or not all(isinstance(y, torch.Tensor) for y in y0):
        raise TypeError(f"`y0` must be a tuple of tensors (at least one), got {type(y0).__name__}.")
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if not isinstance(control, StepControl):
        raise TypeError(f"`control` must be a StepControl, got {type(control).__name__}.")
    if t1 == t0:
        return y0
    sign = 1.0 if t1 > t0 else -1.0
    dtype = torch.empty(0, dtype=y0[0].dtype).real.dtype  # the real dtype of a complex state
    device = y0[0].device

    def time(s: float) -> torch.Tensor:
        return torch.tensor(sign * s, dtype=dtype, device=device)

    if sign > 0:
        f = field
    else:  # integrate in s = -t: dy/ds = -f(-s, y)

        def f(t: torch.Tensor, y: State) -> State:
            return tuple(-v for v in field(t, y))

    start, end = sign * t0, sign * t1
    tableau = control.tableau
    if tableau.e is None:
        return _solve_fixed(f, y0, start, end, control, observer, time)
    return _solve_adaptive(
        f, y0, start, end, control, tuple(range(len(y0))) if controlled is None else tuple(controlled), observer, time
    )


def fixed_step_count(start: float, end: float, step_size: float) -> int:
    """Steps of ``step_size`` from ``start`` to ``end`` on torchdiffeq's fixed grid, the last one possibly shorter.

    A span within 1e-9 steps of a whole number of steps counts as that number, so rounding in ``end - start``
    never adds a sliver of a step.

    Raises:
        ValueError: when the count is not finite (a step so small that ``(end - start) / step_size`` overflows).
    """
    steps = (end - start) / step_size - 1e-9
    if not math.isfinite(steps):
        raise ValueError(f"step_size={step_size!r} over [{start}, {end}] gives no finite number of steps.")
    return math.ceil(steps)


def _solve_fixed(
    field: Field,
    y: State,
    start: float,
    end: float,
    control: StepControl,
    observer: StepObserver | None,
    time: Callable[[float], torch.Tensor],
) -> State:
    """torchdiffeq's grid: steps of ``step_size`` from ``start``, the last one ending at ``end``."""
    tableau = control.tableau
    h = cast(float, control.step_size)  # StepControl checks that a fixed-step method has one
    num_steps = max(1, fixed_step_count(start, end, h))
    for n in range(num_steps):
        t = start + n * h
        dt = (end if n == num_steps - 1 else start + (n + 1) * h) - t
        y, _, _ = _step(field, tableau, t, dt, y, field(time(t), y), time)
        if observer is not None:
            observer(True, dt)
    return y


def _solve_adaptive(
    field: Field,
    y: State,
    start: float,
    end: float,
    control: StepControl,
    controlled: tuple[int, ...],
    observer: StepObserver | None,
    time: Callable[[float], torch.Tensor],
) -> State:
    tableau = control.tableau
    error_weights = cast(tuple[float, ...], tableau.e)  # solve() steps adaptively only with an error estimate
    rtol, atol = control.rtol, control.atol
    t = start
    f = field(time(t), y)
    if control.first_step is None:
        dt = _initial_step(field, t, y, f, tableau.order, rtol, atol, controlled, time)
    else:
        dt = control.first_step
    with torch.no_grad():
        y_abs = tuple(y[i].abs() for i in controlled)
    attempts = 0
    while t < end:
        if attempts >= control.max_num_steps:
            raise RuntimeError(f"max_num_steps exceeded ({attempts}>={control.max_num_steps})")
        attempts += 1
        if not math.isfinite(dt):
            dt = control.min_step
        dt = min(max(dt, control.min_step), control.max_step)
        if not t + dt > t:
            raise RuntimeError(f"underflow in dt {dt}")
        last = t + dt >= end
        step = end - t if last else dt  # step exactly to the end (torchdiffeq steps past it and interpolates)
        y1, f1, stages = _step(field, tableau, t, step, y, f, time)
        ratio, y1_abs = _error_ratio(stages, error_weights, step, y_abs, y1, controlled, rtol, atol)
        if not math.isfinite(ratio):  # NaN/Inf in y1 or in the stages: a smaller step cannot remove it
            raise _non_finite(float(time(t)), end=float(time(t + step)))
        accepted = ratio <= 1.0 or step <= control.min_step
        if observer is not None:
            observer(accepted, step)
        if accepted:
            t = end if last else t + step
            y, y_abs = y1, y1_abs
            f = f1 if tableau.b is None else field(time(t), y)
        dt = min(max(_next_step(step, ratio, control), control.min_step), control.max_step)
    return y


# -- adjoint ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdjointPlan:
    """Everything one adjoint solve needs besides its tensors.

    Attributes:
        field: f(t, y) on tuples of tensors.
        t0, t1: The interval of the forward solve.
        forward: Step control of the forward solve.
        backward: Step control of the backward (adjoint) solve.
        controlled: Indices of the state tensors whose error controls the steps (both solves).
        seminorm: Leave the parameter gradients out of the backward error (Kidger, Chen & Lyons 2021).
        forward_observer, backward_observer: Step observers of the two solves.
    """

    field: Field
    t0: float
    t1: float
    forward: StepControl
    backward: StepControl
    controlled: tuple[int, ...] | None = None
    seminorm: bool = False
    forward_observer: StepObserver | None = None
    backward_observer: StepObserver | None = None


class _AdjointSolve(torch.autograd.Function):
    """y(t1) in forward without recording a graph; in backward, the adjoint ODE solved from t1 back to t0."""

    @staticmethod
    def forward(ctx, plan: AdjointPlan, num_states: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y0 = tuple(tensors[:num_states])
        with torch.no_grad():
            y1 = solve(plan.field, y0, plan.t0, plan.t1, plan.forward, plan.controlled, plan.forward_observer)
        ctx.plan, ctx.num_states = plan, num_states
        ctx.save_for_backward(*y1, *tensors[num_states:])
        return tuple(v.clone() if any(v is y for y in y0) else v for v in y1)

    @staticmethod
    def backward(ctx, *grad_y1: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: AdjointPlan = ctx.plan
        m = ctx.num_states
        saved = ctx.saved_tensors
        y1, params = tuple(saved[:m]), tuple(saved[m:])
        grads = tuple(torch.zeros_like(y) if g is None else g for g, y in zip(grad_y1, y1))

        def augmented(t: torch.Tensor, state: State) -> State:
            y, adj = state[:m], state[m : 2 * m]
            with torch.enable_grad():
                y = tuple(v.detach().requires_grad_(True) for v in y)
                out = plan.field(t, y)
                pairs = [(o, -a) for o, a in zip(out, adj) if o.requires_grad]  # e.g. RNODE's zero Jacobian term
                vjps = (
                    torch.autograd.grad([o for o, _ in pairs], y + params, [a for _, a in pairs], allow_unused=True)
                    if pairs
                    else (None,) * (m + len(params))
                )
            vjps = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(vjps, y + params))
            return tuple(v.detach() for v in out) + vjps

        controlled = tuple(range(m)) if plan.controlled is None else plan.controlled
        aug_controlled = controlled + tuple(m + i for i in controlled)
        if not plan.seminorm:
            aug_controlled += tuple(range(2 * m, 2 * m + len(params)))
        state0 = y1 + grads + tuple(torch.zeros_like(p) for p in params)
        with torch.no_grad():
            state = solve(augmented, state0, plan.t1, plan.t0, plan.backward, aug_controlled, plan.backward_observer)
        return (None, None, *state[m : 2 * m], *state[2 * m :])


def adjoint_solve(plan: AdjointPlan, y0: State, params: Sequence[torch.Tensor]) -> State:
    """y(t1) with gradients by the adjoint method (O(1) memory in the number of steps).

    Chen et al. (2018): the backward pass integrates (y, a = ∂L/∂y, g = ∂L/∂θ) from t1 to t0 with
    da/dt = -aᵀ ∂f/∂y and dg/dt = -aᵀ ∂f/∂θ, recomputing y backward from y(t1).

    Args:
        plan: The field, interval and step controls.
        y0: The initial state, a tuple of tensors.
        params: The parameters of the field that receive gradients (those requiring grad).
    """
    params = tuple(p for p in params if p.requires_grad)
    return _AdjointSolve.apply(plan, len(y0), *y0, *params)
