"""RNODE regularization (Finlay et al., ICML 2020) and solver-step statistics of ODEBlock against closed forms.

On a linear field f(y) = A y the solution is y(t) = exp(A t) y0, so the kinetic energy ∫‖A y(t)‖² dt has an
independent reference by quadrature of the matrix exponential, and the Jacobian is A at every t: the
Hutchinson estimate for a probe ε is exactly ‖εᵀA‖²·(t1 − t0), with mean ‖A‖²_F·(t1 − t0).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.blocks import ODEBlock
from lightning_pdenets.dynamics.conv import ConvODEFunc
from lightning_pdenets.models import ODENetModule, VectorODEClassifierModule
from lightning_pdenets.protocols import RegularizedModule, find_regularized_modules, pop_regularization
from lightning_pdenets.solvers import SolverConfig
from tests.trainers import quiet_trainer

T1 = 1.5
SOLVES = [
    dict(method="dopri5", rtol=1e-9, atol=1e-9),
    dict(method="dopri5", rtol=1e-9, atol=1e-9, adjoint=True),
    dict(method="rk4", step_size=0.01),
]


class LinearSystem(nn.Module):
    """f(t, y) = A y for a batch of row vectors y."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix.clone())

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.T


def _matrix() -> torch.Tensor:
    return torch.tensor([[-0.4, 0.9, 0.0], [-0.7, 0.1, 0.3], [0.2, -0.5, -0.6]], dtype=torch.float64)


