"""LightningModules of Chen et al.'s MNIST/SVHN comparison: ResNet, RK-Net and ODE-Net.

Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018, Table 1.
Each module names its registered architecture; ``network: {width: 64, num_downsamples: 2}`` sets its arguments
(see :mod:`lightning_pdenets.architectures.odenet`), and the optimization settings are :class:`ClassifierModule`'s.
"""

from __future__ import annotations

from lightning_pdenets.architectures.odenet import ODENET_SOLVER, RKNET_SOLVER
from lightning_pdenets.models.base import ClassifierModule
from lightning_pdenets.models.solver import ODESolverMixin

__all__ = ["ODENetModule", "RKNetModule", "ResNetModule"]


class ResNetModule(ClassifierModule):
    """ResNet baseline of Chen et al. 2018 (six residual blocks after a downsampling stem).

    ``network``: ``width``, ``num_downsamples``, ``num_blocks``
    (:func:`~lightning_pdenets.architectures.odenet.resnet_chen`).
    """

    architecture = "resnet_chen"
    inference_chunk_size = 16


class ODENetModule(ODESolverMixin, ClassifierModule):
    """ODE-Net of Chen et al. 2018: one ODE block solved with dopri5 and the adjoint method.

    ``network``: ``width``, ``num_downsamples``, ``activation``
    (:func:`~lightning_pdenets.architectures.odenet.odenet_chen`);
    ``solver``: fields of :class:`~lightning_pdenets.solvers.SolverConfig` over :data:`ODENET_SOLVER`.
    """

    architecture = "odenet_chen"
    solver_defaults = ODENET_SOLVER


class RKNetModule(ODENetModule):
    """RK-Net of Chen et al. 2018: the ODE-Net architecture with fixed-step RK4 (step 0.25), backpropagated directly."""

    solver_defaults = RKNET_SOLVER
