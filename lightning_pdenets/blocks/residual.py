"""Residual block of the ResNet baseline in Chen et al.'s MNIST comparison."""

from __future__ import annotations

import torch
from torch import nn

from lightning_pdenets.dynamics.conv import group_norm

__all__ = ["ResBlock"]


class ResBlock(nn.Module):
    """Pre-activation residual block y + conv(relu(norm(conv(relu(norm(y)))))), shape-preserving.

    He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016; the GroupNorm
    variant of Chen et al., NeurIPS 2018.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.norm1(y)))
        out = self.conv2(torch.relu(self.norm2(out)))
        return y + out
