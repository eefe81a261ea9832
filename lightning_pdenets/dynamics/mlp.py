"""Fully connected vector field for neural ODEs on vectors (e.g. the concentric-spheres data).

Dupont, Doucet & Teh, "Augmented Neural ODEs", NeurIPS 2019, and Ott et al., "ResNet After All:
Neural ODEs and Their Numerical Solution", ICLR 2021, both use a small MLP as f(t, y).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_pdenets.dynamics.activations import check_activation
from lightning_pdenets.validation import check_positive_int

__all__ = ["MLPODEFunc"]


class MLPODEFunc(nn.Module):
    """f(t, y) = MLP([y, t]) (or MLP(y) when autonomous) for inputs of shape (N, dim).

    Args:
        dim: Size of the state y.
        hidden_width: Units of each hidden layer.
        num_hidden_layers: Hidden layers (>= 1).
        activation: One of :data:`~lightning_pdenets.dynamics.activations.ACTIVATIONS`.
        time_dependent: Append t to the input of the first layer.
    """

    def __init__(
        self,
        dim: int,
        hidden_width: int = 32,
        num_hidden_layers: int = 2,
        activation: str = "relu",
        time_dependent: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_width", hidden_width), ("num_hidden_layers", num_hidden_layers)):
            check_positive_int(value, name)
        act = check_activation(activation)
        self.dim = dim
        self.time_dependent = time_dependent
        layers: list[nn.Module] = [nn.Linear(dim + int(time_dependent), hidden_width), act()]
        for _ in range(num_hidden_layers - 1):
            layers += [nn.Linear(hidden_width, hidden_width), act()]
        layers.append(nn.Linear(hidden_width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            y = torch.cat([y, torch.ones_like(y[:, :1]) * t], dim=1)
        return self.net(y)
