"""Isometric MobileNetV3 and its ODE-Net / PR-Net variants (Tiny ImageNet, Kim et al. Table 3).

Sandler, Baccash, Zhmoginov & Howard, "Non-discriminative data or weak model? On the relative
importance of data and model resolution", ICCV Workshops 2019: an *isometric* network keeps one
resolution and one width through every block. A patchifying stem (a ``patch_size``-strided
convolution) maps the image to feature maps once; then come MobileNetV3 inverted-residual blocks
(Howard et al., "Searching for MobileNetV3", ICCV 2019: 1×1 expansion, depthwise k×k,
squeeze-excite, hard-swish, linear 1×1 projection, identity skip) with stride 1 throughout, and
MobileNetV3's head (1×1 convolution to ``head_expansion``× the width, global pooling, classifier).

The blocks are torchvision's own ``InvertedResidual``. Kim et al. replace one block by an ODE block
(Chen et al.'s convolutional vector field, ODE-Net) or by a PDE block (PR-Net).

Configuration. Neither paper lists the Tiny ImageNet widths, so they were chosen to reproduce
Table 3's parameter counts with MobileNetV3's own building blocks: width 128·w channels, expanded
channels 480·w (MobileNetV3-Large's 480-channel expansion), 3×3 depthwise kernels, squeeze-excite
reduction 4, head 1×1 convolution to 6× the width (as MobileNetV3-Large's 160 → 960), no 1,280-unit
hidden layer, 4×4 patches (64×64 images → 16×16 feature maps), 200 classes. Parameters (Table 3
in brackets), width 1: MobileNetV3 1.24M (1.21M), ODE-Net 1.29M (1.36M), PR-Net 1.30M (1.36M);
width 2: 4.58M (4.30M), 4.80M (4.90M), 4.81M (4.56M) — all within 7%. A width divisible by 32
keeps Chen et al.'s GroupNorm(32) in the ODE and PDE blocks valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

import torch
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

from lightning_pdenets.architectures.odenet import ODENET_SOLVER
from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.ode import ODEBlock
from lightning_pdenets.dynamics.conv import ConvODEFunc
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.solvers import SolverConfig
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = [
    "IsometricMobileNetV3",
    "isometric_channels",
    "mobile_block",
    "mobilenetv3_isometric",
    "odenet_mobilenet",
    "prnet_mobilenet",
]

_TINY = dict(channels=16, expanded_channels=32, width_multiplier=1.0, num_blocks=2, patch_size=8)
_BATCH_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # MobileNetV3's (TensorFlow) settings


def isometric_channels(channels: int, width_multiplier: float) -> int:
    """Width of every block: ``channels × width_multiplier`` rounded to a multiple of 8 (as MobileNetV3)."""
    check_positive_int(channels, "channels")
    check_positive(width_multiplier, "width_multiplier")
    return InvertedResidualConfig.adjust_channels(channels, width_multiplier)


def mobile_block(channels: int, expanded_channels: int, kernel_size: int) -> InvertedResidual:
    """torchvision's MobileNetV3 block: stride 1, squeeze-excite, hard-swish, same width in and out."""
    check_positive_int(expanded_channels, "expanded_channels")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be an odd positive integer (3 or 5 in MobileNetV3), got {kernel_size!r}.")
    config = InvertedResidualConfig(channels, kernel_size, expanded_channels, channels, True, "HS", 1, 1, 1.0)
    return InvertedResidual(config, _BATCH_NORM)


