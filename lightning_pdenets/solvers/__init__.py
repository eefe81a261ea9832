"""How an ODE is integrated: the solver catalogue and :class:`SolverConfig`, the one solver configuration.

The names are torchdiffeq's; this module adds what the callbacks need to reason about solvers
(order of accuracy, fixed step or adaptive), and one frozen configuration type in the spirit of
diffrax, where solver, step-size control and adjoint are separate concepts of one description.
Every layer uses it: :class:`~lightning_pdenets.blocks.ODEBlock` integrates with it, architectures
take a :class:`SolverConfig`, and LightningModules take the same fields as one primitive dict
(:data:`SolverOptions`), written in YAML as ``solver: {method: rk4, step_size: 0.25}`` and on the
command line as ``--model.init_args.solver.min_step 1e-4``. Adding a solver setting means adding a
field to :class:`SolverConfig` (and, if torchdiffeq needs it, one line in :meth:`SolverConfig.odeint_kwargs`):
the YAML and command-line forms follow from the field list.

Two backends integrate: ``native`` (the default), the explicit Runge–Kutta loops of
:mod:`lightning_pdenets.solvers.runge_kutta`, and ``torchdiffeq``, the reference (``solver: {backend:
torchdiffeq}``). Methods that the native backend does not write out (:data:`TORCHDIFFEQ_ONLY`) are solved by
torchdiffeq under either backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypedDict, cast, get_type_hints

from lightning_pdenets._compat.torchdiffeq import solver_names
from lightning_pdenets.solvers.runge_kutta import NATIVE_METHODS, StepControl, fixed_step_count
from lightning_pdenets.validation import check_positive, check_positive_int, check_setting_names

__all__ = [
    "ADAPTIVE_SOLVERS",
    "BACKENDS",
    "FIXED_STEP_SOLVERS",
    "SOLVERS",
    "TORCHDIFFEQ_ONLY",
    "SolverConfig",
    "SolverInfo",
    "SolverOptions",
    "check_solver_name",
    "fixed_step_count",
]


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

_missing = set(SOLVERS) - (solver_names() or set(SOLVERS))  # None: table moved, odeint names a bad method
if _missing:  # pragma: no cover - guards against a torchdiffeq release renaming solvers
    raise ImportError(f"the installed torchdiffeq lacks solvers {sorted(_missing)}; install torchdiffeq>=0.2.3")

BACKENDS = ("native", "torchdiffeq")
"""Values of :attr:`SolverConfig.backend`: the hand-written Runge–Kutta loops, or torchdiffeq (the reference)."""

TORCHDIFFEQ_ONLY = tuple(name for name in SOLVERS if name not in NATIVE_METHODS)
"""Methods the native backend leaves to torchdiffeq (``dopri8`` and the Adams methods)."""

STEP_SETTING_NAMES = (
    "step_size",
    "max_num_steps",
    "min_step",
    "max_step",
    "first_step",
    "safety",
    "ifactor",
    "dfactor",
)
"""Fields of :class:`SolverConfig` that set how one solve steps (torchdiffeq's solver options)."""

ADJOINT_OPTION_NAMES = ("norm", *STEP_SETTING_NAMES)
"""Keys allowed in :attr:`SolverConfig.adjoint_options` (torchdiffeq's solver options, and ``norm``)."""


EXPLICIT_ADAMS_MAX_ORDER = 5
"""torchdiffeq's ``max_order`` for ``explicit_adams``: its Adams–Bashforth formula uses ``max_order - 1`` past values,
so 5 is the 4-step, 4th-order method of :data:`SOLVERS` (its default, 12, raises the order to 11 with a stability
region so small that a step of 0.01 on y' = -y diverges)."""


HUTCHINSON_NOISES = ("gaussian", "rademacher")
"""Probe distributions of the Hutchinson estimator of RNODE's Jacobian term (:attr:`SolverConfig.hutchinson_noise`)."""


def check_solver_name(method: Any, argument: str = "method") -> SolverInfo:
    """Return the :class:`SolverInfo` for ``method`` or raise a ``ValueError`` listing the valid names."""
    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(
            f"`{argument}` must be one of {sorted(SOLVERS)} (fixed step: {list(FIXED_STEP_SOLVERS)}; "
            f"adaptive: {list(ADAPTIVE_SOLVERS)}), got {method!r}."
        )
    return SOLVERS[method]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_in(value: Any, argument: str, interval: str, inside: Callable[[float], bool]) -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``value`` is a finite number for which ``inside`` holds.

    Args:
        value: The setting's value.
        argument: Its name in the message.
        interval: The allowed values as the message writes them, e.g. ``(0, 1]``.
        inside: The test of that interval, e.g. ``lambda x: 0 < x <= 1``.
    """
    if not _is_number(value) or not math.isfinite(value) or not inside(value):
        raise ValueError(f"`{argument}` must be a number in {interval}, got {value!r}.")


_ARGUMENT: ContextVar[str] = ContextVar("solver_config_argument", default="solver")
"""Name of the configuration in the messages of :meth:`SolverConfig.__post_init__` (set by ``from_options``)."""


@contextmanager
def _argument_name(argument: str) -> Iterator[None]:
    token = _ARGUMENT.set(argument)
    try:
        yield
    finally:
        _ARGUMENT.reset(token)


def _step_count_text(steps: float) -> str:
    """A step count for a message: exact up to a million, else in scientific notation (never 300 digits)."""
    if steps < 1e6:
        return f"{int(steps)}"
    return f"about {steps:.1e}" if math.isfinite(steps) else "more than 1e308"


@dataclass(frozen=True)
class SolverConfig:
    """How an ODE block integrates dy/dt = f(t, y) on [t0, t1] (torchdiffeq's ``odeint``/``odeint_adjoint``).

    Every field can be changed at run time (``block.configure_solver(**changes)``) and is stored with the
    block's weights. Fields that do not apply to the chosen method (``step_size`` for an adaptive
    solver, the step-size controller for a fixed-step one) are ignored.

    Attributes:
        method: torchdiffeq solver name (see :data:`SOLVERS`).
        step_size: Step of fixed-step solvers.
        rtol: Relative tolerance of adaptive solvers.
        atol: Absolute tolerance of adaptive solvers.
        t0: Start of the integration interval (a finite number).
        t1: End of the integration interval (a finite number > t0).
        max_num_steps: Upper bound on solver steps (adaptive solvers stop with an error past it).
        min_step: Smallest step an adaptive solver may take; with ``min_step > 0`` it accepts steps of that size
            instead of failing with "underflow in dt"; at most ``max_step``.
        max_step: Largest step an adaptive solver may take (``None``: no bound).
        first_step: Initial step of an adaptive solver (``None``: torchdiffeq's heuristic).
        safety: Safety factor of the step-size controller, in (0, 1].
        ifactor: Largest factor by which the controller grows a step, >= 1.
        dfactor: Smallest factor by which the controller shrinks a rejected step, in (0, 1].
        adjoint: Backpropagate with the adjoint method (O(1) memory in time) instead of through the solver.
        adjoint_method: Solver of the adjoint (backward) solve; ``None``: the same as ``method``.
        adjoint_rtol: Relative tolerance of the adjoint solve; ``None``: ``rtol``.
        adjoint_atol: Absolute tolerance of the adjoint solve; ``None``: ``atol``.
        adjoint_options: Options of the adjoint solve, over those of the forward solve (keys
            :data:`ADJOINT_OPTION_NAMES`, each value checked as its field is); ``{norm: seminorm}`` is the
            seminorm adjoint of Kidger, Chen & Lyons ("Hey, that's not an ODE", ICML 2021), which skips the
            parameter-gradient channels in the error estimate and so takes fewer backward steps.
        failure_retries: On a solver failure ("underflow in dt", too many steps) in the forward pass, loosen
            ``rtol`` and ``atol`` by ``failure_tol_factor`` and retry, at most this many times in a row (0: fail at
            once). The loosened tolerances are kept, so they show in :meth:`as_options` and in checkpoints.
        failure_tol_factor: Factor > 1 applied to ``rtol`` and ``atol`` at each retry.
        failure_max_tol: Cap of the loosened ``rtol`` and ``atol``; retries stop once ``rtol`` has reached it.
        kinetic_weight: Weight λ_K of the kinetic energy ∫‖f(t, y)‖² dt of RNODE (Finlay, Jacobsen, Nurbekyan &
            Oberman, "How to train your neural ODE", ICML 2020); 0: off. Integrated along the solve in training
            (``block.training`` with gradients enabled) and added to the training loss (see
            :meth:`ODEBlock.pop_regularization <lightning_pdenets.blocks.ODEBlock.pop_regularization>`).
        jacobian_weight: Weight λ_J of RNODE's Jacobian term ∫‖∂f/∂y‖²_F dt, estimated with Hutchinson's
            estimator; 0: off.
        hutchinson_noise: Distribution of the Hutchinson probe ε (one draw per solve): ``gaussian`` (the paper's)
            or ``rademacher`` (±1, lower variance).
        backend: ``native`` (the explicit Runge–Kutta loops of :mod:`~lightning_pdenets.solvers.runge_kutta`, 2×
            faster on ODE-Net; methods in :data:`TORCHDIFFEQ_ONLY` still go to torchdiffeq) or ``torchdiffeq`` (the
            reference). Checkpoints written before this field existed load with the default.
    """

    method: str = "dopri5"
    step_size: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-3
    t0: float = 0.0
    t1: float = 1.0
    max_num_steps: int = 1000
    min_step: float = 0.0
    max_step: float | None = None
    first_step: float | None = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    adjoint: bool = False
    adjoint_method: str | None = None
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    adjoint_options: dict | None = None
    failure_retries: int = 0
    failure_tol_factor: float = 2.0
    failure_max_tol: float = 1.0
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    hutchinson_noise: str = "gaussian"
    backend: str = "native"

    # -- construction ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # every instance is valid, however it was built (directly, from a dict, or by replace), and is checked once
        self.validate(_ARGUMENT.get())

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every setting, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(
        cls,
        options: SolverConfig | Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        argument: str = "solver",
    ) -> SolverConfig:
        """Build and validate a configuration from a dict of settings over ``defaults``.

        Args:
            options: A :class:`SolverConfig` (returned as it is: it holds every field and was validated when it was
                built), a mapping of some of its
                fields (the YAML/command-line form), or ``None`` for the defaults alone.
            defaults: Settings that ``options`` overrides (e.g. a model's ``{method: dopri5, adjoint: true}``).
            argument: Name used in error messages.

        Raises:
            TypeError: when ``options`` is not a mapping.
            ValueError: on an unknown setting (with the closest valid names) or an invalid value.
        """
        if isinstance(options, SolverConfig):
            return options  # validated by __post_init__: taken as it is, over no defaults
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(
                f"`{argument}` must be a mapping of solver settings such as {{'method': 'rk4', 'step_size': 0.25}}, "
                f"got {type(options).__name__}."
            )
        merged = {**(defaults or {}), **(options or {})}
        cls._check_names(merged, argument)
        with _argument_name(argument):
            return cls(**merged)

    @classmethod
    def _check_names(cls, settings: Mapping[str, Any], argument: str) -> None:
        check_setting_names(settings, cls.field_names(), argument)

    def replace(self, argument: str = "solver", **changes: Any) -> SolverConfig:
        """A validated copy with ``changes`` applied (unknown names list the valid ones)."""
        self._check_names(changes, argument)
        with _argument_name(argument):
            return dataclasses.replace(self, **changes)

    def as_options(self) -> dict[str, Any]:
        """Every field as a plain dict (what models store as hyperparameters and blocks in checkpoints)."""
        options = dataclasses.asdict(self)
        if options["adjoint_options"] is not None:
            options["adjoint_options"] = dict(options["adjoint_options"])
        return options

    # -- facts ----------------------------------------------------------------------------------
    @property
    def is_adaptive(self) -> bool:
        """Whether ``method`` controls its step size from an error estimate."""
        return SOLVERS[self.method].adaptive

    @property
    def num_fixed_steps(self) -> int:
        """Number of steps a fixed-step solver takes over [t0, t1]."""
        return fixed_step_count(self.t0, self.t1, cast(float, self.step_size))

    @property
    def is_regularized(self) -> bool:
        """Whether a RNODE term (kinetic energy or Jacobian norm) has a weight > 0."""
        return self.kinetic_weight > 0 or self.jacobian_weight > 0

    def describe(self) -> str:
        """A short summary, e.g. ``rk4, step_size=0.25`` or ``dopri5, rtol=0.001, atol=0.001, adjoint``."""
        if self.is_adaptive:
            text = f"{self.method}, rtol={self.rtol:g}, atol={self.atol:g}"
            for name, value in (("first_step", self.first_step), ("max_step", self.max_step)):
                if value is not None:
                    text += f", {name}={value:g}"
        else:
            text = f"{self.method}, step_size={self.step_size:g}"
        if self.adjoint:
            norm = (self.adjoint_options or {}).get("norm")
            text += ", adjoint" + (f" ({norm})" if norm else "")
        if self.is_regularized:
            text += f", RNODE (kinetic {self.kinetic_weight:g}, jacobian {self.jacobian_weight:g})"
        if self.backend != "native":
            text += f", {self.backend}"
        return text

    # -- validation -----------------------------------------------------------------------------
    def validate(self, argument: str = "solver") -> SolverConfig:
        """Raise ``ValueError`` naming the bad field; return ``self`` when all fields are valid.

        Construction calls it (every instance is valid), so callers need not.
        """
        info = check_solver_name(self.method, f"{argument}.method")
        for name in ("rtol", "atol"):
            check_positive(getattr(self, name), f"{argument}.{name}")
        for name in ("adjoint_rtol", "adjoint_atol"):
            check_positive(getattr(self, name), f"{argument}.{name}", allow_none=True)
        if not isinstance(self.adjoint, bool):
            raise ValueError(f"`{argument}.adjoint` must be true or false, got {self.adjoint!r}.")
        for name in ("t0", "t1"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"`{argument}.{name}` must be a finite number, got {value!r}.")
        if not self.t1 > self.t0:
            raise ValueError(
                f"the integration interval needs numbers t1 > t0, got {argument}.t0={self.t0!r}, "
                f"{argument}.t1={self.t1!r}."
            )
        self._check_step_settings(argument, self.method)
        if self.adjoint_method is not None:
            adjoint_info = check_solver_name(self.adjoint_method, f"{argument}.adjoint_method")
            step = (self.adjoint_options or {}).get("step_size", self.step_size)
            if self.adjoint and not adjoint_info.adaptive and step is None:
                raise ValueError(
                    f"fixed-step `{argument}.adjoint_method` {self.adjoint_method!r} needs a step size: set "
                    f"`{argument}.adjoint_options: {{step_size: ...}}` (or `{argument}.step_size`)."
                )
        self._validate_adjoint_options(argument)
        if self.adjoint or self.adjoint_options:  # the backward solve's steps: the fields under adjoint_options
            self._check_step_settings(argument, self.adjoint_method or self.method, self.adjoint_options)
        check_positive_int(self.failure_retries, f"{argument}.failure_retries", minimum=0)
        if not _is_number(self.failure_tol_factor) or not self.failure_tol_factor > 1:
            raise ValueError(f"`{argument}.failure_tol_factor` must be a number > 1, got {self.failure_tol_factor!r}.")
        check_positive(self.failure_max_tol, f"{argument}.failure_max_tol")
        for name in ("kinetic_weight", "jacobian_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"`{argument}.{name}` must be a finite number >= 0 (0 turns the term off), got {value!r}."
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"`{argument}.backend` must be one of {list(BACKENDS)}, got {self.backend!r}.")
        if self.hutchinson_noise not in HUTCHINSON_NOISES:
            raise ValueError(
                f"`{argument}.hutchinson_noise` must be one of {list(HUTCHINSON_NOISES)}, "
                f"got {self.hutchinson_noise!r}."
            )
        if not info.adaptive and self.step_size is None:
            raise ValueError(
                f"fixed-step solver {self.method!r} needs `{argument}.step_size` (e.g. step_size: "
                f"{(self.t1 - self.t0) / 10:g}); or choose an adaptive method such as 'dopri5'."
            )
        return self

    def _check_step_settings(self, argument: str, method: str, overrides: Mapping[str, Any] | None = None) -> None:
        """Check the step settings (:data:`STEP_SETTING_NAMES`) of one solve; t0 < t1 must be valid already.

        The same checks serve the forward solve and, with ``overrides`` (:attr:`adjoint_options`) over the fields,
        the adjoint's. Each message names where its value came from: ``solver.<name>``, or
        ``solver.adjoint_options.<name>`` for an override.

        Args:
            argument: Name of the configuration in messages (``solver``).
            method: The solve's method (a fixed-step one must fit ``max_num_steps`` steps of ``step_size``).
            overrides: Settings that replace the fields of the same name.
        """
        overrides = {name: value for name, value in (overrides or {}).items() if name in STEP_SETTING_NAMES}
        value = {name: overrides.get(name, getattr(self, name)) for name in STEP_SETTING_NAMES}
        where = {
            name: f"{argument}.adjoint_options.{name}" if name in overrides else f"{argument}.{name}"
            for name in STEP_SETTING_NAMES
        }
        for name in ("step_size", "max_step", "first_step"):
            check_positive(value[name], where[name], allow_none=True)
        check_positive_int(value["max_num_steps"], where["max_num_steps"])
        span = self.t1 - self.t0
        _check_in(value["min_step"], where["min_step"], "[0, t1 - t0)", lambda x: 0 <= x < span)
        if value["max_step"] is not None and value["min_step"] > value["max_step"]:
            raise ValueError(
                f"`{where['min_step']}`={value['min_step']!r} must be <= `{where['max_step']}`={value['max_step']!r}."
            )
        # torchdiffeq's controller scales a step by min(ifactor, max(safety / error^(1/order), dfactor)) (dfactor
        # only after a rejected step): safety > 1 or dfactor > 1 can grow a rejected step, ifactor < 1 shrinks every
        # accepted one, and the solve ends in "max_num_steps exceeded" or "underflow in dt" for no fault of the ODE.
        _check_in(value["safety"], where["safety"], "(0, 1]", lambda x: 0 < x <= 1)
        _check_in(value["ifactor"], where["ifactor"], "[1, inf)", lambda x: x >= 1)
        _check_in(value["dfactor"], where["dfactor"], "(0, 1]", lambda x: 0 < x <= 1)
        # a fixed step, or the largest step of an adaptive solve, bounds the number of steps from below
        name = "max_step" if SOLVERS[method].adaptive else "step_size"
        step = value[name]
        if step is None:
            return
        steps = span / step  # inf for a subnormal step, and fixed_step_count's int can have hundreds of digits
        count = fixed_step_count(self.t0, self.t1, step) if math.isfinite(steps) else steps
        if count > value["max_num_steps"]:
            raise ValueError(
                f"`{where[name]}`={step!r} needs {'at least ' if name == 'max_step' else ''}"
                f"{_step_count_text(count)} steps over [{self.t0}, {self.t1}], more than "
                f"`{where['max_num_steps']}`={value['max_num_steps']}; raise max_num_steps or use a larger {name}."
            )

    def _validate_adjoint_options(self, argument: str) -> None:
        options = self.adjoint_options
        if options is None:
            return
        if not isinstance(options, Mapping):
            raise ValueError(
                f"`{argument}.adjoint_options` must be a mapping such as {{norm: seminorm}}, got {options!r}."
            )
        unknown = sorted(set(options) - set(ADJOINT_OPTION_NAMES))
        if unknown:
            raise ValueError(
                f"unknown `{argument}.adjoint_options` key(s) {unknown}; valid keys are {list(ADJOINT_OPTION_NAMES)}."
            )
        if "norm" in options and options["norm"] != "seminorm":
            raise ValueError(
                f"`{argument}.adjoint_options.norm` must be 'seminorm' (or left out for the default norm), "
                f"got {options['norm']!r}."
            )

    # -- native backend --------------------------------------------------------------------------
    @property
    def uses_native(self) -> bool:
        """Whether the native backend integrates both solves (forward, and the adjoint's backward if any)."""
        if self.backend != "native" or self.method not in NATIVE_METHODS:
            return False
        return not self.adjoint or (self.adjoint_method or self.method) in NATIVE_METHODS

    def step_control(self, backward: bool = False) -> StepControl:
        """The :class:`~lightning_pdenets.solvers.runge_kutta.StepControl` of the forward or the adjoint solve."""
        if not backward:
            method, rtol, atol, overrides = self.method, self.rtol, self.atol, {}
        else:
            method = self.adjoint_method or self.method
            rtol = self.adjoint_rtol if self.adjoint_rtol is not None else self.rtol
            atol = self.adjoint_atol if self.adjoint_atol is not None else self.atol
            overrides = {k: v for k, v in (self.adjoint_options or {}).items() if k != "norm"}
        settings: dict[str, Any] = dict(
            step_size=self.step_size,
            first_step=self.first_step,
            min_step=self.min_step,
            max_step=math.inf if self.max_step is None else self.max_step,
            safety=self.safety,
            ifactor=self.ifactor,
            dfactor=self.dfactor,
            max_num_steps=self.max_num_steps,
        )
        settings.update(overrides)
        if settings["max_step"] is None:
            settings["max_step"] = math.inf
        if SOLVERS[method].adaptive:
            settings["step_size"] = None
        return StepControl(method=method, rtol=rtol, atol=atol, **settings)

    # -- torchdiffeq ----------------------------------------------------------------------------
    def step_options(self, method: str) -> dict[str, Any]:
        """torchdiffeq's ``options`` for ``method``: the step size, or the adaptive step-size controller.

        A fixed step larger than the interval is cut to it (one step, as the native backend takes): torchdiffeq's
        grid fails on it with a bare ``AssertionError``.
        """
        if not SOLVERS[method].adaptive:
            options: dict[str, Any] = {"step_size": self._fixed_step(self.step_size)}
            if method == "explicit_adams":
                options["max_order"] = EXPLICIT_ADAMS_MAX_ORDER
            return options
        options = {
            "max_num_steps": self.max_num_steps,
            "min_step": self.min_step,
            "safety": self.safety,
            "ifactor": self.ifactor,
            "dfactor": self.dfactor,
        }
        if self.max_step is not None:
            options["max_step"] = self.max_step
        if self.first_step is not None:
            options["first_step"] = self.first_step
        return options

    def _fixed_step(self, step: float | None) -> float | None:
        return None if step is None else min(step, self.t1 - self.t0)

    def odeint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torchdiffeq.odeint`` (and of ``odeint_adjoint`` with :attr:`adjoint`)."""
        kwargs: dict[str, Any] = dict(
            rtol=self.rtol, atol=self.atol, method=self.method, options=self.step_options(self.method)
        )
        if self.adjoint:
            adjoint_method = self.adjoint_method or self.method
            adjoint_options = self.step_options(adjoint_method)
            adjoint_options.update(self.adjoint_options or {})
            if "max_step" in adjoint_options and adjoint_options["max_step"] is None:
                del adjoint_options["max_step"]  # no bound, as step_options leaves it (torchdiffeq takes no None)
            if "step_size" in adjoint_options:
                adjoint_options["step_size"] = self._fixed_step(adjoint_options["step_size"])
            kwargs.update(
                adjoint_method=adjoint_method,
                adjoint_rtol=self.adjoint_rtol if self.adjoint_rtol is not None else self.rtol,
                adjoint_atol=self.adjoint_atol if self.adjoint_atol is not None else self.atol,
                adjoint_options=adjoint_options,
            )
        return kwargs


SolverOptions = TypedDict(  # type: ignore[misc]  # built from the dataclass so that a new field needs no second list
    "SolverOptions", get_type_hints(SolverConfig), total=False
)
"""The YAML/command-line form of :class:`SolverConfig`: a dict of some of its fields (each optional)."""
