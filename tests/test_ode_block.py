"""ODEBlock against closed-form solutions, gradient references, NFE counts and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_pdenets.blocks import ODEBlock
from lightning_pdenets.errors import SolverFailedError
from lightning_pdenets.protocols import ODESolverBlock, find_ode_blocks
from lightning_pdenets.solvers import SOLVERS


class LinearField(nn.Module):
    """dy/dt = a·y, solution y(t) = y0·exp(a t)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(rate, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rate * y


class TimeField(nn.Module):
    """dy/dt = cos(t)·y, solution y(t) = y0·exp(sin t): checks that t reaches the field."""

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(t) * y


@pytest.mark.parametrize(
    "settings, tolerance",
    [
        (dict(method="rk4", step_size=0.05), 1e-7),
        (dict(method="midpoint", step_size=0.01), 1e-4),
        (dict(method="dopri5", rtol=1e-8, atol=1e-8), 1e-7),
        (dict(method="dopri5", rtol=1e-8, atol=1e-8, adjoint=True), 1e-7),
    ],
)
def test_solution_and_gradient_match_closed_form(settings: dict, tolerance: float) -> None:
    rate, t1 = -0.7, 2.0
    block = ODEBlock(LinearField(rate), t1=t1, **settings)
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    y1 = block(y0)
    exact = y0.detach() * math.exp(rate * t1)
    assert torch.allclose(y1.detach(), exact, rtol=tolerance, atol=tolerance)
    y1.sum().backward()
    # d/da sum(y0 e^{a t1}) = t1 e^{a t1} sum(y0); d/dy0 = e^{a t1}
    expected_rate_grad = t1 * math.exp(rate * t1) * y0.detach().sum().item()
    assert block.field.rate.grad.item() == pytest.approx(expected_rate_grad, rel=1e-4, abs=1e-6)
    assert torch.allclose(y0.grad, torch.full_like(y0, math.exp(rate * t1)), rtol=1e-4)


def test_time_reaches_the_vector_field() -> None:
    block = ODEBlock(TimeField(), method="dopri5", rtol=1e-9, atol=1e-9, t0=0.0, t1=1.3)
    y0 = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(block(y0), y0 * math.exp(math.sin(1.3)), rtol=1e-7)


def test_nfe_counts_forward_and_backward() -> None:
    block = ODEBlock(LinearField(0.3), method="rk4", step_size=0.25)
    block(torch.ones(3, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert (block.nfe_forward, block.nfe_backward) == (16, 16)  # 4 steps × 4 stages, each backpropagated once

    adjoint = ODEBlock(LinearField(0.3), method="dopri5", adjoint=True)
    adjoint(torch.ones(3, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert adjoint.nfe_forward > 0 and adjoint.nfe_backward > 0

    with torch.no_grad():
        block(torch.ones(3, dtype=torch.float64))
    assert (block.nfe_forward, block.nfe_backward) == (32, 16)  # counters only increase: readers take differences
    assert not hasattr(block, "reset_nfe")


def test_settings_change_at_run_time_and_survive_state_dict() -> None:
    block = ODEBlock(LinearField(0.3), method="dopri5")
    block.configure_solver(method="euler", step_size=0.1)
    assert block.solver_settings()["method"] == "euler"
    block(torch.ones(1, dtype=torch.float64))
    assert block.nfe_forward == 10
    fresh = ODEBlock(LinearField(0.3), method="dopri5")
    fresh.load_state_dict(block.state_dict())
    assert fresh.solver_settings() == block.solver_settings()


def test_block_follows_the_callback_protocol() -> None:
    net = nn.Sequential(nn.Identity(), ODEBlock(LinearField(0.1)))
    assert isinstance(net[1], ODESolverBlock)
    assert find_ode_blocks(net) == [net[1]]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(method="rk5"), "`solver.method` must be one of"),
        (dict(method="rk4"), "needs `solver.step_size`"),
        (dict(method="rk4", step_size=-0.1), "`solver.step_size` must be a finite number > 0"),
        (dict(rtol=0.0), "`solver.rtol` must be a finite number > 0"),
        (dict(atol=float("nan")), "`solver.atol` must be a finite number > 0"),
        (dict(t0=1.0, t1=1.0), "t1 > t0"),
        (dict(method="euler", step_size=1e-4, max_num_steps=100), "raise max_num_steps or use a larger step_size"),
        (dict(max_num_steps=0), "`solver.max_num_steps` must be an integer >= 1"),
        (dict(adjoint="yes"), "`solver.adjoint` must be true or false"),
        (dict(min_step=-1.0), "`solver.min_step` must be a number in"),
        (dict(failure_retries=-1), "`solver.failure_retries` must be an integer >= 0"),
        (dict(failure_tol_factor=1.0), "`solver.failure_tol_factor` must be a number > 1"),
        (dict(adjoint=True, adjoint_options={"norm": "l2"}), "must be 'seminorm'"),
        (dict(adjoint=True, adjoint_options={"nrm": "seminorm"}), "unknown `solver.adjoint_options` key"),
        (dict(adjoint=True, adjoint_method="rk4"), "fixed-step `solver.adjoint_method` 'rk4' needs a step size"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        ODEBlock(LinearField(0.1), **kwargs)
    if "must be one of" in fragment:
        for name in SOLVERS:
            assert name in str(info.value)


def test_bad_run_time_change_is_rejected_and_keeps_old_settings() -> None:
    block = ODEBlock(LinearField(0.1), method="dopri5")
    with pytest.raises(ValueError, match=r"unknown `solver` setting\(s\) 'stepsize' \(did you mean 'step_size'\?\)"):
        block.configure_solver(stepsize=0.1)
    with pytest.raises(ValueError, match=r"needs `solver\.step_size`"):
        block.configure_solver(method="rk4")
    assert block.solver_settings()["method"] == "dopri5"


def test_vector_field_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"`vector_field` must be an nn\.Module"):
        ODEBlock(lambda t, y: y)  # type: ignore[arg-type]


def test_solver_failure_explains_remedies() -> None:
    class Stiff(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -1e6 * (y - torch.cos(t))

    block = ODEBlock(Stiff(), method="dopri5", rtol=1e-9, atol=1e-9, max_num_steps=20)
    with pytest.raises(SolverFailedError) as info:
        block(torch.zeros(1, dtype=torch.float64))
    message = str(info.value)
    for remedy in (
        "--model.init_args.solver.rtol",
        "`max_num_steps`",
        "`rtol`/`atol`",
        "`min_step` > 0",
        "`failure_retries`",
        "fixed-step solver",
        "ToleranceAdaptation",
    ):
        assert remedy in message


def test_min_step_accepts_coarse_steps_instead_of_failing() -> None:
    block = ODEBlock(LinearField(-0.5), method="dopri5", rtol=1e-13, atol=1e-13, max_num_steps=8)
    with pytest.raises(SolverFailedError):
        block(torch.ones(1, dtype=torch.float64))
    block.configure_solver(min_step=0.2)
    y1 = block(torch.ones(1, dtype=torch.float64))
    assert torch.allclose(y1, torch.exp(torch.tensor([-0.5], dtype=torch.float64)), rtol=1e-6)