class IsometricMobileNetV3(nn.Module):
    """Patchifying stem → shape-preserving blocks → MobileNetV3 head.

    The network is split into :attr:`backbone` (everything up to the pooled features) and
    :attr:`classifier` (the last linear layer), so fine-tuning can swap the head with
    :meth:`reset_classifier` and freeze or unfreeze the backbone.

    Args:
        blocks: Shape-preserving modules on (N, channels, H/p, W/p) feature maps.
        in_channels: Image channels.
        num_classes: Number of classes.
        channels: Width of the feature maps.
        patch_size: Side p of the stem's non-overlapping patches (its kernel size and stride).
        head_expansion: The head's 1×1 convolution widens to ``head_expansion × channels``.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        in_channels: int,
        num_classes: int,
        channels: int,
        patch_size: int,
        head_expansion: int = 6,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("patch_size", patch_size),
            ("head_expansion", head_expansion),
        ):
            check_positive_int(value, name)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.in_channels = in_channels
        self.patch_size = patch_size
        head_channels = head_expansion * channels
        stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, patch_size, stride=patch_size, bias=False),
            _BATCH_NORM(channels),
            nn.Hardswish(inplace=True),
        )
        head = nn.Sequential(
            nn.Conv2d(channels, head_channels, 1, bias=False),
            _BATCH_NORM(head_channels),
            nn.Hardswish(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.backbone = nn.Sequential()
        self.backbone.add_module("stem", stem)
        self.backbone.add_module("blocks", nn.Sequential(*blocks))
        self.backbone.add_module("head", head)
        self.classifier = nn.Linear(head_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision MobileNetV3's initialization (Kaiming fan-out convolutions, N(0, 0.01) linear layers)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.Sequential:
        return cast(nn.Sequential, self.backbone.get_submodule("blocks"))

    # The stem / feature / head split around the last block, the interface of Chen et al.'s
    # classifiers (StemFeatureHeadClassifier), through which PR-Net's training reaches its PDE block.
    @property
    def stem(self) -> nn.Sequential:
        """Patch stem and every block but the last: produces h(0) for the last block."""
        return nn.Sequential(self.backbone.get_submodule("stem"), *list(self.blocks)[:-1])

    @property
    def feature(self) -> nn.Module:
        """The last block (the ODE or PDE block in the ODE-Net and PR-Net variants)."""
        return self.blocks[-1]

    @property
    def head(self) -> nn.Sequential:
        """Head convolution, pooling and classifier."""
        return nn.Sequential(self.backbone.get_submodule("head"), self.classifier)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialized one with ``num_classes`` outputs."""
        check_positive_int(num_classes, "num_classes")
        self.classifier = nn.Linear(self.classifier.in_features, num_classes).to(self.classifier.weight.device)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"set `in_channels` to the dataset's number of channels."
            )
        if min(x.shape[-2:]) < self.patch_size:  # the stem's convolution would fail with a bare kernel-size error
            raise ConfigurationError(
                f"images of {x.shape[-2]}x{x.shape[-1]} pixels are smaller than the stem's patches (`patch_size` "
                f"{self.patch_size}); use `patch_size` <= {min(x.shape[-2:])}, or larger images (e.g. the "
                f"datamodule's `resize`)."
            )
        return self.classifier(self.backbone(x))


def _feature_size(image_size: int, patch_size: int) -> tuple[int, int]:
    check_positive_int(image_size, "image_size")
    check_positive_int(patch_size, "patch_size")
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
    return image_size // patch_size, image_size // patch_size


def _build(
    last_block: Callable[[int], nn.Module] | None,
    in_channels: int,
    num_classes: int,
    width_multiplier: float,
    channels: int,
    num_blocks: int,
    expanded_channels: int,
    kernel_size: int,
    patch_size: int,
    head_expansion: int,
    dropout: float,
) -> IsometricMobileNetV3:
    """The network of the factories below.

    ``last_block(width)``, when given, builds the block that replaces the last one.
    """
    check_positive_int(num_blocks, "num_blocks")
    width = isometric_channels(channels, width_multiplier)
    hidden = isometric_channels(expanded_channels, width_multiplier)
    special = last_block(width) if last_block is not None else None
    mobile = num_blocks - (special is not None)
    blocks = [mobile_block(width, hidden, kernel_size) for _ in range(mobile)]
    if special is not None:
        blocks.append(special)  # Kim et al.: "3 mobile + 1 ODE/PDE" — the last block is replaced
    return IsometricMobileNetV3(blocks, in_channels, num_classes, width, patch_size, head_expansion, dropout)


