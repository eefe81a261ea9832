"""PDE-motivated CNNs (Ruthotto & Haber): time-dependent weights, blocks, reversibility, STL-10 network and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_pdenets.architectures import ARCHITECTURES, PDECNN
from lightning_pdenets.blocks import HamiltonianBlock, ParabolicBlock, SecondOrderBlock
from lightning_pdenets.data import STL10DataModule
from lightning_pdenets.dynamics import SymmetricLayer, TimeDependentWeight
from lightning_pdenets.models import HamiltonianCNNModule, ParabolicCNNModule, SecondOrderCNNModule
from lightning_pdenets.protocols import TimeDependentWeights, TimeSteppingBlock
from tests.fakedata.stl10 import fake_stl10, write_stl10_split
from tests.trainers import quiet_trainer

REVERSIBLE_BLOCKS = [HamiltonianBlock, SecondOrderBlock]


def random_weights(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Independent random values at every control point (so the weights really vary in time)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


# -- time-dependent weights ---------------------------------------------------------------------
def test_constant_interpolation_picks_the_cell_of_each_step():
    weight = TimeDependentWeight((2,), num_control_points=3, interpolation="constant", final_time=6.0)
    with torch.no_grad():
        weight.control_points.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    # 6 steps on [0, 6]: t_j = j; cells [0,2), [2,4), [4,6)
    assert [weight.at_step(j, 6)[0].item() for j in range(6)] == [0, 0, 1, 1, 2, 2]
    assert weight.weight_time_step() == pytest.approx(2.0)


def test_linear_interpolation_matches_numpy_interp():
    values = np.array([0.5, -1.0, 2.0, 0.0])
    weight = TimeDependentWeight((), num_control_points=4, interpolation="linear", final_time=3.0)
    with torch.no_grad():
        weight.control_points.copy_(torch.tensor(values))
    nodes = np.linspace(0.0, 3.0, 4)
    for j in range(7):
        t = j * 3.0 / 7
        assert weight.at_step(j, 7).item() == pytest.approx(np.interp(t, nodes, values), abs=1e-6)
    times = torch.tensor([0.0, 0.4, 1.7, 3.0])
    np.testing.assert_allclose(
        weight.at_times(times).detach().numpy(), np.interp(times.numpy(), nodes, values), atol=1e-6
    )
    assert weight.weight_time_step() == pytest.approx(1.0)


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_nested_prolongation_keeps_theta_of_t(interpolation):
    weight = TimeDependentWeight(
        (3,), num_control_points=4, interpolation=interpolation, final_time=2.0, init=lambda t: t.normal_()
    )
    times = torch.linspace(0.0, 1.999, 41)
    before = weight.at_times(times).detach().clone()
    parameter = weight.control_points
    weight.prolong(weight.refined_count(2))
    assert weight.control_points is parameter  # same Parameter object: optimizers keep it
    assert weight.num_control_points == (8 if interpolation == "constant" else 7)
    torch.testing.assert_close(weight.at_times(times), before, atol=1e-6, rtol=0)


def test_time_dependent_weight_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`interpolation` must be one of .*'cubic'"):
        TimeDependentWeight((2,), 3, interpolation="cubic")
    with pytest.raises(ValueError, match="`num_control_points` must be an integer >= 1, got 0"):
        TimeDependentWeight((2,), 0)
    with pytest.raises(ValueError, match="`kernel_size` must be odd"):
        SymmetricLayer(4, 2, kernel_size=2)
    with pytest.raises(ValueError, match=r"`norm` must be one of .*'batch'"):
        SymmetricLayer(4, 2, norm="batch")


def test_transposed_convolution_is_the_adjoint_so_f_sym_is_symmetric_negative():
    torch.manual_seed(0)
    layer = SymmetricLayer(3, 1, norm="none", activation="identity").double()
    y1, y2 = torch.randn(2, 1, 3, 7, 7, dtype=torch.float64)
    f1, f2 = layer(y1, 0, 1), layer(y2, 0, 1)
    # F(y) = -KᵀK y: <F(y1), y2> = <y1, F(y2)> and <F(y), y> = -|Ky|² <= 0
    assert (f1 * y2).sum().item() == pytest.approx((y1 * f2).sum().item(), rel=1e-10)
    kernel = layer.kernel.control_points[0]
    assert (f1 * y1).sum().item() == pytest.approx(-(F.conv2d(y1, kernel, padding=1) ** 2).sum().item(), rel=1e-10)


# -- blocks -------------------------------------------------------------------------------------
def test_blocks_follow_the_protocols_and_validate():
    block = HamiltonianBlock(4, num_steps=2)
    assert isinstance(block, TimeSteppingBlock)
    assert all(isinstance(w, TimeDependentWeights) for w in block.layers[0].time_weights())
    with pytest.raises(ValueError, match=r"must be even .* got 5"):
        HamiltonianBlock(5)
    with pytest.raises(ValueError, match="ParabolicBlock is not reversible"):
        ParabolicBlock(4, reversible=True)
    with pytest.raises(ValueError, match=r"expected feature maps of shape \(N, 4, H, W\)"):
        ParabolicBlock(4)(torch.zeros(1, 3, 5, 5))


def test_hamiltonian_step_is_the_verlet_scheme_of_the_issue():
    torch.manual_seed(1)
    block = HamiltonianBlock(4, num_steps=1, step_size=0.3).double()
    random_weights(block, 0.3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y, z = x[:, :2], x[:, 2:]
    f1, f2 = block.layers
    y_next = y + 0.3 * f1(z, 0, 1)
    z_next = z - 0.3 * f2(y_next, 0, 1)
    torch.testing.assert_close(block(x), torch.cat([y_next, z_next], 1))


def test_second_order_step_is_leapfrog_with_y_minus_one_equal_y0():
    torch.manual_seed(2)
    block = SecondOrderBlock(3, num_steps=2, step_size=0.4).double()
    random_weights(block, 0.3)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    layer = block.layers[0]
    y1 = 2 * x - x + 0.16 * layer(x, 0, 2)
    y2 = 2 * y1 - x + 0.16 * layer(y1, 1, 2)
    torch.testing.assert_close(block(x), y2)


@pytest.mark.parametrize("block_class", REVERSIBLE_BLOCKS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_running_forward_then_backward_recovers_the_input(block_class, dtype, tolerance):
    torch.manual_seed(3)
    block = block_class(4, num_steps=8, step_size=0.5, num_control_points=5, interpolation="linear").to(dtype)
    random_weights(block, 0.2)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    with torch.no_grad():
        initial = block.initial_state(x)
        final = block.integrate(initial)
        recovered = block.reverse(final)
    assert (block.output(final) - x).abs().max() > 0.1  # the dynamics really moved the state
    for a, b in zip(recovered, initial):
        assert (a - b).abs().max().item() < tolerance


@pytest.mark.parametrize("block_class", REVERSIBLE_BLOCKS)
@pytest.mark.parametrize("norm", ["instance", "none"])
def test_reversible_gradients_equal_standard_autograd(block_class, norm):
    torch.manual_seed(4)
    block = block_class(4, num_steps=6, step_size=0.5, num_control_points=3, interpolation="linear", norm=norm).double()
    random_weights(block, 0.3)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    inputs = [x, *block.parameters()]
    standard = torch.autograd.grad((block(x) * weights).sum(), inputs)
    block.reversible = True
    output = block(x)
    assert output.grad_fn is not None and "ReversibleIntegration" in type(output.grad_fn).__name__ + str(
        output.grad_fn.next_functions
    )
    reversible = torch.autograd.grad((output * weights).sum(), inputs)
    for a, b in zip(standard, reversible):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def saved_activation_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward of ``block(x)``."""
    parameter_ids = {p.data_ptr() for p in block.parameters()}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameter_ids:
            saved[(tensor.data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).sum()
    return sum(saved.values())


@pytest.mark.parametrize("block_class", REVERSIBLE_BLOCKS)
def test_reversible_activation_memory_does_not_grow_with_the_steps(block_class):
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    stored = {}
    for reversible in (False, True):
        for steps in (4, 16):
            block = block_class(8, num_steps=steps, step_size=0.1, reversible=reversible)
            stored[reversible, steps] = saved_activation_bytes(block, x)
    state_bytes = x.numel() * 4
    assert stored[False, 16] > 3.5 * stored[False, 4]  # standard autograd grows linearly with depth
    assert stored[True, 16] == stored[True, 4] <= 2 * state_bytes  # reversible keeps only the final state
    assert stored[False, 16] > 16 * stored[True, 16]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_parabolic_forward_propagation_is_stable_theorem_1(activation):
    """‖Y(T) − Y_ε(T)‖ ≤ ‖Y(0) − Y_ε(0)‖ for monotone σ and δ_t·‖K‖² ≤ 1 (Ruthotto & Haber, Theorem 1)."""
    torch.manual_seed(5)
    block = ParabolicBlock(4, num_steps=20, num_control_points=5, norm="none", activation=activation).double()
    random_weights(block, 0.4)
    # ‖K‖ ≤ Σ over kernel taps of the spectral norm of the tap's channel matrix (zero-padded shifts have norm ≤ 1)
    kernels = block.layers[0].kernel.control_points.detach()
    bound = max(torch.linalg.matrix_norm(k.permute(2, 3, 0, 1), ord=2).sum().item() for k in kernels)
    block.step_size = 1.0 / bound**2
    for trial in range(10):
        y0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
        perturbation = torch.randn_like(y0) * 10.0 ** (trial % 5 - 2)
        with torch.no_grad():
            gap = (block(y0) - block(y0 + perturbation)).norm()
        assert gap <= perturbation.norm() * (1 + 1e-12)
    with torch.no_grad():  # and the flow does damp: the output gap is strictly smaller for a large perturbation
        assert (block(y0) - block(y0 + perturbation)).norm() < perturbation.norm()


def leapfrog_energy(layer: SymmetricLayer, previous: torch.Tensor, current: torch.Tensor, h: float) -> float:
    """Discrete energy conserved by leapfrog for F(Y) = −KᵀK Y: ‖(Y_{j+1} − Y_j)/h‖² + ⟨K Y_{j+1}, K Y_j⟩."""
    kernel = layer.kernel.control_points[0]
    return (((current - previous) / h) ** 2).sum().item() + (
        F.conv2d(current, kernel, padding=1) * F.conv2d(previous, kernel, padding=1)
    ).sum().item()


def test_second_order_block_conserves_the_discrete_energy_for_linear_sigma():
    torch.manual_seed(6)
    h = 0.2
    block = SecondOrderBlock(
        3, num_steps=1, step_size=h, num_control_points=1, norm="none", activation="identity"
    ).double()
    random_weights(block, 0.2)
    torch.nn.init.zeros_(block.layers[0].shift.control_points)  # F(Y) = −KᵀK Y exactly
    state = (torch.randn(1, 3, 8, 8, dtype=torch.float64),) * 2
    state = block.step(0, state)
    energies = []
    with torch.no_grad():
        for _ in range(150):
            state = block.step(0, state)
            energies.append(leapfrog_energy(block.layers[0], *state, h))
    assert min(energies) > 0
    assert max(energies) - min(energies) < 1e-9 * max(energies)


def test_second_order_block_keeps_the_energy_bounded_for_relu():
    """Y'' = −∇V with V = ½‖relu(KY + b)‖²: the symplectic leapfrog keeps ½‖Y'‖² + V(Y) near its start."""
    torch.manual_seed(7)
    h = 0.05
    block = SecondOrderBlock(3, num_steps=1, step_size=h, num_control_points=1, norm="none", activation="relu").double()
    random_weights(block, 0.3)
    layer = block.layers[0]
    kernel, shift = layer.kernel.control_points[0], layer.shift.control_points[0].view(1, -1, 1, 1)

    def energy(previous, current, following):
        velocity = (following - previous) / (2 * h)
        return (
            0.5 * (velocity**2).sum().item()
            + 0.5 * (torch.relu(F.conv2d(current, kernel, padding=1) + shift) ** 2).sum().item()
        )

    y0 = torch.randn(1, 3, 8, 8, dtype=torch.float64) * 3
    trajectory = [y0, y0 + h * torch.randn_like(y0)]
    with torch.no_grad():
        for _ in range(400):
            trajectory.append(block.step(0, (trajectory[-2], trajectory[-1]))[1])
    energies = [energy(*trajectory[j - 1 : j + 2]) for j in range(1, len(trajectory) - 1)]
    assert max(energies) < 1.05 * energies[0] and min(energies) > 0.95 * energies[0]


# -- multilevel refinement ------------------------------------------------------------------------
@pytest.mark.parametrize("block_class", [ParabolicBlock, HamiltonianBlock, SecondOrderBlock])
def test_refining_in_time_changes_the_output_little_and_reloads(block_class):
    torch.manual_seed(8)
    block = block_class(4, num_steps=4, step_size=0.25, interpolation="linear", num_control_points=3).double()
    random_weights(block, 0.3)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    outputs = []
    with torch.no_grad():
        for _ in range(3):
            outputs.append(block(x))
            block.refine_in_time(2)
    assert block.num_steps == 32 and block.step_size == 1 / 32 and block.layers[0].num_control_points == 17
    first_change = (outputs[1] - outputs[0]).norm().item()
    second_change = (outputs[2] - outputs[1]).norm().item()
    # a discretization change only: small against the block's own effect, and shrinking like O(δ_t)
    assert first_change < 0.3 * (outputs[0] - x).norm().item()
    assert second_change < 0.6 * first_change
    fresh = block_class(4, num_steps=4, step_size=0.25, interpolation="linear", num_control_points=3).double()
    fresh.load_state_dict(block.state_dict())
    assert fresh.num_steps == 32 and fresh.layers[0].num_control_points == 17
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), block(x))


