"""The MNIST/SVHN classifiers of Chen et al.'s comparison: ResNet, RK-Net and ODE-Net.

Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018,
Table 1 (reused as Table 2 of Kim et al., "PDE-regularized neural networks for image
classification"). All three share a downsampling stem and a norm/ReLU/pool/linear head; they
differ only in the feature part: six residual blocks, or one ODE block solved with fixed-step
RK4 (RK-Net) or with adaptive dopri5 and the adjoint method (ODE-Net).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.ode import ODEBlock
from lightning_pdenets.blocks.residual import ResBlock
from lightning_pdenets.dynamics.conv import ConvODEFunc, group_norm
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.solvers import SolverConfig
from lightning_pdenets.validation import check_positive_int

__all__ = [
    "ODENET_SOLVER",
    "RKNET_SOLVER",
    "StemFeatureHeadClassifier",
    "classifier_head",
    "downsampling_stem",
    "odenet_chen",
    "resnet_chen",
    "stem_output_size",
]

_TINY = dict(width=8, num_downsamples=1)

ODENET_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "adjoint": True}
"""ODE-Net's solver (Chen et al.): dopri5 at rtol = atol = 1e-3, backpropagated with the adjoint method."""

RKNET_SOLVER: dict[str, Any] = {"method": "rk4", "step_size": 0.25, "adjoint": False}
"""RK-Net's solver (Chen et al.): four RK4 steps over [0, 1], backpropagated through the solver."""


def downsampling_stem(in_channels: int, width: int, num_downsamples: int = 2) -> nn.Sequential:
    """Chen et al.'s "conv" stem: 3×3 conv, then ``num_downsamples`` × (norm, ReLU, 4×4 stride-2 conv).

    MNIST 28×28 → 26×26 → 13×13 → 6×6 with the default two downsamplings.
    """
    check_positive_int(in_channels, "in_channels")
    check_positive_int(width, "width")
    check_positive_int(num_downsamples, "num_downsamples", minimum=0)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1)]
    for _ in range(num_downsamples):
        layers += [group_norm(width), nn.ReLU(inplace=True), nn.Conv2d(width, width, 4, 2, 1)]
    return nn.Sequential(*layers)


def stem_output_size(image_size: int, num_downsamples: int) -> tuple[int, int]:
    """(H, W) of :func:`downsampling_stem`'s feature maps for square images of side ``image_size`` (28 -> 6 on MNIST).

    Raises:
        ConfigurationError: (a ``ValueError``) when the images are too small for ``num_downsamples`` (naming both and
            the fix).
    """
    check_positive_int(image_size, "image_size")
    side = _stem_side(image_size, num_downsamples)
    if side < 1:
        fitting = [n for n in range(num_downsamples) if _stem_side(image_size, n) >= 1]
        fix = f"use `num_downsamples` <= {fitting[-1]}" if fitting else "use larger images"
        raise ConfigurationError(
            f"`image_size`={image_size} is too small for `num_downsamples`={num_downsamples}: the feature maps "
            f"would vanish; {fix}."
        )
    return side, side


def _stem_side(image_size: int, num_downsamples: int) -> int:
    side = image_size - 2  # the stem's unpadded 3x3 convolution
    for _ in range(num_downsamples):
        side = (side + 2 - 4) // 2 + 1  # 4x4, stride 2, padding 1
    return side


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """norm → ReLU → global average pool → linear."""
    return nn.Sequential(
        group_norm(width), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


class StemFeatureHeadClassifier(nn.Module):
    """stem → feature part → head, with input validation at the boundary.

    Args:
        feature: Shape-preserving module on (N, width, H', W') feature maps.
        in_channels: Channels of the input images (1 for MNIST, 3 for SVHN).
        num_classes: Number of classes.
        width: Channels of the feature maps.
        num_downsamples: Stride-2 convolutions in the stem.
    """

    def __init__(
        self, feature: nn.Module, in_channels: int, num_classes: int, width: int, num_downsamples: int
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        self.num_downsamples = num_downsamples
        self.in_channels = in_channels
        self.stem = downsampling_stem(in_channels, width, num_downsamples)
        self.feature = feature
        self.head = classifier_head(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps after the feature part, before the head."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"set `in_channels` to the dataset's number of channels."
            )
        stem_output_size(min(x.shape[-2:]), self.num_downsamples)  # too small: a ConfigurationError, not a bare
        # "kernel size can't be greater than actual input size" from the stem's convolution
        return self.feature(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_architecture("resnet_chen", input_shape=(1, 28, 28), tiny_kwargs=dict(_TINY, num_blocks=2))
def resnet_chen(
    in_channels: int = 1, num_classes: int = 10, width: int = 64, num_downsamples: int = 2, num_blocks: int = 6
) -> StemFeatureHeadClassifier:
    """ResNet baseline: stem, ``num_blocks`` residual blocks, head (0.58M parameters on MNIST)."""
    check_positive_int(num_blocks, "num_blocks")
    check_positive_int(width, "width")
    feature = nn.Sequential(*[ResBlock(width) for _ in range(num_blocks)])
    return StemFeatureHeadClassifier(feature, in_channels, num_classes, width, num_downsamples)


@register_architecture(
    "odenet_chen", input_shape=(1, 28, 28), tiny_kwargs=dict(_TINY, solver=dict(method="rk4", step_size=0.5))
)
def odenet_chen(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 64,
    num_downsamples: int = 2,
    solver: SolverConfig | Mapping[str, Any] | None = None,
    activation: str = "relu",
) -> StemFeatureHeadClassifier:
    """ODE-Net or RK-Net: stem, one ODE block, head.

    Args:
        solver: How the ODE block integrates (a :class:`SolverConfig` or a dict of its fields, over
            :data:`ODENET_SOLVER`, Chen et al.'s dopri5 with the adjoint method); RK-Net is
            ``{method: rk4, step_size: 0.25}``.
        activation: The vector field's activation, one of :data:`~lightning_pdenets.dynamics.activations.ACTIVATIONS`
            (Chen et al.'s ``relu``; ``silu`` or ``softplus`` make f smooth, which adaptive solvers step through
            faster).
        Others: as in :func:`resnet_chen`.
    """
    check_positive_int(width, "width")
    block = ODEBlock(ConvODEFunc(width, activation), SolverConfig.from_options(solver, defaults=ODENET_SOLVER))
    return StemFeatureHeadClassifier(block, in_channels, num_classes, width, num_downsamples)
