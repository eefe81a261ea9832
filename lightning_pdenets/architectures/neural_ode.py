"""Neural-ODE classifiers of Ott et al.'s solver-dependence experiments.

Ott, Katiyar, Hennig & Tiemann, "ResNet After All: Neural ODEs and Their Numerical Solution",
ICLR 2021. Both classifiers integrate an ODE directly on the input (no downsampling, no
augmentation) and read the class from the final state with one linear layer, so any accuracy
the model reaches beyond what a homeomorphism allows (Dupont et al. 2019) comes from the
discretization: the effect these experiments study.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.ode import ODEBlock
from lightning_pdenets.dynamics.activations import check_activation
from lightning_pdenets.dynamics.mlp import MLPODEFunc
from lightning_pdenets.solvers import SolverConfig
from lightning_pdenets.validation import check_positive_int

__all__ = ["OTT_SOLVER", "ConvBottleneckODEFunc", "ODEThenLinear", "image_odenet", "vector_odenet"]


OTT_SOLVER: dict[str, Any] = {"method": "euler", "step_size": 0.1}
"""Default solver of Ott et al.'s classifiers: explicit Euler with ten steps over [0, 1]."""


class ODEThenLinear(nn.Module):
    """ODE block on the raw input, then flatten and one linear layer.

    Args:
        block: ODE block mapping inputs to states of the same shape.
        input_shape: Per-sample input shape, (D,) or (C, H, W).
        num_classes: Number of classes.
    """

    def __init__(self, block: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        self.input_shape = tuple(input_shape)
        self.ode = block
        self.classifier = nn.Linear(int(torch.Size(self.input_shape).numel()), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected inputs of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}."
            )
        return self.classifier(self.ode(x).flatten(1))


class ConvBottleneckODEFunc(nn.Module):
    """f(y) = conv1×1 → act → conv3×3 → act → conv1×1 on images, keeping their shape (Ott et al., CIFAR-10).

    Args:
        channels: Channels of the state (3 for raw RGB images).
        hidden_channels: Channels inside the bottleneck.
        activation: Activation name (see :data:`lightning_pdenets.dynamics.activations.ACTIVATIONS`).
    """

    def __init__(self, channels: int = 3, hidden_channels: int = 64, activation: str = "relu") -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        check_positive_int(hidden_channels, "hidden_channels")
        act = check_activation(activation)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 1),
            act(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            act(),
            nn.Conv2d(hidden_channels, channels, 1),
        )

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


@register_architecture(
    "vector_odenet", input_shape=(2,), tiny_kwargs=dict(hidden_width=8, solver=dict(method="euler", step_size=0.5))
)
def vector_odenet(
    input_dim: int = 2,
    num_classes: int = 2,
    hidden_width: int = 32,
    num_hidden_layers: int = 2,
    activation: str = "relu",
    time_dependent: bool = False,
    solver: SolverConfig | Mapping[str, Any] | None = None,
) -> ODEThenLinear:
    """Neural-ODE classifier for vectors: an MLP vector field on R^input_dim, then a linear layer."""
    field = MLPODEFunc(input_dim, hidden_width, num_hidden_layers, activation, time_dependent)
    block = ODEBlock(field, SolverConfig.from_options(solver, defaults=OTT_SOLVER))
    return ODEThenLinear(block, (input_dim,), num_classes)


@register_architecture(
    "image_odenet",
    input_shape=(3, 32, 32),
    tiny_kwargs=dict(hidden_channels=4, solver=dict(method="euler", step_size=0.5)),
)
def image_odenet(
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    hidden_channels: int = 64,
    activation: str = "relu",
    solver: SolverConfig | Mapping[str, Any] | None = None,
) -> ODEThenLinear:
    """Neural-ODE classifier for images without downsampling: a 1×1→3×3→1×1 conv field on the raw image, then linear."""
    check_positive_int(image_size, "image_size")
    field = ConvBottleneckODEFunc(in_channels, hidden_channels, activation)
    block = ODEBlock(field, SolverConfig.from_options(solver, defaults=OTT_SOLVER))
    return ODEThenLinear(block, (in_channels, image_size, image_size), num_classes)
