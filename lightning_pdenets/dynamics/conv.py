"""Convolutional, time-dependent vector field of the ODE-Net image classifier.

Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018
(the ``ODEfunc`` of their MNIST experiment): norm → ReLU → conv([y, t]) → norm → ReLU → conv([y, t]) → norm.
The activation may be a smooth one instead (``activation: silu``; see :mod:`lightning_pdenets.dynamics.activations`
for why adaptive solvers take larger steps on smooth fields).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_pdenets.dynamics.activations import check_activation

__all__ = ["ConcatConv2d", "ConvODEFunc", "group_norm"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels) groups, as in Chen et al.'s classifier."""
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """3×3 convolution whose input gets the time t appended as one constant channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=padding)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        time_channel = torch.ones_like(y[:, :1]) * t
        return self.conv(torch.cat([time_channel, y], dim=1))


class ConvODEFunc(nn.Module):
    """f(t, y) for feature maps of shape (N, channels, H, W); the output has the input's shape.

    Args:
        channels: Channels of the state (and of every layer).
        activation: One of :data:`~lightning_pdenets.dynamics.activations.ACTIVATIONS` (Chen et al.: ``relu``).
    """

    def __init__(self, channels: int, activation: str = "relu") -> None:
        super().__init__()
        self.activation = activation
        self.act = check_activation(activation)()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, self.act(self.norm1(y)))
        out = self.conv2(t, self.act(self.norm2(out)))
        return self.norm3(out)
