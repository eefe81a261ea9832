"""TimeTVRegularization, WeightBoxProjection and MultilevelTraining, on protocol-only toy modules and PDE-CNNs."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.callbacks import MultilevelTraining, TimeTVRegularization, WeightBoxProjection
from lightning_pdenets.callbacks.time_tv import collect_time_dependent_parameters
from lightning_pdenets.models import ParabolicCNNModule
from tests.trainers import quiet_trainer

THETA = [[0.5, -1.0], [0.25, 0.0], [1.0, 2.0], [1.0, 2.0]]


class ToyTimeWeights(nn.Module):
    """A foreign module following the TimeDependentWeights protocol (no lightning_pdenets class involved)."""

    def __init__(self, time_step: float = 0.5) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(THETA, dtype=torch.float64))
        self.time_step = time_step

    def time_dependent_parameters(self) -> list[torch.Tensor]:
        return [self.theta]

    def weight_time_step(self) -> float:
        return self.time_step


class ToyModule(pl.LightningModule):
    def __init__(self, manual: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.weights = ToyTimeWeights()
        self.other = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
        self.automatic_optimization = not manual
        self.lr = lr

    def loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        prediction = (x * (self.weights.theta.sum(0) + self.other)).sum(1)
        return ((prediction - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def toy_batches(count: int = 2) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        [
            torch.randn(4, 2, generator=generator, dtype=torch.float64),
            torch.randn(4, generator=generator, dtype=torch.float64),
        ]
        for _ in range(count)
    ]


def toy_loader(batches: list[list[torch.Tensor]]) -> DataLoader:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


# -- TimeTVRegularization -----------------------------------------------------------------------
def test_tv_value_matches_the_formula_on_known_weights():
    alpha, epsilon, h = 3e-4, 1e-3, 0.5
    expected = alpha * sum(
        h * math.sqrt(((THETA[k + 1][i] - THETA[k][i]) / h) ** 2 + epsilon) for k in range(3) for i in range(2)
    )
    module = nn.Sequential(ToyTimeWeights(h))
    value = TimeTVRegularization(alpha, epsilon).penalty(module)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    # weights constant in time leave only the ε floor h·√ε per entry and interval
    with torch.no_grad():
        module[0].theta.copy_(torch.ones(4, 2))
    assert TimeTVRegularization(alpha, epsilon).penalty(module).item() == pytest.approx(
        alpha * 6 * h * math.sqrt(epsilon)
    )


@pytest.mark.parametrize("manual,accumulate", [(False, 1), (False, 2), (True, 1)])
def test_tv_gradient_is_added_once_per_optimizer_step(manual, accumulate):
    alpha, epsilon, lr = 0.05, 1e-3, 0.1
    batches = toy_batches(2)
    model = ToyModule(manual=manual, lr=lr)
    reference = copy.deepcopy(model)
    used = batches if accumulate == 2 else batches[:1]
    data_loss = sum(reference.loss(b) for b in used) / len(used)
    objective = data_loss + TimeTVRegularization(alpha, epsilon).penalty(reference)
    grads = torch.autograd.grad(objective, [reference.weights.theta, reference.other])
    expected = [p.detach() - lr * g for p, g in zip((reference.weights.theta, reference.other), grads)]

    trainer = quiet_trainer(
        max_steps=1,
        limit_train_batches=len(used),
        accumulate_grad_batches=accumulate,
        callbacks=[TimeTVRegularization(alpha, epsilon)],
    )
    trainer.fit(model, toy_loader(batches))
    torch.testing.assert_close(model.weights.theta.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.other.detach(), expected[1], rtol=1e-12, atol=1e-12)
    logged = trainer.callback_metrics["train/tv_time"].item()
    assert logged == pytest.approx(TimeTVRegularization(alpha, epsilon).penalty(reference).item(), rel=1e-6)


def test_tv_callback_finds_every_weight_of_a_pde_cnn_once():
    model = ParabolicCNNModule(network=dict(widths=[4, 8], num_steps=3))
    pairs = collect_time_dependent_parameters(model)
    assert len(pairs) == 2 * 3  # two blocks × (kernel, scale, shift)
    assert all(t.shape[0] == 3 and h == pytest.approx(1.0) for t, h in pairs)


def test_tv_callback_validates_arguments_and_needs_the_protocol():
    with pytest.raises(ValueError, match="`alpha` must be a finite number >= 0, got -1"):
        TimeTVRegularization(alpha=-1)
    with pytest.raises(ValueError, match="`epsilon` must be a finite number > 0, got 0"):
        TimeTVRegularization(epsilon=0)

    class Plain(ToyModule):
        def __init__(self):
            super().__init__()
            self.weights = nn.Linear(2, 2).double()
            self.weights.theta = nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))

    with pytest.raises(ValueError, match="found no module following the TimeDependentWeights protocol"):
        quiet_trainer(max_steps=1, callbacks=[TimeTVRegularization()]).fit(Plain(), toy_loader(toy_batches(1)))


# -- WeightBoxProjection ------------------------------------------------------------------------
@pytest.mark.parametrize("manual", [False, True])
def test_box_projection_clips_the_chosen_parameters_after_every_step(manual):
    model = ToyModule(manual=manual, lr=50.0)  # steps far outside the box
    seen_inside = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_inside.append(bool((pl_module.weights.theta.abs() <= 0.5).all()))

    trainer = quiet_trainer(max_steps=3, callbacks=[WeightBoxProjection(lower=-0.5, upper=0.5), Watch()])
    trainer.fit(model, toy_loader(toy_batches(3)))
    assert seen_inside == [True, True, True]
    assert model.other.abs().max() > 0.5  # not a time-dependent weight: untouched


def test_box_projection_by_name_patterns():
    model = ToyModule(lr=50.0)
    trainer = quiet_trainer(max_steps=2, callbacks=[WeightBoxProjection(parameter_names=["oth*"])])
    trainer.fit(model, toy_loader(toy_batches(2)))
    assert model.other.abs().max() <= 1.0
    assert model.weights.theta.abs().max() > 1.0


def test_box_projection_validates_arguments():
    with pytest.raises(ValueError, match="`lower` must be smaller than `upper`, got lower=1, upper=-1"):
        WeightBoxProjection(lower=1, upper=-1)
    with pytest.raises(ValueError, match="`parameter_names` must be None or a list"):
        WeightBoxProjection(parameter_names="theta")
    with pytest.raises(ValueError, match=r"no parameter matching \['nothing'\]"):
        quiet_trainer(max_steps=1, callbacks=[WeightBoxProjection(parameter_names=["nothing"])]).fit(
            ToyModule(), toy_loader(toy_batches(1))
        )


# -- MultilevelTraining ---------------------------------------------------------------------------
def image_loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    return DataLoader(TensorDataset(x, torch.arange(8) % 10), batch_size=4)


def small_pde_cnn() -> ParabolicCNNModule:
    torch.manual_seed(0)
    return ParabolicCNNModule(
        network=dict(
            widths=[4, 4],
            num_steps=4,
            step_size=0.25,
            interpolation="linear",
            num_control_points=2,
            final_connector=False,
        ),  # probes read the last PDE block's output directly
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
    )


class ProbeOutputs(Callback):
    """Network output on a fixed probe at the end of each epoch and at the start of the next (after refinement)."""

    def __init__(self) -> None:
        self.probe = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        self.end, self.start, self.momentum_kept = {}, {}, {}

    def output(self, pl_module):
        pl_module.eval()  # batch norm with running statistics: deterministic between the two probes
        with torch.no_grad():
            features = pl_module.network.units(pl_module.network.opening(self.probe))
        pl_module.train()
        return features

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = self.output(pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = self.output(pl_module)
        state = trainer.optimizers[0].state
        kernel = pl_module.network.units[0].layers[0].kernel.control_points
        self.momentum_kept[trainer.current_epoch] = (kernel in state, pl_module.network.opening[0].weight in state)


def test_multilevel_doubles_steps_and_the_output_changes_little_at_the_switch():
    model = small_pde_cnn()
    probe = ProbeOutputs()
    trainer = quiet_trainer(max_epochs=2, callbacks=[MultilevelTraining(refine_epochs=[1]), probe])
    model.train()
    trainer.fit(model, image_loader())
    blocks = [model.network.units[0], model.network.units[2]]
    assert [b.num_steps for b in blocks] == [8, 8] and all(b.step_size == 0.125 for b in blocks)
    assert blocks[0].layers[0].num_control_points == 3
    features_before, features_after = probe.end[0], probe.start[1]
    change = ((features_after - features_before).norm() / features_before.norm()).item()
    assert 0 < change < 0.2  # only the discretization of the same θ(t) changed
    # optimizer state of the resized weights was dropped, the others' momentum kept
    assert probe.momentum_kept[1] == (False, True)
    assert trainer.callback_metrics["train/num_time_steps"].item() == 8


def test_multilevel_resumes_from_a_refined_checkpoint_without_refining_twice(tmp_path):
    model = small_pde_cnn()
    trainer = quiet_trainer(max_epochs=2, callbacks=[MultilevelTraining(refine_epochs=[1])])
    trainer.fit(model, image_loader())
    path = tmp_path / "refined.ckpt"
    trainer.save_checkpoint(path)
    resumed = small_pde_cnn()
    callback = MultilevelTraining(refine_epochs=[1])
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(resumed, image_loader(), ckpt_path=str(path))
    assert callback.applied_epochs == [1]
    assert resumed.network.units[0].num_steps == 8 and resumed.network.units[0].layers[0].num_control_points == 3


def test_multilevel_selects_blocks_by_name_and_validates():
    model = small_pde_cnn()
    trainer = quiet_trainer(max_epochs=2, callbacks=[MultilevelTraining([1], block_names=["network.units.2"])])
    trainer.fit(model, image_loader())
    assert model.network.units[0].num_steps == 4 and model.network.units[2].num_steps == 8
    with pytest.raises(ValueError, match="`refine_epochs` must be a non-empty list of epochs >= 1, got \\[0\\]"):
        MultilevelTraining([0])
    with pytest.raises(ValueError, match="`factor` must be an integer >= 2, got 1"):
        MultilevelTraining([1], factor=1)
    with pytest.raises(ValueError, match=r"no TimeSteppingBlock matching .*available blocks: \['network.units.0'"):
        quiet_trainer(max_epochs=1, callbacks=[MultilevelTraining([1], block_names=["head"])]).fit(
            small_pde_cnn(), image_loader()
        )
