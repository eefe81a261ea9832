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

from lightning_pdenets.models.base import ClassifierModule

__all__ = ["HamiltonianCNNModule", "PDECNNModule", "ParabolicCNNModule", "SecondOrderCNNModule"]


class PDECNNModule(ClassifierModule):
    """Classifier over a :class:`PDECNN`; subclasses name the registered network of their dynamics.

    The network's registered name is :attr:`architecture`.

    ``network``: the arguments of :class:`lightning_pdenets.architectures.pde_cnn.PDECNN` — ``widths`` (channels of
    the units: 16, 64, 128, 256 on STL-10), ``num_steps`` (3 in the paper), ``step_size`` (δ_t, 1 in the paper),
    ``num_control_points``, ``interpolation``, ``norm``, ``activation``, ``kernel_std``, ``reversible``, ``init``
    (``meganet``, the authors' published initialization, or ``he``) and ``final_connector`` (the normalized 1×1
    connector of the authors' code, without which SGD at the paper's lr 0.1 diverges).
    """

    architecture = "stl10_parabolic"


class ParabolicCNNModule(PDECNNModule):
    """Parabolic CNN (nonlinear diffusion, forward Euler) of Ruthotto & Haber 2020."""

    architecture = "stl10_parabolic"


class HamiltonianCNNModule(PDECNNModule):
    """Hamiltonian CNN (Verlet, reversible) of Ruthotto & Haber 2020 and Chang et al. 2018."""

    architecture = "stl10_hamiltonian"


class SecondOrderCNNModule(PDECNNModule):
    """Second-order (hyperbolic, leapfrog, reversible) CNN of Ruthotto & Haber 2020."""

    architecture = "stl10_second_order"
