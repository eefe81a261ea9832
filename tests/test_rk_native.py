"""The native Runge–Kutta backend (issue 27) against closed forms and against torchdiffeq, on tiny float64 problems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_pdenets.blocks.ode import ODEBlock
from lightning_pdenets.errors import SolverFailedError
from lightning_pdenets.solvers import TORCHDIFFEQ_ONLY, SolverConfig
from lightning_pdenets.solvers.runge_kutta import NATIVE_METHODS, StepControl, solve

ADAPTIVE = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
T1 = 1.3


class Linear(nn.Module):
    """f(t, y) = A y, batched as y @ Aᵀ: y(t) = exp(A t) y0."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix.clone())

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.T


class Logistic(nn.Module):
    """f(t, y) = θ y (1 - y) per component: y(t) = 1 / (1 + (1/y0 - 1) exp(-θ t))."""

    def __init__(self, rates: torch.Tensor) -> None:
        super().__init__()
        self.rates = nn.Parameter(rates.clone())

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rates * y * (1 - y)


def _matrix() -> torch.Tensor:
    return torch.tensor([[-0.4, 1.0, 0.2], [-0.9, -0.3, 0.5], [0.1, -0.6, -0.2]], dtype=torch.float64)


def _y0(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _exact_linear(matrix: torch.Tensor, y0: torch.Tensor, t: float = T1) -> torch.Tensor:
    return y0 @ torch.linalg.matrix_exp(matrix * t).T


def _exact_logistic(rates: torch.Tensor, y0: torch.Tensor, t: float = T1) -> torch.Tensor:
    return 1 / (1 + (1 / y0 - 1) * torch.exp(-rates * t))


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_solution_is_within_the_tolerance_of_the_matrix_exponential(method: str) -> None:
    matrix, y0 = _matrix(), _y0()
    exact = _exact_linear(matrix, y0)
    errors = []
    for tol in (1e-4, 1e-7):
        block = ODEBlock(Linear(matrix), method=method, rtol=tol, atol=tol, t1=T1, max_num_steps=100_000)
        with torch.no_grad():
            errors.append((block(y0) - exact).abs().max().item())
        assert block.steps_accepted_forward > 1
        if method != "fehlberg2":  # a global error a small multiple of the local tolerance
            assert errors[-1] < 20 * tol * (1 + exact.abs().max().item()), (method, tol, errors[-1])
    # Fehlberg's 1(2) pair estimates the error of its 1st-order solution, whose error constant is 1/512, while it
    # propagates the 2nd-order one (as torchdiffeq does): its global error exceeds the tolerance, but converges
    assert errors[1] < errors[0] / 30


@pytest.mark.parametrize("method, order", FIXED.items())
def test_fixed_step_methods_converge_at_their_order(method: str, order: int) -> None:
    matrix, y0 = _matrix(), _y0()
    exact = _exact_linear(matrix, y0)
    errors = []
    for h in (T1 / 8, T1 / 16):
        block = ODEBlock(Linear(matrix), method=method, step_size=h, t1=T1)
        with torch.no_grad():
            errors.append((block(y0) - exact).abs().max().item())
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.35)


@pytest.mark.parametrize("method", list(FIXED))
@pytest.mark.parametrize("step_size", [0.25, 0.3])  # 0.3: torchdiffeq's grid ends with a shorter step
def test_fixed_step_methods_equal_torchdiffeq(method: str, step_size: float) -> None:
    matrix, y0 = _matrix(), _y0()
    outs = {}
    for backend in ("native", "torchdiffeq"):
        block = ODEBlock(Linear(matrix), method=method, step_size=step_size, t1=T1, backend=backend)
        with torch.no_grad():
            outs[backend] = (block(y0), block.nfe_forward, block.steps_accepted_forward, block.last_step_sizes)
    assert torch.allclose(outs["native"][0], outs["torchdiffeq"][0], rtol=1e-12, atol=1e-13)
    assert (
        outs["native"][1:3]
        == outs["torchdiffeq"][1:3]
        == (len(TABLE_STAGES[method]) * math.ceil(T1 / step_size), math.ceil(T1 / step_size))
    )
    assert torch.allclose(outs["native"][3], outs["torchdiffeq"][3].double(), rtol=1e-6)


