"""LightningModules of Ruthotto & Haber's PDE-motivated CNNs: parabolic, Hamiltonian, second order.

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020. Each module builds the registered :class:`lightning_pdenets.architectures.PDECNN` of one
dynamics (``stl10_parabolic``, ...). The regularizer of the paper's Eq. (11) is split as usual in Lightning: the weight
decay α₂/2 (‖θ‖² + ‖W‖² + ‖μ‖²) is the optimizer's ``weight_decay``, and the total variation
in time α₁ ∫ φ_ε(∂_t θ) dt is the :class:`lightning_pdenets.callbacks.TimeTVRegularization`
callback (``callbacks/time_tv.yaml``); the box constraint is
:class:`lightning_pdenets.callbacks.WeightBoxProjection`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning_pdenets.models.base import ClassifierModule

__all__ = ["PDECNNModule", "ParabolicCNNModule", "HamiltonianCNNModule", "SecondOrderCNNModule"]


class PDECNNModule(ClassifierModule):
    """Classifier over a :class:`PDECNN`; subclasses name the registered network of their dynamics (:attr:`architecture`).

    Args:
        in_channels: Image channels.
        num_classes: Number of classes.
        widths: Channels of the units (16, 64, 128, 256 on STL-10).
        num_steps: Time steps of each PDE block (3 in the paper).
        step_size: δ_t (1 in the paper).
        num_control_points: Control points of θ(t) per block (default ``num_steps``).
        interpolation: ``'constant'`` or ``'linear'`` interpolation of θ(t) between control points.
        norm: ``'instance'`` or ``'none'`` normalization inside the symmetric layers.
        activation: σ of the symmetric layers (``relu``, ``tanh``, ``leaky_relu``, ``identity``).
        kernel_std: Initial standard deviation of the PDE kernels with ``init='he'`` (default He scale).
        reversible: Memory-efficient reversible backward (Hamiltonian and second order only).
        init: ``'meganet'`` (the authors' published initialization, default) or ``'he'``.
        final_connector: Normalized 1×1 connector after the last unit, as in the authors' code; without
            it SGD at the paper's lr 0.1 diverges (see :mod:`lightning_pdenets.architectures.stl10`).
        **kwargs: Optimization settings of :class:`ClassifierModule`.
    """

    architecture = "stl10_parabolic"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 64, 128, 256),
        num_steps: int = 3,
        step_size: float = 1.0,
        num_control_points: Optional[int] = None,
        interpolation: str = "constant",
        norm: str = "instance",
        activation: str = "relu",
        kernel_std: Optional[float] = None,
        reversible: bool = False,
        init: str = "meganet",
        final_connector: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.network = self.build_network()


class ParabolicCNNModule(PDECNNModule):
    """Parabolic CNN (nonlinear diffusion, forward Euler) of Ruthotto & Haber 2020."""

    architecture = "stl10_parabolic"


class HamiltonianCNNModule(PDECNNModule):
    """Hamiltonian CNN (Verlet, reversible) of Ruthotto & Haber 2020 and Chang et al. 2018."""

    architecture = "stl10_hamiltonian"


class SecondOrderCNNModule(PDECNNModule):
    """Second-order (hyperbolic, leapfrog, reversible) CNN of Ruthotto & Haber 2020."""

    architecture = "stl10_second_order"
