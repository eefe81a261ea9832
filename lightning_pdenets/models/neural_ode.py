"""LightningModules of Ott et al.'s experiments: neural-ODE classifiers for vectors and for images.

Ott, Katiyar, Hennig & Tiemann, "ResNet After All: Neural ODEs and Their Numerical Solution",
ICLR 2021. Pair them with the solver callbacks (``StepSizeAdaptation``, ``ToleranceAdaptation``,
``SolverSwapCheck``) to reproduce the paper's train/test solver experiments.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_pdenets.architectures.spheres import OTT_SOLVER
from lightning_pdenets.models.base import ClassifierModule
from lightning_pdenets.models.solver import ODESolverMixin
from lightning_pdenets.solvers import SolverOptions

__all__ = ["VectorODEClassifierModule", "ImageODEClassifierModule"]


class VectorODEClassifierModule(ODESolverMixin, ClassifierModule):
    """Neural ODE with an MLP vector field on R^input_dim, then a linear classifier (concentric spheres).

    Args:
        input_dim: Dimension of the input vectors.
        num_classes: Number of classes.
        hidden_width, num_hidden_layers, activation, time_dependent: MLP vector field
            (see :class:`lightning_pdenets.dynamics.MLPODEFunc`).
        solver: ODE solver settings over Euler with step 0.1 (fields of :class:`lightning_pdenets.solvers.SolverConfig`).
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    architecture = "vector_odenet"
    solver_defaults = OTT_SOLVER

    def __init__(
        self,
        input_dim: int = 2,
        num_classes: int = 2,
        hidden_width: int = 32,
        num_hidden_layers: int = 2,
        activation: str = "relu",
        time_dependent: bool = False,
        solver: Optional[SolverOptions] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = self.build_network(solver=self.resolve_solver())


class ImageODEClassifierModule(ODESolverMixin, ClassifierModule):
    """Neural ODE on the raw image (1×1→3×3→1×1 conv field, no downsampling), then a linear classifier.

    Ott et al.'s CIFAR-10 model.

    Args:
        in_channels: Image channels.
        image_size: Height (= width) of the images.
        num_classes: Number of classes.
        hidden_channels: Channels inside the conv bottleneck.
        activation: Activation of the vector field.
        solver: ODE solver settings over Euler with step 0.1 (fields of :class:`lightning_pdenets.solvers.SolverConfig`).
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    architecture = "image_odenet"
    solver_defaults = OTT_SOLVER

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        hidden_channels: int = 64,
        activation: str = "relu",
        solver: Optional[SolverOptions] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = self.build_network(solver=self.resolve_solver())