TABLE_STAGES = {"euler": [1], "midpoint": [1, 2], "heun2": [1, 2], "heun3": [1, 2, 3], "rk4": [1, 2, 3, 4]}


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_accepted_steps_are_torchdiffeqs_except_the_last_which_ends_at_t1(method: str) -> None:
    matrix, y0 = _matrix(), _y0()
    sizes = {}
    for backend in ("native", "torchdiffeq"):
        block = ODEBlock(Linear(matrix), method=method, rtol=1e-6, atol=1e-6, t1=T1, backend=backend)
        with torch.no_grad():
            block(y0)
        sizes[backend] = block.last_step_sizes
    native, reference = sizes["native"], sizes["torchdiffeq"]
    assert len(native) == len(reference) >= 3
    assert torch.allclose(native[:-1], reference[:-1], rtol=1e-9, atol=0)
    assert native[-1] <= reference[-1]  # torchdiffeq steps past t1 and interpolates back
    assert native.sum().item() == pytest.approx(T1, abs=1e-12)
    assert reference.sum().item() > T1


def test_dopri5_counts_nfe_like_torchdiffeq() -> None:
    """2 evaluations for the initial step and f(t0), then 6 per attempted step (first same as last)."""
    block = ODEBlock(Linear(_matrix()), rtol=1e-6, atol=1e-6, t1=T1)
    with torch.no_grad():
        block(_y0())
    assert block.nfe_forward == 2 + 6 * (block.steps_accepted_forward + block.steps_rejected_forward)
    assert block.last_step_sizes.dtype == torch.float64


def test_native_dopri5_is_as_accurate_as_torchdiffeq_at_t1() -> None:
    """Stepping to t1 returns the 5th-order solution there, torchdiffeq its 4th-order interpolant."""
    matrix, y0 = _matrix(), _y0()
    exact = _exact_linear(matrix, y0)
    errors = {}
    for backend in ("native", "torchdiffeq"):
        block = ODEBlock(Linear(matrix), rtol=1e-5, atol=1e-5, t1=T1, backend=backend)
        with torch.no_grad():
            errors[backend] = (block(y0) - exact).abs().max().item()
    assert errors["native"] <= 1.5 * errors["torchdiffeq"]


