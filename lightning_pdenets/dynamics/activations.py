"""Activations of the vector fields, by name, for configs (``activation: silu``).

ReLU makes a vector field only piecewise smooth: across its kinks an adaptive Runge–Kutta solver's local
error no longer shrinks like h^(p+1), and its step-size controller, which assumes it does, grows the steps
timidly. Smooth activations (``softplus``, ``silu``, ``tanh``, ``elu`` for negative inputs) keep the
solver's order; Finlay et al. (ICML 2020) and Kelly et al. (NeurIPS 2020) regularize smooth fields.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["ACTIVATIONS", "check_activation"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}
"""Activation names accepted by the vector fields of :mod:`lightning_pdenets.dynamics`."""


def check_activation(activation: str, choices: Mapping[str, type[nn.Module]] = ACTIVATIONS) -> type[nn.Module]:
    """Return the activation class for ``activation`` or raise a ``ValueError`` listing the names.

    Args:
        activation: A name of ``choices``.
        choices: The names a caller accepts, a subset of :data:`ACTIVATIONS` (all of them by default).
    """
    if not isinstance(activation, str) or activation not in choices:
        raise ValueError(f"`activation` must be one of {sorted(choices)}, got {activation!r}.")
    return choices[activation]
