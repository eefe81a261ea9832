"""LightningModules of Ott et al.'s experiments: neural-ODE classifiers for vectors and for images.

Ott, Katiyar, Hennig & Tiemann, "ResNet After All: Neural ODEs and Their Numerical Solution",
ICLR 2021. Pair them with the solver callbacks (``StepSizeAdaptation``, ``ToleranceAdaptation``,
``SolverSwapCheck``) to reproduce the paper's train/test solver experiments.
"""

from __future__ import annotations

from lightning_pdenets.architectures.neural_ode import OTT_SOLVER
from lightning_pdenets.models.base import ClassifierModule
from lightning_pdenets.models.solver import ODESolverMixin

__all__ = ["ImageODEClassifierModule", "VectorODEClassifierModule"]


class VectorODEClassifierModule(ODESolverMixin, ClassifierModule):
    """Neural ODE with an MLP vector field on R^input_dim, then a linear classifier (concentric spheres).

    ``network``: ``hidden_width``, ``num_hidden_layers``, ``activation``, ``time_dependent``
    (:func:`~lightning_pdenets.architectures.neural_ode.vector_odenet`); ``solver`` over Euler with step 0.1.
    """

    architecture = "vector_odenet"
    solver_defaults = OTT_SOLVER


class ImageODEClassifierModule(ODESolverMixin, ClassifierModule):
    """Neural ODE on the raw image (1×1→3×3→1×1 conv field, no downsampling), then a linear classifier.

    Ott et al.'s CIFAR-10 model. ``network``: ``hidden_channels``, ``activation``
    (:func:`~lightning_pdenets.architectures.neural_ode.image_odenet`); ``solver`` over Euler with step 0.1.
    """

    architecture = "image_odenet"
    solver_defaults = OTT_SOLVER
