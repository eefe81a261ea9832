"""LightningModules of Chen et al.'s MNIST/SVHN comparison: ResNet, RK-Net and ODE-Net."""

from __future__ import annotations

from typing import Any, Optional

from lightning_pdenets.architectures.chen import odenet_chen, resnet_chen
from lightning_pdenets.models.base import ClassifierModule

__all__ = ["ODENetModule", "RKNetModule", "ResNetModule"]


class ResNetModule(ClassifierModule):
    """ResNet baseline of Chen et al. 2018 (six residual blocks after a downsampling stem).

    Args:
        in_channels: Image channels (1 for MNIST, 3 for SVHN).
        num_classes: Number of classes.
        width: Feature channels.
        num_downsamples: Stride-2 convolutions in the stem.
        num_blocks: Residual blocks.
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        num_downsamples: int = 2,
        num_blocks: int = 6,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = resnet_chen(in_channels, num_classes, width, num_downsamples, num_blocks)


class ODENetModule(ClassifierModule):
    """ODE-Net of Chen et al. 2018: one ODE block solved with dopri5 and the adjoint method.

    Args:
        in_channels: Image channels.
        num_classes: Number of classes.
        width: Feature channels.
        num_downsamples: Stride-2 convolutions in the stem.
        method, step_size, rtol, atol, adjoint, t0, t1, max_num_steps: ODE solver settings
            (see :class:`lightning_pdenets.blocks.SolverSettings`).
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        num_downsamples: int = 2,
        method: str = "dopri5",
        step_size: Optional[float] = None,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        t0: float = 0.0,
        t1: float = 1.0,
        max_num_steps: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = odenet_chen(
            in_channels, num_classes, width, num_downsamples, method, step_size, rtol, atol, adjoint, t0, t1, max_num_steps
        )


class RKNetModule(ODENetModule):
    """RK-Net of Chen et al. 2018: the ODE-Net architecture with fixed-step RK4, backpropagated directly."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        num_downsamples: int = 2,
        method: str = "rk4",
        step_size: Optional[float] = 0.25,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = False,
        t0: float = 0.0,
        t1: float = 1.0,
        max_num_steps: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_channels, num_classes, width, num_downsamples, method, step_size, rtol, atol, adjoint, t0, t1,
            max_num_steps, **kwargs,
        )