def _initial_states(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _kinetic_reference(matrix: torch.Tensor, y0: torch.Tensor, points: int = 4001) -> torch.Tensor:
    """Batch mean of ∫_0^T1 ‖A exp(A t) y0‖² dt by the trapezoidal rule on the exact solution (differentiable in A)."""
    times = torch.linspace(0.0, T1, points, dtype=torch.float64)
    states = torch.stack([y0 @ torch.linalg.matrix_exp(matrix * t).T for t in times])
    return torch.trapezoid((states @ matrix.T).pow(2).sum(-1), times, dim=0).mean()


@pytest.mark.parametrize("settings", SOLVES)
def test_kinetic_energy_matches_the_exact_solution_value_and_gradient(settings: dict) -> None:
    matrix, y0 = _matrix(), _initial_states()
    block = ODEBlock(LinearSystem(matrix), t1=T1, kinetic_weight=0.5, **settings)
    y1 = block(y0)
    terms = block.pop_regularization()
    assert set(terms) == {"kinetic_energy"}  # the Jacobian term's weight is 0: left out
    reference_matrix = matrix.clone().requires_grad_(True)
    reference = _kinetic_reference(reference_matrix, y0)
    assert terms["kinetic_energy"].item() == pytest.approx(0.5 * reference.item(), rel=1e-6)
    # the solution itself is that of the unregularized block
    assert torch.allclose(y1, y0 @ torch.linalg.matrix_exp(matrix * T1).T, rtol=1e-6, atol=1e-7)
    terms["kinetic_energy"].backward()
    (expected,) = torch.autograd.grad(0.5 * reference, reference_matrix)
    assert torch.allclose(block.field.matrix.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings", SOLVES)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_jacobian_term_is_the_hutchinson_estimate_of_the_frobenius_norm(settings: dict, noise: str) -> None:
    matrix, y0 = _matrix(), _initial_states()
    block = ODEBlock(LinearSystem(matrix), t1=T1, jacobian_weight=2.0, hutchinson_noise=noise, **settings)
    torch.manual_seed(3)
    block(y0)
    estimate = block.pop_regularization()["jacobian_frobenius"]
    torch.manual_seed(3)  # the block draws its one probe per solve first
    probe = torch.randn_like(y0) if noise == "gaussian" else torch.randint_like(y0, 2) * 2 - 1
    if noise == "rademacher":
        assert set(probe.unique().tolist()) == {-1.0, 1.0}
    exact_for_probe = 2.0 * T1 * (probe @ matrix).pow(2).sum(1).mean()
    assert estimate.item() == pytest.approx(exact_for_probe.item(), rel=1e-6)


def test_hutchinson_estimate_is_unbiased() -> None:
    matrix = _matrix()
    block = ODEBlock(LinearSystem(matrix), t1=T1, jacobian_weight=1.0, method="rk4", step_size=0.5)
    torch.manual_seed(0)
    block(torch.zeros(20000, 3, dtype=torch.float64))  # 20,000 samples, one probe each
    estimate = block.pop_regularization()["jacobian_frobenius"].item()
    exact = matrix.pow(2).sum().item() * T1
    # a Gaussian probe's estimate has standard deviation sqrt(2)·‖A Aᵀ‖_F·T1 per sample: allow 5 standard errors
    spread = 2**0.5 * (matrix @ matrix.T).norm().item() * T1
    assert estimate == pytest.approx(exact, abs=5 * spread / 20000**0.5)
    assert abs(estimate - exact) > 1e-9  # an estimate, not the exact value


def test_regularization_is_off_by_default_in_evaluation_and_without_gradients() -> None:
    y0 = _initial_states()
    plain = ODEBlock(LinearSystem(_matrix()), method="dopri5")
    plain(y0)
    assert plain.pop_regularization() == {}
    assert isinstance(plain, RegularizedModule)
    block = ODEBlock(LinearSystem(_matrix()), method="dopri5", kinetic_weight=1.0, jacobian_weight=1.0)
    with torch.no_grad():
        block(y0)
    block.eval()
    block(y0)
    assert block.pop_regularization() == {}
    block.train()
    block(y0)
    block(y0)
    twice = block.pop_regularization()
    block(y0)
    once = block.pop_regularization()
    assert twice["kinetic_energy"].item() == pytest.approx(2 * once["kinetic_energy"].item())  # collected until popped
    assert block.pop_regularization() == {}


@pytest.mark.parametrize("adjoint", [False, True])
def test_regularized_solve_takes_the_steps_of_the_plain_one(adjoint: bool) -> None:
    y0 = _initial_states()
    plain = ODEBlock(LinearSystem(_matrix()), method="dopri5", rtol=1e-5, atol=1e-5, adjoint=adjoint)
    regularized = ODEBlock(
        LinearSystem(_matrix()),
        method="dopri5",
        rtol=1e-5,
        atol=1e-5,
        adjoint=adjoint,
        kinetic_weight=1.0,
        jacobian_weight=1.0,
    )
    plain(y0).sum().backward()
    out = regularized(y0)
    (out.sum() + sum(regularized.pop_regularization().values())).backward()
    assert regularized.nfe_forward == plain.nfe_forward  # the integrals are not error-controlled
    assert torch.equal(regularized.last_step_sizes, plain.last_step_sizes)
    # backpropagated through the solver, the probe's product with the Jacobian is no backward evaluation of its own
    assert regularized.nfe_backward == plain.nfe_backward


def test_modules_report_their_regularization_through_the_protocol() -> None:
    network = nn.Sequential(
        ODEBlock(LinearSystem(_matrix()), method="rk4", step_size=0.5, kinetic_weight=1.0),
        ODEBlock(LinearSystem(_matrix()), method="rk4", step_size=0.5, kinetic_weight=3.0),
    )
    modules = find_regularized_modules(network)
    assert modules == list(network)
    network(_initial_states())
    first = network[0]._regularization["kinetic_energy"].item()
    second = network[1]._regularization["kinetic_energy"].item()
    total = pop_regularization(modules)
    assert total["kinetic_energy"].item() == pytest.approx(first + second)
    assert pop_regularization(modules) == {}


def test_classifier_adds_the_terms_to_the_training_loss_and_logs_them() -> None:
    torch.manual_seed(0)
    module = VectorODEClassifierModule(
        solver=dict(method="rk4", step_size=0.5, kinetic_weight=0.1, jacobian_weight=0.2),
        input_dim=2,
        network=dict(hidden_width=8),
    )
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="trainer"):  # self.log outside a Trainer
        loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    logits = module(x)
    terms = pop_regularization(find_regularized_modules(module))
    expected = torch.nn.functional.cross_entropy(logits, y) + terms["kinetic_energy"] + terms["jacobian_frobenius"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["kinetic_energy"].item() > 0 and terms["jacobian_frobenius"].item() > 0
    trainer = quiet_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(32, 2), torch.randint(0, 2, (32,))), batch_size=16))
    logged = trainer.callback_metrics
    assert {"train/kinetic_energy_step", "train/kinetic_energy_epoch", "train/jacobian_frobenius_epoch"} <= set(logged)
    assert logged["train/kinetic_energy_step"].item() > 0


def test_rnode_settings_are_validated_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"`solver.kinetic_weight` must be a finite number >= 0 \(0 turns the term off\)"
    ):
        SolverConfig(kinetic_weight=-1.0).validate()
    with pytest.raises(ValueError, match=r"`solver\.jacobian_weight` must be a finite number >= 0"):
        SolverConfig(jacobian_weight=float("nan")).validate()
    with pytest.raises(ValueError, match=r"`solver\.jacobian_weight` must be a finite number >= 0"):
        SolverConfig(jacobian_weight="0.1").validate()
    with pytest.raises(ValueError, match=r"`solver.hutchinson_noise` must be one of \['gaussian', 'rademacher'\]"):
        SolverConfig(hutchinson_noise="uniform").validate()
    assert "RNODE (kinetic 0.1, jacobian 0)" in SolverConfig(kinetic_weight=0.1).describe()


