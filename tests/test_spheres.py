"""Concentric-spheres data and the neural-ODE classifiers of Ott et al. (ICLR 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_pdenets.architectures.registry import create_architecture
from lightning_pdenets.data import ConcentricSpheresDataModule
from lightning_pdenets.data.spheres import sample_spheres
from lightning_pdenets.models import ImageODEClassifierModule, VectorODEClassifierModule
from tests.trainers import quiet_trainer


@pytest.mark.parametrize("dim", [2, 3, 10, 900])
def test_ott_shells_radii_labels_and_sizes(dim):
    data = ConcentricSpheresDataModule(dim=dim, variant="ott")
    data.setup()
    sizes = {split: len(data.splits[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 2000, "val": 1000, "test": 1000}
    x, y = data.splits["train"].tensors
    assert x.shape == (2000, dim) and x.dtype == torch.float32
    r = x.double().norm(dim=1)
    shell = torch.bucketize(r, torch.tensor([0.2, 0.35], dtype=torch.float64))
    assert torch.equal(y, torch.tensor([0, 1, 0])[shell])  # class 0, 1, 0 from the inside out
    for index, (low, high) in enumerate([(0.1, 0.15), (0.25, 0.3), (0.4, 0.45)]):
        radii = r[shell == index]
        assert radii.min() >= low - 1e-6 and radii.max() <= high + 1e-6
    assert (y == 1).sum() == 666  # 2,000 points in three equal shells (the remainder goes to the first)


def test_dupont_ball_against_annulus_counts():
    x, y = sample_spheres(2000, 2, "dupont", torch.Generator().manual_seed(0))
    r = x.norm(dim=1)
    assert int((y == 0).sum()) == 500 and int((y == 1).sum()) == 1500
    assert r[y == 0].max() <= 0.5 + 1e-6 and r[y == 1].min() >= 1.0 - 1e-6 and r[y == 1].max() <= 1.5 + 1e-6


def test_radius_follows_the_u_to_the_one_over_dim_law_and_directions_are_uniform():
    dim = 3
    x, _ = sample_spheres(30000, dim, "dupont", torch.Generator().manual_seed(1))
    r = x.double().norm(dim=1)
    inner = r[r <= 0.5]
    # r = 0.5·U^(1/3) in the ball: P(r <= 0.25) = (0.5)^3 = 1/8.
    assert (inner <= 0.25).double().mean().item() == pytest.approx(1 / 8, abs=0.01)
    # Uniform directions: each coordinate of x/|x| has mean 0 and variance 1/dim.
    directions = x.double() / r[:, None]
    assert directions.mean(0).abs().max().item() < 0.02
    assert directions.var(0).numpy() == pytest.approx([1 / dim] * dim, abs=0.01)


def test_seeded_reproducible_and_splits_differ():
    first, second = ConcentricSpheresDataModule(seed=3), ConcentricSpheresDataModule(seed=3)
    first.setup()
    second.setup()
    assert torch.equal(first.splits["train"].tensors[0], second.splits["train"].tensors[0])
    assert not torch.equal(first.splits["val"].tensors[0], first.splits["test"].tensors[0])
    other = ConcentricSpheresDataModule(seed=4)
    other.setup()
    assert not torch.equal(first.splits["train"].tensors[0], other.splits["train"].tensors[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="ring"), r"`variant` must be one of \['dupont', 'ott'\], got 'ring'"),
        (dict(dim=0), r"`dim` must be an integer >= 1, got 0"),
        (dict(num_train=2), r"`num_train` must be an integer >= 3, got 2"),
        (dict(batch_size=0), r"`batch_size` must be .*got 0"),
    ],
)
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConcentricSpheresDataModule(**kwargs)


def test_vector_classifier_is_ode_then_linear_with_expected_parameter_count():
    module = VectorODEClassifierModule(
        solver=dict(method="rk4", step_size=0.5), input_dim=3, network=dict(hidden_width=16, num_hidden_layers=2)
    )
    field = (3 * 16 + 16) + (16 * 16 + 16) + (16 * 3 + 3)
    assert sum(p.numel() for p in module.parameters()) == field + (3 * 2 + 2)
    x = torch.randn(5, 3)
    block = module.network.ode
    # The output is the linear layer applied to the ODE solution at t1 (checked against an independent RK4 loop).
    y, h = x.clone(), 0.5
    with torch.no_grad():
        for step in range(2):
            t = step * h
            k1 = block.vector_field(t, y)
            k2 = block.vector_field(t + h / 3, y + h * k1 / 3)
            k3 = block.vector_field(t + 2 * h / 3, y + h * (k2 - k1 / 3))
            k4 = block.vector_field(t + h, y + h * (k1 - k2 + k3))
            y = y + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8  # torchdiffeq's "rk4" is the 3/8 rule
        assert torch.allclose(module(x), module.network.classifier(y), atol=1e-5)


def test_image_classifier_keeps_resolution_and_uses_1x1_3x3_1x1_field():
    module = ImageODEClassifierModule(
        solver=dict(step_size=0.5), in_channels=3, image_size=8, num_classes=10, network=dict(hidden_channels=4)
    )
    convs = [m for m in module.network.ode.field.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert module.network.classifier.in_features == 3 * 8 * 8  # no downsampling before the linear classifier
    assert module(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"expected inputs of shape \(N, 3, 8, 8\)"):
        module(torch.randn(2, 3, 16, 16))


def test_architectures_are_registered():
    assert create_architecture("vector_odenet", input_dim=2, num_classes=2).classifier.out_features == 2
    net = create_architecture("image_odenet", hidden_channels=4)
    assert math.prod(net.input_shape) == 3 * 32 * 32


def test_load_from_checkpoint_restores_hyperparameters(tmp_path):

    module = VectorODEClassifierModule(
        solver=dict(method="midpoint", step_size=0.25), input_dim=2, network=dict(hidden_width=8)
    )
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, num_sanity_val_steps=0)
    data = ConcentricSpheresDataModule(num_train=16, num_val=8, num_test=8, batch_size=8)
    trainer.fit(module, data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = VectorODEClassifierModule.load_from_checkpoint(path)
    x = torch.randn(4, 2)
    assert torch.allclose(restored(x), module(x))
    assert restored.network.ode.solver_settings()["method"] == "midpoint"
