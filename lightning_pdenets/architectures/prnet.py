"""PR-Net for MNIST and SVHN: Chen et al.'s stem and head around a PDE block.

Kim, Choi, Ham, Kim & Park, "PDE-regularized neural networks for image classification",
Table 2: the ODE-Net classifier with its ODE block replaced by a regression network
f(h(0), x, y, t; theta) queried at a learned set of coordinates (about 0.21M parameters on MNIST).
"""

from __future__ import annotations

from lightning_pdenets.architectures.odenet import StemFeatureHeadClassifier, stem_output_size
from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.pde import CoordinateConvField, PDEBlock
from lightning_pdenets.validation import check_positive_int

__all__ = ["prnet", "stem_output_size"]


@register_architecture("prnet", input_shape=(1, 28, 28), tiny_kwargs=dict(width=8, num_downsamples=1, image_size=28))
def prnet(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 64,
    num_downsamples: int = 2,
    image_size: int = 28,
    activation: str = "softplus",
    t_end: float = 1.0,
    output_norm: bool = False,
) -> StemFeatureHeadClassifier:
    """PR-Net: stem, one :class:`PDEBlock` (f queried at the learned set H), head.

    Args:
        in_channels: Image channels (1 for MNIST, 3 for SVHN).
        num_classes: Number of classes.
        width: Feature channels.
        num_downsamples: Stride-2 convolutions in the stem.
        image_size: Side of the square input images (28 MNIST, 32 SVHN, 8 digits); fixes the size of H.
        activation: Activation of the regression network f.
        t_end: Initial time T of the query set.
        output_norm: End f with a GroupNorm (see :class:`CoordinateConvField`).
    """
    check_positive_int(width, "width")
    check_positive_int(num_downsamples, "num_downsamples", minimum=0)
    field = CoordinateConvField(width, 3, activation, output_norm)
    block = PDEBlock(field, stem_output_size(image_size, num_downsamples), t_end)
    return StemFeatureHeadClassifier(block, in_channels, num_classes, width, num_downsamples)