# -- STL-10 network and modules ---------------------------------------------------------------------
def expected_parameter_count(
    dynamics: str, widths: list[int], in_channels: int, num_classes: int, steps: int, final_connector: bool = True
) -> int:
    count = in_channels * widths[0] * 9 + 2 * widths[0]  # opening conv (no bias) + BN
    for index, width in enumerate(widths):
        channels = width // 2 if dynamics == "hamiltonian" else width
        layers = 2 if dynamics == "hamiltonian" else 1
        count += layers * steps * (channels * channels * 9 + 2 * channels)  # kernel + scale + shift per step
        if index + 1 < len(widths):
            count += width * widths[index + 1] + 2 * widths[index + 1]  # 1×1 connector + BN
        elif final_connector:
            count += width * width + 2 * width  # the authors' width-preserving connector after the last unit
    return count + widths[-1] * num_classes + num_classes


@pytest.mark.parametrize("dynamics", ["parabolic", "hamiltonian", "second_order"])
def test_stl10_network_shapes_and_parameter_count(dynamics):
    network = PDECNN(dynamics)
    assert sum(p.numel() for p in network.parameters()) == expected_parameter_count(
        dynamics, [16, 64, 128, 256], 3, 10, 3
    )
    as_in_the_text = PDECNN(dynamics, final_connector=False)
    assert sum(p.numel() for p in as_in_the_text.parameters()) == expected_parameter_count(
        dynamics, [16, 64, 128, 256], 3, 10, 3, final_connector=False
    )
    widths, sizes = [], []

    def record(module, inputs, output):
        widths.append(output.shape[1])
        sizes.append(output.shape[-1])

    tiny = PDECNN(dynamics, widths=[4, 8, 8, 8])
    for unit in tiny.units:
        if not isinstance(unit, torch.nn.Sequential):
            unit.register_forward_hook(record)
    with torch.no_grad():
        assert tiny(torch.zeros(2, 3, 96, 96)).shape == (2, 10)
    assert widths == [4, 8, 8, 8] and sizes == [96, 48, 24, 12]
    assert f"stl10_{dynamics}" in ARCHITECTURES
    with pytest.raises(ValueError, match="`dynamics` must be one of"):
        PDECNN("elliptic")


