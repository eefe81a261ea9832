"""Hostile solver settings stop at construction with one short line naming the setting, not deep in a solve."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_pdenets.blocks import ODEBlock
from lightning_pdenets.solvers import SolverConfig, fixed_step_count
from tests.test_solver_config import Decay


def _refused(settings: dict, message: str, error: type[Exception] = ValueError) -> str:
    """Assert that ``settings`` fail with ``error`` whose message contains ``message``; return the message."""
    with pytest.raises(error, match=re.escape(message)) as info:
        SolverConfig.from_options(settings)
    return str(info.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        # ifactor < 1 shrinks every accepted step: "underflow in dt" (torchdiffeq blames the tolerance)
        (dict(ifactor=0.5), "`solver.ifactor` must be a number in [1, inf), got 0.5."),
        # safety > 1 grows a barely rejected step: "max_num_steps exceeded"
        (dict(safety=5.0), "`solver.safety` must be a number in (0, 1], got 5.0."),
        (dict(safety=0.0), "`solver.safety` must be a number in (0, 1], got 0.0."),
        (dict(dfactor=5.0), "`solver.dfactor` must be a number in (0, 1], got 5.0."),
        (dict(ifactor=float("inf")), "`solver.ifactor` must be a number in [1, inf), got inf."),
        (dict(min_step=0.5, max_step=0.1), "`solver.min_step`=0.5 must be <= `solver.max_step`=0.1."),
    ],
)
def test_step_size_controller_settings_outside_their_range_are_refused(settings: dict, message: str) -> None:
    _refused(settings, message)


def test_step_size_controller_range_ends_and_defaults_are_valid() -> None:
    SolverConfig()  # safety 0.9, ifactor 10, dfactor 0.2
    SolverConfig(safety=1.0, ifactor=1.0, dfactor=1.0, min_step=0.1, max_step=0.1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"safety": -1.0}, "`solver.adjoint_options.safety` must be a number in (0, 1], got -1.0."),
        ({"min_step": -2.0}, "`solver.adjoint_options.min_step` must be a number in [0, t1 - t0), got -2.0."),
        ({"step_size": -1.0}, "`solver.adjoint_options.step_size` must be a finite number > 0, got -1.0."),
        ({"max_num_steps": 0}, "`solver.adjoint_options.max_num_steps` must be an integer >= 1, got 0."),
        ({"ifactor": 0.5}, "`solver.adjoint_options.ifactor` must be a number in [1, inf), got 0.5."),
        ({"max_step": 0.0}, "`solver.adjoint_options.max_step` must be a finite number > 0, got 0.0."),
        ({"min_step": 0.5}, "`solver.adjoint_options.min_step`=0.5 must be <= `solver.max_step`=0.1."),
    ],
)
def test_adjoint_option_values_are_checked_like_the_forward_settings(options: dict, message: str) -> None:
    _refused(dict(adjoint=True, max_step=0.1, adjoint_options=options), message)


def test_fixed_step_adjoint_options_are_checked_for_the_adjoint_method() -> None:
    fixed = dict(method="dopri5", adjoint=True, adjoint_method="rk4")
    _refused(
        {**fixed, "adjoint_options": {"step_size": "0.1"}},
        "`solver.adjoint_options.step_size` must be a finite number > 0, got '0.1'.",
    )  # was "'>' not supported between 'str' and 'int'" in the backward pass
    _refused(
        {**fixed, "adjoint_options": {"step_size": 1e-4}},
        "`solver.adjoint_options.step_size`=0.0001 needs 10000 steps over [0.0, 1.0], more than "
        "`solver.max_num_steps`=1000",
    )
    _refused(
        {**fixed, "adjoint_options": {"step_size": 0.25, "max_num_steps": 2}},
        "`solver.adjoint_options.step_size`=0.25 needs 4 steps over [0.0, 1.0], more than "
        "`solver.adjoint_options.max_num_steps`=2",
    )
    SolverConfig.from_options({**fixed, "adjoint_options": {"step_size": 0.25, "max_num_steps": 4}})


@pytest.mark.parametrize("backend", ["native", "torchdiffeq"])
def test_adjoint_max_step_none_lifts_the_forward_bound_on_both_backends(backend: str) -> None:
    config = SolverConfig(adjoint=True, max_step=0.3, adjoint_options={"max_step": None}, backend=backend)
    assert "max_step" not in config.odeint_kwargs()["adjoint_options"]  # torchdiffeq takes no None
    block = ODEBlock(Decay(), config)
    block(torch.ones(2, dtype=torch.float64)).sum().backward()
    assert block.field.rate.grad is not None


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(t1=float("inf")), "`solver.t1` must be a finite number, got inf."),
        (dict(t0=float("-inf")), "`solver.t0` must be a finite number, got -inf."),
        (dict(t0=float("nan")), "`solver.t0` must be a finite number, got nan."),
        (dict(method="rk4", step_size=0.25, t1=float("nan")), "`solver.t1` must be a finite number, got nan."),
        (dict(t1="1.0"), "`solver.t1` must be a finite number, got '1.0'."),
    ],
)
def test_interval_ends_must_be_finite_numbers(settings: dict, message: str) -> None:
    _refused(settings, message)


@pytest.mark.parametrize(
    "step_size, count", [(1e-300, "about 1.0e+300"), (1e-320, "more than 1e308")]
)  # 1e-320 is subnormal: (t1 - t0) / step_size is inf
def test_tiny_fixed_step_is_refused_in_one_short_line(step_size: float, count: str) -> None:
    message = _refused(
        dict(method="rk4", step_size=step_size),
        f"`solver.step_size`={step_size!r} needs {count} steps over [0.0, 1.0], more than `solver.max_num_steps`=1000",
    )
    assert len(message) < 200 and "\n" not in message


def test_fixed_step_count_refuses_a_step_with_no_finite_count() -> None:
    assert fixed_step_count(0.0, 1.0, 0.25) == 4
    with pytest.raises(ValueError, match=r"step_size=1e-320 over \[0.0, 1.0\] gives no finite number of steps"):
        fixed_step_count(0.0, 1.0, 1e-320)
