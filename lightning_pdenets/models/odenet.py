"""LightningModules of Chen et al.'s MNIST/SVHN comparison: ResNet, RK-Net and ODE-Net."""

from __future__ import annotations

from typing import Any, Optional

from lightning_pdenets.architectures.chen import ODENET_SOLVER, RKNET_SOLVER
from lightning_pdenets.models.base import ClassifierModule
from lightning_pdenets.models.solver import ODESolverMixin
from lightning_pdenets.solvers import SolverOptions

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

    architecture = "resnet_chen"

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
        self.network = self.build_network()


class ODENetModule(ODESolverMixin, ClassifierModule):
    """ODE-Net of Chen et al. 2018: one ODE block solved with dopri5 and the adjoint method.

    Args:
        in_channels: Image channels.
        num_classes: Number of classes.
        width: Feature channels.
        num_downsamples: Stride-2 convolutions in the stem.
        solver: ODE solver settings over :attr:`solver_defaults` (fields of
            :class:`lightning_pdenets.solvers.SolverConfig`), e.g. ``{rtol: 1e-4, adjoint_options: {norm: seminorm}}``.
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    architecture = "odenet_chen"
    solver_defaults = ODENET_SOLVER

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        num_downsamples: int = 2,
        solver: Optional[SolverOptions] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = self.build_network(solver=self.resolve_solver())


class RKNetModule(ODENetModule):
    """RK-Net of Chen et al. 2018: the ODE-Net architecture with fixed-step RK4 (step 0.25), backpropagated directly."""

    solver_defaults = RKNET_SOLVER
