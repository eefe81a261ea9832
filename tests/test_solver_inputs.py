"""Bad solver settings, states and vector fields are refused at the boundary; NaN ends a solve at once."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_pdenets.blocks.ode import ODEBlock, explain_solver_failure
from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.solvers import SolverConfig
from lightning_pdenets.solvers.runge_kutta import StepControl, solve

BACKENDS = ("native", "torchdiffeq")
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)


class Linear(nn.Module):
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T.to(y.dtype)


class Rotate(nn.Module):
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1j * y


class Wrong(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> Any:
        return {
            "shape": lambda: -y[..., :1],
            "broadcast": lambda: -y.sum(0),
            "dtype": lambda: (-y).float(),
            "tuple": lambda: (-y,),
            "none": lambda: None,
        }[self.kind]()


class NaNAfterHalf(nn.Module):
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)


def _y0() -> torch.Tensor:
    return torch.tensor([[1.0, 0.5]], dtype=torch.float64)


# -- 1. a SolverConfig is valid however it is built ---------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(rtol=-1.0, atol=-1.0), r"`solver\.rtol` must be a finite number > 0"),
        (dict(method="rk4"), r"fixed-step solver 'rk4' needs `solver\.step_size`"),
        (dict(method="rk5"), r"`solver\.method` must be one of"),
        (dict(t0=1.0, t1=0.0), "t1 > t0"),
        (dict(method="euler", step_size=1e-9), "more than `solver.max_num_steps`=1000"),
    ],
)
def test_a_directly_built_config_is_validated(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SolverConfig(**settings)
    with pytest.raises(ValueError, match=message):  # the dict form says the same
        SolverConfig.from_options(settings)


def test_a_config_is_validated_once_and_messages_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = SolverConfig.validate

    def counting(self: SolverConfig, argument: str = "solver") -> SolverConfig:
        calls.append(argument)
        return original(self, argument)

    monkeypatch.setattr(SolverConfig, "validate", counting)
    SolverConfig.from_options({"method": "rk4"}, defaults={"step_size": 0.5})
    assert calls == ["solver"]
    calls.clear()
    ODEBlock(Linear(), {"method": "rk4"}, step_size=0.25)
    assert calls == ["solver"]
    calls.clear()
    config = SolverConfig()
    calls.clear()
    config.replace(rtol=1e-4)
    assert calls == ["solver"]
    with pytest.raises(ValueError, match=r"`gradient_solver\.atol`"):
        SolverConfig.from_options({"atol": 0.0}, argument="gradient_solver")


@pytest.mark.parametrize(
    ("t1", "control", "message"),
    [
        (math.nan, {}, "`t1` must be a finite number"),
        (math.inf, {}, "`t1` must be a finite number"),
        (1.0, {"rtol": -1.0}, "`rtol` must be a finite number > 0"),
        (1.0, {"max_num_steps": 0}, "`max_num_steps` must be an integer >= 1"),
        (1.0, {"min_step": 0.5, "max_step": 0.1}, "`max_step` must be a number >= min_step"),
        (1.0, {"safety": 2.0}, r"`safety` must be a number in \(0, 1\]"),
    ],
)
def test_the_low_level_solve_refuses_bad_settings(t1: float, control: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solve(lambda t, y: y, (_y0(),), 0.0, t1, StepControl(method="dopri5", **control))


# -- 2. explicit_adams is the 4th-order method the catalogue claims ------------------------------------
def test_explicit_adams_converges_with_order_four() -> None:
    exact = _y0() @ torch.linalg.matrix_exp(2 * A).T
    errors = []
    for h in (0.04, 0.02, 0.01):
        block = ODEBlock(Linear(), method="explicit_adams", step_size=h, t1=2.0)
        errors.append((block(_y0()) - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(3.7 < order < 4.3 for order in orders), (errors, orders)
    assert errors[-1] < 1e-6


# -- 3. the vector field's value is checked at its first evaluation ---------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [{}, {"method": "rk4", "step_size": 0.25}])
@pytest.mark.parametrize("kind", ["shape", "broadcast", "dtype", "tuple", "none"])
def test_a_vector_field_of_the_wrong_shape_or_dtype_is_refused(backend: str, method: dict[str, Any], kind: str) -> None:
    block = ODEBlock(Wrong(kind), backend=backend, **method)
    with pytest.raises(TypeError, match=r"must return a tensor of the state's shape and dtype \[4, 3\] float64"):
        block(torch.ones(4, 3, dtype=torch.float64))


# -- 4. NaN ends a native adaptive solve at once ----------------------------------------------------------
@pytest.mark.parametrize("min_step", [0.0, 1e-3])
def test_nan_from_the_vector_field_ends_the_native_solve_at_once(min_step: float) -> None:
    block = ODEBlock(NaNAfterHalf(), min_step=min_step, max_num_steps=20000)
    with pytest.raises(SolverFailedError, match=r"the vector field returned NaN/Inf at t = "):
        block(torch.ones(2, 1, dtype=torch.float64))
    assert block.nfe_forward < 50


def test_an_infinite_step_result_is_not_accepted() -> None:
    # an infinite y1 would scale its error to 0 (accepted); the stage with the Inf has error weight 0 in dopri5
    def field(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (torch.where(t > 0.1, torch.full_like(y[0], math.inf), -y[0]),)

    with pytest.raises(SolverFailedError, match="NaN/Inf"):
        solve(field, (_y0(),), 0.0, 1.0, StepControl(method="dopri5", first_step=0.5))


# -- 5. a failed adjoint solve names its own settings ---------------------------------------------------
def test_a_backward_failure_names_the_adjoint_settings() -> None:
    settings = SolverConfig(adjoint=True, adjoint_rtol=0.5, adjoint_options={"max_num_steps": 1}).as_options()
    plain = SolverConfig().as_options()  # backpropagated through: it solves nothing in backward
    error = explain_solver_failure(
        RuntimeError("max_num_steps exceeded (1>=1)"), [plain, settings], "backward (adjoint)"
    )
    message = str(error)
    assert isinstance(error, SolverFailedError) and is_solver_failure(error)
    assert "adjoint_rtol=0.5, adjoint_atol=0.001, adjoint_options.max_num_steps=1" in message
    assert "max_num_steps=1000" not in message
    assert "`adjoint_options: {max_num_steps: ...}`" in message
    assert "`failure_retries` does not help here" in message


# -- 6. the evaluation counts the docstring of runge_kutta states ----------------------------------------------
@pytest.mark.parametrize(("method", "stages", "extra_per_accepted"), [("adaptive_heun", 2, 1), ("dopri5", 7, 0)])
def test_native_evaluation_count_follows_the_documented_formula(
    method: str, stages: int, extra_per_accepted: int
) -> None:
    block = ODEBlock(Linear(), method=method, rtol=1e-6, atol=1e-6)
    block(_y0())
    accepted, rejected = block.steps_accepted_forward, block.steps_rejected_forward
    assert block.nfe_forward == 2 + (stages - 1) * (accepted + rejected) + extra_per_accepted * accepted


# -- 7. a fixed step longer than the interval is one step in both backends ------------------------------------
def test_a_step_longer_than_the_interval_is_one_step_in_both_backends() -> None:
    y0 = _y0().float()  # torchdiffeq's float32 grid failed with a bare AssertionError
    outputs = [ODEBlock(Linear(), method="rk4", step_size=1e10, backend=b)(y0) for b in BACKENDS]
    one_step = ODEBlock(Linear(), method="rk4", step_size=1.0)(y0)
    for output in outputs:
        torch.testing.assert_close(output, one_step)


# -- 8./9. the state must be one floating-point or complex tensor --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_tuple_states_are_refused(backend: str) -> None:
    block = ODEBlock(Linear(), backend=backend)
    with pytest.raises(TypeError, match=r"floating-point \(or complex\) state, got torch.int64: convert it"):
        block(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="ODEBlock integrates one tensor state y\\(t0\\), got a tuple"):
        block((torch.ones(2, 3), torch.ones(2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [{"rtol": 1e-8, "atol": 1e-8}, {"method": "rk4", "step_size": 0.01}])
def test_a_complex_state_is_integrated_with_real_times(backend: str, method: dict[str, Any]) -> None:
    y0 = torch.tensor([1 + 1j, 0.5j], dtype=torch.complex128)
    y1 = ODEBlock(Rotate(), backend=backend, **method)(y0)
    torch.testing.assert_close(y1, y0 * torch.exp(torch.tensor(1j, dtype=torch.complex128)), rtol=1e-6, atol=1e-6)


# -- 10. step bounds that cannot fit max_num_steps; an empty batch ---------------------------------------
def test_a_max_step_that_needs_too_many_steps_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`solver\.max_step`=1e-300 needs at least about 1\.0e\+300 steps"):
        SolverConfig(max_step=1e-300)
    with pytest.raises(ValueError, match=r"`solver\.adjoint_options\.max_step`=0\.01 needs at least 100 steps"):
        SolverConfig(adjoint=True, adjoint_options={"max_step": 0.01, "max_num_steps": 50})
    assert SolverConfig(max_step=0.01).max_step == 0.01  # 100 steps fit the default 1000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adjoint", [False, True])
def test_an_empty_batch_gives_an_empty_output(backend: str, adjoint: bool) -> None:
    x = torch.ones(0, 3, dtype=torch.float64, requires_grad=True)
    block = ODEBlock(Linear(), backend=backend, adjoint=adjoint)
    out = block(x)
    assert out.shape == (0, 3) and block.nfe_forward == 0
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 3)