@pytest.mark.parametrize("dynamics", ["parabolic", "second_order"])
def test_final_connector_normalizes_what_the_classifier_sees(dynamics):
    """The authors' final connector (BN + ReLU) keeps the classifier's input at unit scale at initialization;
    without it the last PDE block's output, and so the logits, grow with the width (the lr 0.1 divergence)."""
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    features = {}
    for final_connector in (True, False):
        network = PDECNN(dynamics, final_connector=final_connector).train()
        network.head.register_forward_hook(
            lambda m, inputs, out, key=final_connector: features.update({key: inputs[0]})
        )
        with torch.no_grad():
            network(images)
    last = PDECNN(dynamics).units[-1]
    assert [type(m) for m in last] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert last[0].weight.shape == (256, 256, 1, 1)
    # ReLU of a batch-normalized unit Gaussian has second moment 1/2
    assert 0.4 < features[True].pow(2).mean().item() < 0.6
    assert features[False].pow(2).mean().item() > 10 * features[True].pow(2).mean().item()
    with pytest.raises(TypeError, match="`final_connector` must be true or false"):
        PDECNN(dynamics, final_connector="yes")


def test_paper_learning_rate_trains_on_real_digits_only_with_the_final_connector():
    """SGD at the paper's lr 0.1 (momentum 0.9, weight decay 5e-4, box [-1, 1]) on real images (scikit-learn's
    bundled digits, upsampled to 16×16): the default network learns, the one of the paper's text diverges.
    Measured: loss 2.46 → 0.41 with the final connector, 6.6 → 1.3·10⁵ without (bench/check_stl10_lr.py: MNIST)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = F.interpolate(
        torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=16, mode="bilinear"
    )
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    losses = {}
    for final_connector in (True, False):
        torch.manual_seed(0)
        network = PDECNN("parabolic", in_channels=1, final_connector=final_connector)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        batches = torch.Generator().manual_seed(0)
        losses[final_connector] = []
        for _ in range(30):
            index = torch.randint(0, len(labels), (64,), generator=batches)
            loss = F.cross_entropy(network(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, parameter in network.named_parameters():
                    if name.endswith("control_points"):
                        parameter.clamp_(-1.0, 1.0)
            losses[final_connector].append(loss.item())
    trained = losses[True]
    assert max(trained) < 1.5 * trained[0] and sum(trained[-10:]) / 10 < 0.5 * trained[0]
    assert max(losses[False]) > 100 * losses[False][0]


def test_too_small_images_are_rejected_with_the_minimum_size():
    network = PDECNN("parabolic", widths=[4, 8, 8, 8])
    with pytest.raises(ValueError, match=r"8×8 pixels are too small for 4 units.*at least 16×16"):
        network(torch.zeros(2, 3, 8, 8))
    assert network(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("dynamics", ["parabolic", "hamiltonian"])
def test_default_initialization_is_the_authors_meganet_rule(dynamics):
    """Meganet.m (cnnDriver.m, convKernel.initTheta): kernels 0.1·N(0,1) with outliers redrawn and clipped to
    ±0.2; the classifier 0.1·N(0,1) clipped to ±0.2; one PDE kernel for every control point (zero TV)."""
    torch.manual_seed(0)
    network = PDECNN(dynamics, widths=[16, 64], num_steps=3)
    convs = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    kernels = [p for n, p in network.named_parameters() if n.endswith("kernel.control_points")]
    everything = torch.cat([t.detach().flatten() for t in convs + kernels])
    assert everything.abs().max() <= 0.2
    clipped = (everything.abs() == 0.2).float().mean().item()
    # P(|0.1 z| > 0.2) = 4.55%; of those, a redraw from N(0, 1) lands beyond ±0.2 with probability 84%
    assert 0.02 < clipped < 0.06
    assert 0.07 < everything.std().item() < 0.11
    assert all(torch.equal(k[0], k[j]) for k in kernels for j in range(1, k.shape[0]))
    classifier = network.head[-1]
    assert torch.cat([classifier.weight.flatten(), classifier.bias]).abs().max() <= 0.2
    with pytest.raises(ValueError, match="`kernel_std` applies to init='he' only"):
        PDECNN(dynamics, kernel_std=0.1)
    with pytest.raises(ValueError, match="`init` must be one of"):
        PDECNN(dynamics, init="xavier")
    he = PDECNN(dynamics, widths=[16, 64], init="he", kernel_std=0.3)
    assert (
        torch.cat([p.detach().flatten() for n, p in he.named_parameters() if n.endswith("kernel.control_points")])
        .abs()
        .max()
        > 0.2
    )


def test_modules_train_one_step_and_reload_from_checkpoint(tmp_path):

    data = STL10DataModule(**fake_stl10(tmp_path / "data"))
    for module_class, reversible in (
        (ParabolicCNNModule, False),
        (HamiltonianCNNModule, True),
        (SecondOrderCNNModule, True),
    ):
        model = module_class(network=dict(widths=[4, 8], num_steps=2, reversible=reversible), optimizer="sgd", lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        trainer = quiet_trainer(max_steps=1, limit_val_batches=1)
        trainer.fit(model, datamodule=data)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        path = tmp_path / f"{module_class.__name__}.ckpt"
        trainer.save_checkpoint(path)
        reloaded = module_class.load_from_checkpoint(path)
        assert reloaded.hparams.network["widths"] == [4, 8] and reloaded.hparams.network["reversible"] == reversible
        x = torch.randn(2, 3, 96, 96)
        model.eval(), reloaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), model(x))


# -- STL-10 data ------------------------------------------------------------------------------------
def test_stl10_reads_the_binary_format_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3, 96, 96), dtype=np.uint8)
    labels = np.arange(20) % 10
    folder = tmp_path / "stl10_binary"
    write_stl10_split(folder, "train", images, labels)
    write_stl10_split(folder, "test", images[:10], labels[:10])
    data = STL10DataModule(data_dir=str(tmp_path), normalize=False, val_size=10, batch_size=4)
    data.setup("test")
    image, label = data.test_set[3]
    assert label == 3
    torch.testing.assert_close(image, torch.from_numpy(images[3]).float() / 255)


def test_stl10_train_fraction_is_class_balanced_and_keeps_the_validation_set(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 20)[rng.permutation(200)]
    folder = tmp_path / "stl10_binary"
    write_stl10_split(folder, "train", np.zeros((200, 3, 96, 96), np.uint8), labels)
    write_stl10_split(folder, "test", np.zeros((10, 3, 96, 96), np.uint8), np.arange(10))
    sets = {}
    for fraction in (1.0, 0.5, 0.1):
        data = STL10DataModule(data_dir=str(tmp_path), val_size=20, train_fraction=fraction, batch_size=4)
        data.setup("fit")
        train_labels = labels[data.train_set.indices]
        assert np.bincount(train_labels, minlength=10).tolist() == [round(fraction * 18)] * 10
        assert np.bincount(labels[data.val_set.indices], minlength=10).tolist() == [2] * 10
        assert not set(data.train_set.indices) & set(data.val_set.indices)
        sets[fraction] = (set(data.train_set.indices), data.val_set.indices)
    assert sets[0.1][1] == sets[1.0][1] and sets[0.1][0] <= sets[0.5][0] <= sets[1.0][0]


def test_stl10_errors_are_actionable(tmp_path):
    with pytest.raises(ValueError, match=r"`train_fraction` must be in \(0, 1\].*got 0"):
        STL10DataModule(train_fraction=0)
    data = STL10DataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"STL-10 was not found.*train_X\.bin.*download: true"):
        data.setup("fit")
