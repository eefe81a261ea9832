"""Pre-activation ResNets and LM-ResNets at the same depths, for CIFAR and for ImageNet-size inputs.

Lu, Zhong, Li & Dong, "Beyond Finite Layer Neural Networks: Bridging Deep Architectures and
Numerical Differential Equations", ICML 2018 (Table 2: CIFAR ResNet/LM-ResNet-20/32/44/56/110/164;
LM-ResNet-50/101 on ImageNet), on the pre-activation ResNets of He, Zhang, Ren & Sun, "Identity
Mappings in Deep Residual Networks", ECCV 2016.

Update rule at stage boundaries. Every block but the first of each stage is an LM block,
``x_{n+1} = (1 - k_n) x_n + k_n x_{n-1} + f(x_n)``. The first block of a stage (the transition
that downsamples or widens, and the first block after the stem, for which no ``x_{n-1}`` exists)
uses the plain update ``x_{n+1} = P(x_n) + f(x_n)``, where ``P`` is its shortcut (a 1×1
projection, or the identity). The second block of a stage then takes ``x_{n-1} := P(x_n)``: the
previous state carried into the new shape by the same shortcut, which is what Lu et al.'s
released code does (``last_residual = residual`` after a downsampling block).

Stochastic depth (Huang et al., ECCV 2016), optional for both families, keeps block ``l`` of ``L``
with probability ``p_l = 1 - (l / L)(1 - p_L)`` (``p_L = 0.5`` in both papers).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
from torch import nn

from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.lm import (
    BranchSurvivalDraws,
    LMResidualBlock,
    PreActBasicBlock,
    PreActBottleneckBlock,
    linear_survival_probabilities,
)
from lightning_pdenets.validation import check_positive_int

__all__ = [
    "CIFAR_DEPTHS",
    "IMAGENET_DEPTHS",
    "PreActResNet",
    "cifar_stage_blocks",
    "lm_resnet_cifar",
    "lm_resnet_imagenet",
    "preact_resnet_cifar",
    "preact_resnet_imagenet",
]

BLOCKS = {"basic": (PreActBasicBlock, 1), "bottleneck": (PreActBottleneckBlock, 4)}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 164)
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class PreActResNet(nn.Module):
    """stem → stages of pre-activation residual blocks → BN, ReLU, global average pool, linear.

    Args:
        stem: Module mapping images to ``stem_channels`` feature maps.
        stem_channels: Channels leaving the stem.
        in_channels: Channels of the input images (checked in :meth:`forward`).
        num_classes: Number of classes.
        block: ``'basic'`` or ``'bottleneck'``.
        stage_blocks: Blocks per stage.
        stage_widths: Bottleneck width (basic blocks: output channels) of each stage.
        stage_strides: Stride of the first block of each stage.
        update: ``'plain'`` (ResNet) or ``'lm'`` (LM-ResNet; all blocks but each stage's first).
        k_mode: ``'scalar'`` or ``'channel'`` (LM only).
        k_init_range: Uniform initialization range of ``k_n`` (LM only).
        stochastic_depth: Drop residual branches with linearly decaying survival probability.
        survival_prob_last: ``p_L``, the survival probability of the last block.
        stochastic_depth_mode: ``'batch'`` (one draw per mini-batch, shared by all DDP ranks through
            :class:`BranchSurvivalDraws`) or ``'sample'`` (one draw per sample, from torch's global RNG).
    """

    survival_draws: BranchSurvivalDraws | None

    def __init__(
        self,
        stem: nn.Module,
        stem_channels: int,
        in_channels: int,
        num_classes: int,
        block: str,
        stage_blocks: Sequence[int],
        stage_widths: Sequence[int],
        stage_strides: Sequence[int],
        update: str = "plain",
        k_mode: str = "scalar",
        k_init_range: Sequence[float] = (-0.1, 0.0),
        stochastic_depth: bool = False,
        survival_prob_last: float = 0.5,
        stochastic_depth_mode: str = "batch",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("stem_channels", stem_channels),
        ):
            check_positive_int(value, name)
        if block not in BLOCKS:
            raise ValueError(f"`block` must be one of {sorted(BLOCKS)}, got {block!r}.")
        if not len(stage_blocks) == len(stage_widths) == len(stage_strides):
            raise ValueError(
                f"`stage_blocks`, `stage_widths` and `stage_strides` need one entry per stage, got lengths "
                f"{len(stage_blocks)}, {len(stage_widths)}, {len(stage_strides)}."
            )
        for blocks in stage_blocks:
            check_positive_int(blocks, "stage_blocks[i]")
        block_class, expansion = BLOCKS[block]
        num_blocks = sum(stage_blocks)
        survival = (
            linear_survival_probabilities(num_blocks, survival_prob_last) if stochastic_depth else [1.0] * num_blocks
        )
        self.in_channels = in_channels
        self.stem = stem
        self.stages = nn.ModuleList()
        channels, index = stem_channels, 0
        for blocks, width, stride in zip(stage_blocks, stage_widths, stage_strides):
            stage = nn.ModuleList()
            for position in range(blocks):
                stage.append(
                    block_class(
                        channels,
                        width * expansion,
                        stride if position == 0 else 1,
                        update=update if position > 0 else "plain",
                        k_mode=k_mode,
                        k_init_range=k_init_range,
                        survival_prob=survival[index],
                        stochastic_depth_mode=stochastic_depth_mode,
                    )
                )
                channels, index = width * expansion, index + 1
            self.stages.append(stage)
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
        self.reset_parameters()
        # after the initialization, so that the same seed gives the same weights with or without it
        self.survival_draws = (
            BranchSurvivalDraws(survival) if stochastic_depth and stochastic_depth_mode == "batch" else None
        )

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan-out), unit/zero BatchNorm; ``k_n`` keep their own initialization."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def blocks(self) -> list[tuple[str, LMResidualBlock]]:
        """``('stage{s}.block{b}', block)`` in depth order, stages and blocks counted from 1."""
        return [
            (f"stage{s}.block{b:02d}", cast(LMResidualBlock, block))
            for s, stage in enumerate(self.stages, start=1)
            for b, block in enumerate(cast(nn.ModuleList, stage), start=1)
        ]

    def lm_coefficients(self) -> dict[str, torch.Tensor]:
        """The learnable ``k_n`` of every LM block, keyed like :meth:`blocks` (empty for a plain ResNet)."""
        return {name: block.k for name, block in self.blocks() if block.k is not None}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of the last stage, before the head."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"set `in_channels` to the dataset's number of channels."
            )
        x = self.stem(x)
        x_prev: torch.Tensor | None = None
        blocks = [block for stage in self.stages for block in cast(nn.ModuleList, stage)]
        keeps = (
            self.survival_draws.draw() if self.training and self.survival_draws is not None else [None] * len(blocks)
        )
        for block, keep in zip(blocks, keeps):
            x, x_prev = block(x, x_prev, keep)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cifar_stage_blocks(depth: int, block: str | None = None) -> tuple[str, int]:
    """``(block, blocks_per_stage)`` of a CIFAR ResNet of ``depth`` layers (three stages).

    Basic blocks need ``depth = 6n + 2``, bottlenecks ``depth = 9n + 2``; by default depths from
    164 on use bottlenecks (He et al.'s ResNet-164/1001), smaller ones basic blocks.
    """
    check_positive_int(depth, "depth")
    block = block if block is not None else ("bottleneck" if depth >= 164 else "basic")
    if block not in BLOCKS:
        raise ValueError(f"`block` must be one of {sorted(BLOCKS)} or None, got {block!r}.")
    layers_per_block = 2 if block == "basic" else 3
    if (depth - 2) % (3 * layers_per_block) or depth < 2 + 3 * layers_per_block:
        form = "6n + 2 (20, 32, 44, 56, 110, ...)" if block == "basic" else "9n + 2 (164, 1001, ...)"
        raise ValueError(f"`depth` of a CIFAR ResNet with {block} blocks must be {form}, got {depth!r}.")
    return block, (depth - 2) // (3 * layers_per_block)


def _cifar(
    depth: int, num_classes: int, in_channels: int, block: str | None, base_width: int, **update
) -> PreActResNet:
    check_positive_int(base_width, "base_width")
    check_positive_int(in_channels, "in_channels")
    block, n = cifar_stage_blocks(depth, block)
    stem = nn.Conv2d(in_channels, base_width, 3, 1, 1, bias=False)
    widths = (base_width, 2 * base_width, 4 * base_width)
    return PreActResNet(stem, base_width, in_channels, num_classes, block, (n, n, n), widths, (1, 2, 2), **update)


@register_architecture("preact_resnet_cifar", (3, 32, 32), dict(depth=20, base_width=4))
def preact_resnet_cifar(
    depth: int = 56,
    num_classes: int = 10,
    in_channels: int = 3,
    block: str | None = None,
    base_width: int = 16,
    stochastic_depth: bool = False,
    survival_prob_last: float = 0.5,
    stochastic_depth_mode: str = "batch",
) -> PreActResNet:
    """Pre-activation CIFAR ResNet-``depth`` (He et al. 2016): 3×3 stem, three stages of widths
    16/32/64 (×4 for bottlenecks) at 32/16/8 pixels, head. 0.27M/0.46M/0.66M/0.85M/1.7M parameters
    for depths 20/32/44/56/110 and 1.7M for the bottleneck ResNet-164 (CIFAR-10)."""
    return _cifar(
        depth,
        num_classes,
        in_channels,
        block,
        base_width,
        update="plain",
        stochastic_depth=stochastic_depth,
        survival_prob_last=survival_prob_last,
        stochastic_depth_mode=stochastic_depth_mode,
    )


@register_architecture("lm_resnet_cifar", (3, 32, 32), dict(depth=20, base_width=4))
def lm_resnet_cifar(
    depth: int = 56,
    num_classes: int = 10,
    in_channels: int = 3,
    block: str | None = None,
    base_width: int = 16,
    k_mode: str = "scalar",
    k_init_range: Sequence[float] = (-0.1, 0.0),
    stochastic_depth: bool = False,
    survival_prob_last: float = 0.5,
    stochastic_depth_mode: str = "batch",
) -> PreActResNet:
    """LM-ResNet-``depth`` of Lu et al. 2018: :func:`preact_resnet_cifar` with the LM update in
    every block but each stage's first (one extra parameter per LM block, or one per channel)."""
    return _cifar(
        depth,
        num_classes,
        in_channels,
        block,
        base_width,
        update="lm",
        k_mode=k_mode,
        k_init_range=k_init_range,
        stochastic_depth=stochastic_depth,
        survival_prob_last=survival_prob_last,
        stochastic_depth_mode=stochastic_depth_mode,
    )


def _imagenet(depth: int, num_classes: int, in_channels: int, base_width: int, **update) -> PreActResNet:
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"`depth` of an ImageNet ResNet must be one of {sorted(IMAGENET_DEPTHS)}, got {depth!r}.")
    check_positive_int(base_width, "base_width")
    check_positive_int(in_channels, "in_channels")
    block, stage_blocks = IMAGENET_DEPTHS[depth]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(base_width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    widths = tuple(base_width * 2**i for i in range(4))
    return PreActResNet(stem, base_width, in_channels, num_classes, block, stage_blocks, widths, (1, 2, 2, 2), **update)


def preact_resnet_imagenet(
    depth: int = 50,
    num_classes: int = 1000,
    in_channels: int = 3,
    base_width: int = 64,
    stochastic_depth: bool = False,
    survival_prob_last: float = 0.5,
    stochastic_depth_mode: str = "batch",
) -> PreActResNet:
    """Pre-activation ImageNet ResNet-``depth`` (He et al. 2016): 7×7/2 stem and max-pool, four
    stages at 1/4..1/32 resolution; 25.6M (ResNet-50) and 44.5M (ResNet-101) parameters."""
    return _imagenet(
        depth,
        num_classes,
        in_channels,
        base_width,
        update="plain",
        stochastic_depth=stochastic_depth,
        survival_prob_last=survival_prob_last,
        stochastic_depth_mode=stochastic_depth_mode,
    )


def lm_resnet_imagenet(
    depth: int = 50,
    num_classes: int = 1000,
    in_channels: int = 3,
    base_width: int = 64,
    k_mode: str = "scalar",
    k_init_range: Sequence[float] = (-0.1, 0.0),
    stochastic_depth: bool = False,
    survival_prob_last: float = 0.5,
    stochastic_depth_mode: str = "batch",
) -> PreActResNet:
    """LM-ResNet-``depth`` for ImageNet-size inputs (Lu et al. 2018, LM-ResNet-50/101)."""
    return _imagenet(
        depth,
        num_classes,
        in_channels,
        base_width,
        update="lm",
        k_mode=k_mode,
        k_init_range=k_init_range,
        stochastic_depth=stochastic_depth,
        survival_prob_last=survival_prob_last,
        stochastic_depth_mode=stochastic_depth_mode,
    )


# One registry entry per depth of the papers' tables (besides the CIFAR families with `depth` an argument, which
# the models build); the registry test runs them all at tiny width.
for _depth in CIFAR_DEPTHS:
    register_architecture(f"preact_resnet{_depth}_cifar", (3, 32, 32), dict(base_width=4))(
        partial(preact_resnet_cifar, depth=_depth)
    )
    register_architecture(f"lm_resnet{_depth}_cifar", (3, 32, 32), dict(base_width=4))(
        partial(lm_resnet_cifar, depth=_depth)
    )
for _depth in (50, 101):
    register_architecture(f"preact_resnet{_depth}_imagenet", (3, 64, 64), dict(base_width=4))(
        partial(preact_resnet_imagenet, depth=_depth)
    )
    register_architecture(f"lm_resnet{_depth}_imagenet", (3, 64, 64), dict(base_width=4))(
        partial(lm_resnet_imagenet, depth=_depth)
    )