def _gradients(field: nn.Module, y0: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return list(torch.autograd.grad((out * weights).sum(), [y0, *field.parameters()]))


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("norm", [None, "seminorm"])
def test_gradients_match_autograd_through_the_closed_forms(adjoint: bool, norm: str) -> None:
    if norm and not adjoint:
        pytest.skip("the seminorm is an adjoint option")
    options = {"norm": norm} if norm else None
    cases = [
        (Linear(_matrix()), _y0(), _exact_linear),
        (
            Logistic(torch.tensor([0.5, 1.5, -0.7], dtype=torch.float64)),
            torch.tensor([[0.2, 0.5, 0.9], [0.7, 0.1, 0.4]], dtype=torch.float64),
            _exact_logistic,
        ),
    ]
    for field, y0, exact in cases:
        y0 = y0.clone().requires_grad_(True)
        block = ODEBlock(
            field, rtol=1e-11, atol=1e-11, t1=T1, adjoint=adjoint, adjoint_options=options, max_num_steps=10_000
        )
        got = _gradients(field, y0, block(y0))
        parameter = next(field.parameters()).detach().clone().requires_grad_(True)
        y0_ref = y0.detach().clone().requires_grad_(True)
        out = exact(parameter, y0_ref)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        expected = torch.autograd.grad((out * weights).sum(), [y0_ref, parameter])
        for g, e in zip(got, expected):
            assert (g - e).norm() <= 1e-6 * e.norm(), (type(field).__name__, adjoint, norm)
        assert block.nfe_backward > 0
        if adjoint:
            assert block.steps_accepted_backward > 0


def test_seminorm_takes_no_more_backward_steps_than_the_default_norm() -> None:
    steps = {}
    for norm in (None, "seminorm"):
        field = Linear(_matrix())
        y0 = _y0().requires_grad_(True)
        block = ODEBlock(
            field, rtol=1e-6, atol=1e-6, t1=T1, adjoint=True, adjoint_options={"norm": norm} if norm else None
        )
        _gradients(field, y0, block(y0))
        steps[norm] = block.steps_accepted_backward + block.steps_rejected_backward
    assert steps["seminorm"] <= steps[None]


@pytest.mark.parametrize("adjoint", [False, True])
def test_backends_agree_on_gradients(adjoint: bool) -> None:
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = field

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(y) * (1 + t)

    grads = {}
    for backend in ("native", "torchdiffeq"):
        f = Field()
        y0 = _y0().requires_grad_(True)
        block = ODEBlock(f, rtol=1e-10, atol=1e-10, adjoint=adjoint, backend=backend)
        grads[backend] = _gradients(f, y0, block(y0))
    for a, b in zip(grads["native"], grads["torchdiffeq"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_rnode_integrals_agree_with_torchdiffeq_and_stay_out_of_step_control() -> None:
    matrix, y0 = _matrix(), _y0()
    results = {}
    for backend in ("native", "torchdiffeq"):
        torch.manual_seed(1)
        block = ODEBlock(
            Linear(matrix), rtol=1e-8, atol=1e-8, t1=T1, kinetic_weight=1.0, jacobian_weight=1.0, backend=backend
        )
        block.train()
        out = block(y0)
        terms = block.pop_regularization()
        results[backend] = (out, terms, block.last_step_sizes)
        plain = ODEBlock(Linear(matrix), rtol=1e-8, atol=1e-8, t1=T1, backend=backend)
        with torch.no_grad():
            plain(y0)
        assert torch.equal(block.last_step_sizes, plain.last_step_sizes)  # the integrals do not change the steps
    for name in ("kinetic_energy", "jacobian_frobenius"):
        assert results["native"][1][name].item() == pytest.approx(results["torchdiffeq"][1][name].item(), rel=1e-6)
    assert torch.allclose(results["native"][0], results["torchdiffeq"][0], rtol=1e-7, atol=1e-9)


def test_max_num_steps_and_min_step_on_the_native_path() -> None:
    block = ODEBlock(Linear(_matrix() * 50), rtol=1e-9, atol=1e-9, max_num_steps=5)
    with pytest.raises(SolverFailedError, match="max_num_steps exceeded"):
        block(_y0())
    # min_step accepts steps of that size instead of failing; with first_step = min_step every step is accepted
    block = ODEBlock(Linear(_matrix() * 50), rtol=1e-12, atol=1e-12, min_step=0.05, first_step=0.05, max_step=0.05)
    with torch.no_grad():
        block(_y0())
    assert block.steps_rejected_forward == 0 and block.steps_accepted_forward == 20


def test_failure_retries_loosen_the_tolerance_on_the_native_path() -> None:
    block = ODEBlock(
        Linear(_matrix() * 20), rtol=1e-10, atol=1e-10, max_num_steps=40, failure_retries=20, failure_tol_factor=10.0
    )
    with torch.no_grad():
        block(_y0())
    assert block.solver.rtol > 1e-10 and block.solver.backend == "native"


def test_torchdiffeq_only_methods_fall_back_and_backend_is_validated() -> None:
    assert set(TORCHDIFFEQ_ONLY) == {"dopri8", "explicit_adams", "implicit_adams"}
    assert not set(TORCHDIFFEQ_ONLY) & set(NATIVE_METHODS)
    config = SolverConfig(method="dopri8")
    assert config.backend == "native" and not config.uses_native
    assert not SolverConfig(adjoint=True, adjoint_method="dopri8").uses_native
    assert SolverConfig().uses_native and not SolverConfig(backend="torchdiffeq").uses_native
    block = ODEBlock(Linear(_matrix()), method="dopri8", rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(block(_y0()), _exact_linear(_matrix(), _y0(), 1.0), rtol=0, atol=1e-3)
    assert block.steps_accepted_forward > 0  # torchdiffeq's step callbacks count on the fallback too
    with pytest.raises(ValueError, match=r"`solver.backend` must be one of \['native', 'torchdiffeq'\], got 'scipy'"):
        SolverConfig.from_options({"backend": "scipy"})
    with pytest.raises(ValueError, match=r"integrates .* not 'dopri8'"):
        StepControl(method="dopri8")
    with pytest.raises(ValueError, match="needs a step_size > 0"):
        StepControl(method="rk4")
    with pytest.raises(TypeError, match="`y0` must be a tuple of tensors"):
        solve(lambda t, y: y, torch.zeros(2), 0.0, 1.0, StepControl(method="dopri5"))


def test_settings_without_backend_load_as_native_and_a_config_is_taken_as_it_is() -> None:
    old = SolverConfig().as_options()
    del old["backend"]  # a 0.3.0 checkpoint's solver settings
    block = ODEBlock(Linear(_matrix()), method="rk4", step_size=0.5)
    block.set_extra_state({"solver_settings": old})
    assert block.solver == SolverConfig()
    config = SolverConfig(method="rk4", step_size=0.25)
    assert SolverConfig.from_options(config, defaults={"method": "euler"}) is config
    assert ODEBlock(Linear(_matrix()), config).solver is config
    assert ODEBlock(Linear(_matrix()), config, step_size=0.5).solver.step_size == 0.5


def test_backward_integration_runs_the_same_method_in_reverse_time() -> None:
    matrix, y0 = _matrix(), _y0()
    field = Linear(matrix)
    y1 = solve(lambda t, y: (field(t, y[0]),), (y0,), 0.0, T1, StepControl("dopri5", rtol=1e-10, atol=1e-10))[0]
    back = solve(lambda t, y: (field(t, y[0]),), (y1,), T1, 0.0, StepControl("dopri5", rtol=1e-10, atol=1e-10))[0]
    assert torch.allclose(back.detach(), y0, rtol=1e-8, atol=1e-9)