# -- solver-step statistics ------------------------------------------------------------------------------------------
class Decay(nn.Module):
    """f(t, y) = -k y: fast decay for large k, where a first step over the whole interval is rejected."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(rate, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.rate * y


@pytest.mark.parametrize("first_step, evaluations_at_start", [(1.0, 1), (None, 2)])
def test_dopri5_counts_accepted_and_rejected_steps_that_add_up_to_its_nfe(first_step, evaluations_at_start) -> None:
    block = ODEBlock(Decay(20.0), method="dopri5", rtol=1e-6, atol=1e-6, first_step=first_step, adjoint=True)
    block(torch.ones(4, dtype=torch.float64, requires_grad=True)).sum().backward()
    if first_step is not None:
        assert block.steps_rejected_forward >= 1  # a step of the whole interval at rate 20 fails the error test
    attempts = block.steps_accepted_forward + block.steps_rejected_forward
    assert block.nfe_forward == evaluations_at_start + 6 * attempts  # dopri5: 6 new stages per attempt (FSAL)
    backward_attempts = block.steps_accepted_backward + block.steps_rejected_backward
    assert block.steps_accepted_backward >= 1
    assert block.nfe_backward == evaluations_at_start + 6 * backward_attempts  # the adjoint solve alike
    sizes = block.last_step_sizes
    assert len(sizes) == block.steps_accepted_forward
    assert sizes[:-1].sum().item() < 1.0 <= sizes.sum().item()  # torchdiffeq steps past t1 and interpolates back


@pytest.mark.parametrize("method, stages", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_solvers_accept_every_step(method: str, stages: int) -> None:
    block = ODEBlock(Decay(1.0), method=method, step_size=0.125)
    block(torch.ones(2, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert (block.steps_accepted_forward, block.steps_rejected_forward) == (8, 0)
    assert block.nfe_forward == stages * block.steps_accepted_forward
    assert (block.steps_accepted_backward, block.steps_rejected_backward) == (0, 0)  # through the solver
    assert torch.allclose(block.last_step_sizes, torch.full((8,), 0.125, dtype=torch.float64))


def test_fixed_step_adjoint_counts_its_backward_steps_and_solvers_do_not_warn(recwarn) -> None:
    block = ODEBlock(Decay(1.0), method="rk4", step_size=0.25, adjoint=True)
    block(torch.ones(2, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert (block.steps_accepted_forward, block.steps_accepted_backward) == (4, 4)
    assert not [w for w in recwarn if "does not support callbacks" in str(w.message)]


def _dopri5_error_estimates(activation: str, seed: int, steps: tuple[float, ...]) -> list[float]:
    """Norm of dopri5's embedded error estimate for one step of each size from t = 0 (float64, ConvODEFunc)."""
    from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
    from torchdiffeq._impl.rk_common import _runge_kutta_step

    torch.manual_seed(seed)
    field = ConvODEFunc(8, activation).double()
    y0 = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    func = lambda t, y, perturb=None: field(t, y)  # noqa: E731 (torchdiffeq passes `perturb`)
    t0 = torch.zeros((), dtype=torch.float64)
    f0 = func(t0, y0)
    errors = []
    for h in steps:
        dt = torch.tensor(h, dtype=torch.float64)
        _, _, error, _ = _runge_kutta_step(func, y0, f0, t0, dt, t0 + dt, _DORMAND_PRINCE_SHAMPINE_TABLEAU)
        errors.append(error.norm().item())
    return errors


@pytest.mark.parametrize("seed", range(3))
def test_a_smooth_activation_gives_dopri5_its_fifth_order_local_error(seed: int) -> None:
    # Halving h divides dopri5's error estimate by 2^5 = 32 when f is smooth; ReLU's kinks break that order, which
    # is why the step-size controller (it assumes h^5) grows ReLU-field steps timidly.
    steps = (0.4, 0.2, 0.1, 0.05)
    smooth = _dopri5_error_estimates("softplus", seed, steps)
    kinked = _dopri5_error_estimates("relu", seed, steps)
    assert smooth[-2] / smooth[-1] == pytest.approx(32, rel=0.15)
    assert max(a / b for a, b in itertools.pairwise(kinked)) < 16


def test_odenet_activation_is_a_network_setting_and_relu_stays_chens() -> None:
    torch.manual_seed(0)
    model = ODENetModule(network={"width": 8, "activation": "softplus"}, solver={"method": "rk4", "step_size": 0.5})
    field = model.network.feature.field
    assert model.hparams.network["activation"] == "softplus" and field.activation == "softplus"
    y = torch.randn(2, 8, 4, 4)
    t = torch.tensor(0.3)
    expected = field.conv2(t, F.softplus(field.norm2(field.conv1(t, F.softplus(field.norm1(y))))))
    assert torch.equal(field(t, y), field.norm3(expected))
    relu_field = ODENetModule(network={"width": 8}).network.feature.field
    assert relu_field.activation == "relu"
    relu_field.load_state_dict(field.state_dict())  # no new parameters: older checkpoints load unchanged
    expected = relu_field.conv2(t, torch.relu(relu_field.norm2(relu_field.conv1(t, torch.relu(relu_field.norm1(y))))))
    assert torch.equal(relu_field(t, y), relu_field.norm3(expected))


def test_an_unknown_activation_lists_the_valid_names() -> None:
    with pytest.raises(
        ValueError, match=r"`activation` must be one of \['elu', 'relu', 'silu', 'softplus', 'tanh'\], got 'gelu'"
    ):
        ODENetModule(network={"width": 8, "activation": "gelu"})