@register_architecture("mobilenetv3_isometric", input_shape=(3, 64, 64), tiny_kwargs=_TINY)
def mobilenetv3_isometric(
    in_channels: int = 3,
    num_classes: int = 200,
    width_multiplier: float = 1.0,
    channels: int = 128,
    num_blocks: int = 4,
    expanded_channels: int = 480,
    kernel_size: int = 3,
    patch_size: int = 4,
    head_expansion: int = 6,
    dropout: float = 0.2,
) -> IsometricMobileNetV3:
    """Isometric MobileNetV3 of Sandler et al. 2019 (Kim et al. Table 3: "M.Net V3", 4 mobile blocks).

    Args:
        in_channels: Image channels.
        num_classes: Number of classes (200 for Tiny ImageNet).
        width_multiplier: Scales ``channels`` (Table 3 uses 1 and 2).
        channels: Width at multiplier 1.
        num_blocks: MobileNetV3 blocks.
        expanded_channels: Hidden width of the inverted residuals at multiplier 1.
        kernel_size: Depthwise kernel size.
        patch_size: Stem patch size: 64×64 images become (64/p)×(64/p) feature maps.
        head_expansion: Width factor of the head's 1×1 convolution.
        dropout: Dropout before the classifier.
    """
    return _build(
        None,
        in_channels,
        num_classes,
        width_multiplier,
        channels,
        num_blocks,
        expanded_channels,
        kernel_size,
        patch_size,
        head_expansion,
        dropout,
    )


@register_architecture(
    "odenet_mobilenet",
    input_shape=(3, 64, 64),
    tiny_kwargs=dict(_TINY, solver=dict(method="rk4", step_size=0.5, adjoint=False)),
)
def odenet_mobilenet(
    in_channels: int = 3,
    num_classes: int = 200,
    width_multiplier: float = 1.0,
    channels: int = 128,
    num_blocks: int = 4,
    expanded_channels: int = 480,
    kernel_size: int = 3,
    patch_size: int = 4,
    head_expansion: int = 6,
    dropout: float = 0.2,
    solver: SolverConfig | Mapping[str, Any] | None = None,
    activation: str = "relu",
) -> IsometricMobileNetV3:
    """ODE-Net on the isometric MobileNetV3: the last of ``num_blocks`` blocks is an ODE block.

    The ODE block integrates Chen et al.'s convolutional vector field (:class:`ConvODEFunc`) at the
    network's width.

    Args:
        solver: How the ODE block integrates (a :class:`SolverConfig` or a dict of its fields, over
            :data:`ODENET_SOLVER`, Chen et al.'s dopri5 with the adjoint method).
        activation: The vector field's activation, one of :data:`~lightning_pdenets.dynamics.activations.ACTIVATIONS`
            (Chen et al.'s ``relu``; ``silu`` or ``softplus`` make f smooth, which adaptive solvers step through
            faster).
        Others: as in :func:`mobilenetv3_isometric`.
    """

    def ode_block(width: int) -> ODEBlock:
        return ODEBlock(ConvODEFunc(width, activation), SolverConfig.from_options(solver, defaults=ODENET_SOLVER))

    return _build(
        ode_block,
        in_channels,
        num_classes,
        width_multiplier,
        channels,
        num_blocks,
        expanded_channels,
        kernel_size,
        patch_size,
        head_expansion,
        dropout,
    )


@register_architecture("prnet_mobilenet", input_shape=(3, 64, 64), tiny_kwargs=dict(_TINY, image_size=64))
def prnet_mobilenet(
    in_channels: int = 3,
    num_classes: int = 200,
    width_multiplier: float = 1.0,
    channels: int = 128,
    num_blocks: int = 4,
    expanded_channels: int = 480,
    kernel_size: int = 3,
    patch_size: int = 4,
    head_expansion: int = 6,
    dropout: float = 0.2,
    image_size: int = 64,
    activation: str = "softplus",
    t_end: float = 1.0,
) -> IsometricMobileNetV3:
    """PR-Net on the isometric MobileNetV3: the last of ``num_blocks`` blocks is PR-Net's PDE block.

    Args:
        image_size: Side of the square input images; fixes the PDE block's query set (image_size / patch_size).
        activation: Activation of the PDE block's regression network.
        t_end: Initial time T of the query set.
        Others: as in :func:`mobilenetv3_isometric`.
    """
    from lightning_pdenets.blocks.pde import CoordinateConvField, PDEBlock  # PR-Net's block (separate module)

    def pde_block(width: int) -> PDEBlock:
        return PDEBlock(CoordinateConvField(width, 3, activation), _feature_size(image_size, patch_size), t_end)

    return _build(
        pde_block,
        in_channels,
        num_classes,
        width_multiplier,
        channels,
        num_blocks,
        expanded_channels,
        kernel_size,
        patch_size,
        head_expansion,
        dropout,
    )
