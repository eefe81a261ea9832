"""The governing equation of PR-Net: a sparse library of polynomial-times-derivative terms.

Kim, Choi, Ham, Kim & Park, "PDE-regularized neural networks for image classification"
(PR-Net), Eq. 1. The residual of a hidden field h(d, t) is

    g = h_t - sum_{i=0..P} sum_{j=0..J} alpha_ij * h^i * d^j h / dd^j,

with one family of derivative terms per continuous axis (``x``, ``y``, ...). The coefficients
alpha are learned with an L1 penalty, so that they describe a sparse, readable PDE. This module
works on its own: :meth:`GoverningEquation.library_from_function` builds the term library of any
differentiable function with exact forward-mode derivatives, and :class:`ProximalSGD` performs the
soft-threshold (ISTA) step that sets small coefficients exactly to zero.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from lightning_pdenets.blocks.pde import CoordinateDerivatives, coordinate_derivatives
from lightning_pdenets.validation import check_positive

__all__ = ["GoverningEquation", "LibraryTerm", "ProximalSGD", "soft_threshold"]

IntPerAxis = Union[int, Sequence[int]]


@dataclass(frozen=True)
class LibraryTerm:
    """One term h^power * (d^order h / d axis^order) of the library (``axis`` is None when order is 0)."""

    power: int
    axis: Optional[str]
    order: int

    def label(self, variable: str = "h") -> str:
        """Human-readable name, e.g. ``1``, ``h``, ``h^2 h_xx``."""
        factors = []
        if self.power == 1:
            factors.append(variable)
        elif self.power > 1:
            factors.append(f"{variable}^{self.power}")
        if self.order > 0:
            factors.append(f"{variable}_{self.axis * self.order}")
        return " ".join(factors) or "1"


def _per_axis(value: IntPerAxis, axes: Sequence[str], name: str) -> tuple[int, ...]:
    values = [value] * len(axes) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != len(axes):
        raise ValueError(
            f"`{name}` must be an integer or one integer per axis {list(axes)}, got {value!r}."
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 6:
            raise ValueError(f"`{name}` entries must be integers in [0, 6], got {value!r}.")
    return tuple(values)


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold * |.|_1``: sign(v) * max(|v| - threshold, 0)."""
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0.0)


class GoverningEquation(nn.Module):
    """Term library, coefficients alpha, residual g and L1 penalty of PR-Net's Eq. 1.

    Terms are h^i for i = 0..max(max_power) (no derivative, shared by all axes), then for every
    axis a the terms h^i * d^j h / da^j with i = 0..max_power[a] and j = 1..max_derivative_order[a].
    With one axis and the defaults (3, 3) this is the paper's 16-term library.

    Args:
        axes: Names of the continuous axes d, used in labels (``h_xx``) and derivative dictionaries.
        max_power: Highest power of h, one integer for all axes or one per axis.
        max_derivative_order: Highest derivative order, one integer for all axes or one per axis.
        l1_weight: Weight w of the sparsity penalty R_G = w * sum |alpha|.
        print_threshold: Terms with |alpha| below this are left out of :meth:`equation`.
        variable: Name of the field in printed equations.
        init_std: Standard deviation of the normal initialization of alpha (0 gives zeros).

    Raises:
        ValueError: on empty or duplicated axes or out-of-range powers and orders.
    """

    def __init__(
        self,
        axes: Sequence[str] = ("d",),
        max_power: IntPerAxis = 3,
        max_derivative_order: IntPerAxis = 3,
        l1_weight: float = 1e-4,
        print_threshold: float = 1e-3,
        variable: str = "h",
        init_std: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(axes, str) or not axes or len(set(axes)) != len(axes):
            raise ValueError(f"`axes` must be a non-empty sequence of distinct names, e.g. ('x', 'y'), got {axes!r}.")
        for axis in axes:
            if not isinstance(axis, str) or not axis.isidentifier() or axis == "t":
                raise ValueError(f"axis names must be identifiers other than 't' (the time), got {axis!r}.")
        powers = _per_axis(max_power, axes, "max_power")
        orders = _per_axis(max_derivative_order, axes, "max_derivative_order")
        if not isinstance(l1_weight, (int, float)) or isinstance(l1_weight, bool) or l1_weight < 0:
            raise ValueError(f"`l1_weight` must be a number >= 0, got {l1_weight!r}.")
        if not isinstance(print_threshold, (int, float)) or print_threshold < 0:
            raise ValueError(f"`print_threshold` must be a number >= 0, got {print_threshold!r}.")
        self.axes = tuple(axes)
        self.max_power = dict(zip(self.axes, powers))
        self.max_derivative_order = dict(zip(self.axes, orders))
        self.l1_weight = float(l1_weight)
        self.print_threshold = float(print_threshold)
        self.variable = variable
        terms = [LibraryTerm(i, None, 0) for i in range(max(powers) + 1)]
        for axis, power, order in zip(self.axes, powers, orders):
            terms += [LibraryTerm(i, axis, j) for j in range(1, order + 1) for i in range(power + 1)]
        self.terms: tuple[LibraryTerm, ...] = tuple(terms)
        self.alpha = nn.Parameter(torch.randn(len(terms)) * init_std if init_std > 0 else torch.zeros(len(terms)))

    @property
    def num_terms(self) -> int:
        return len(self.terms)

    # -- library and residual -------------------------------------------------------------------
    def library(self, derivatives: CoordinateDerivatives) -> torch.Tensor:
        """Stack the library terms evaluated on ``derivatives``: shape (num_terms, *u.shape)."""
        missing = [a for a in self.axes if len(derivatives.spatial.get(a, ())) < self.max_derivative_order[a]]
        if missing:
            raise ValueError(
                f"derivatives up to order {self.max_derivative_order} are needed for axes {missing}; "
                f"got orders { {a: len(d) for a, d in derivatives.spatial.items()} }."
            )
        u = derivatives.u
        powers = [torch.ones_like(u), u]
        for _ in range(2, max(self.max_power.values()) + 1):
            powers.append(powers[-1] * u)
        columns = []
        for term in self.terms:
            power = powers[term.power]
            if term.order == 0:
                columns.append(power)
            else:
                derivative = derivatives.spatial[term.axis][term.order - 1]
                columns.append(derivative if term.power == 0 else power * derivative)
        return torch.stack(columns)

    def residual(self, time_derivative: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """g = h_t - sum_k alpha_k * term_k, with the shape of ``time_derivative``."""
        return time_derivative - torch.tensordot(self.alpha, library, dims=1)

    def governing_loss(self, time_derivative: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """L_G: the mean of g^2 over samples and query points."""
        return self.residual(time_derivative, library).pow(2).mean()

    def l1_penalty(self) -> torch.Tensor:
        """R_G = w * sum |alpha|."""
        return self.l1_weight * self.alpha.abs().sum()

    def library_from_function(
        self, function: Callable[[torch.Tensor], torch.Tensor], coordinates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Library and h_t of any differentiable ``function(coordinates)``, with exact derivatives.

        ``coordinates`` has shape (len(axes) + 1, *points): one row per axis, then the time t.
        The function must act pointwise, e.g. a closed-form solution h(x, t) of a known PDE.
        Returns ``(library, h_t)``.
        """
        if coordinates.shape[0] != len(self.axes) + 1:
            raise ValueError(
                f"`coordinates` needs {len(self.axes) + 1} rows ({', '.join(self.axes)}, t), got shape {tuple(coordinates.shape)}."
            )
        derivatives = coordinate_derivatives(
            function, coordinates, self.axes, dict(self.max_derivative_order), coordinate_dim=0
        )
        return self.library(derivatives), derivatives.u_t

    @torch.no_grad()
    def lipschitz_constant(self, library: torch.Tensor) -> float:
        """Lipschitz constant of the gradient of L_G in alpha: 2 * the largest eigenvalue of the library's
        Gram matrix. A gradient step on alpha is stable only for step sizes up to its inverse."""
        flat = library.reshape(library.shape[0], -1).to(self.alpha.dtype)
        gram = flat @ flat.T / flat.shape[1]
        return 2 * float(torch.linalg.eigvalsh(gram).max())

    @torch.no_grad()
    def fit_coefficients(
        self, library: torch.Tensor, time_derivative: torch.Tensor, steps: int = 5000, momentum: float = 0.9
    ) -> float:
        """Run ``steps`` proximal α-steps (:class:`ProximalSGD`) on L_G + R_G for a fixed library.

        The stand-alone sparse regression (e.g. to identify a known PDE from samples of its
        solution). Each step's gradient 2 (G alpha - b) comes from the Gram matrix G of the library,
        which equals the gradient of :meth:`governing_loss` but costs O(num_terms^2); the step size
        is 1 / Lipschitz constant. Returns the final L_G + R_G.
        """
        flat = library.reshape(library.shape[0], -1).to(self.alpha.dtype)
        target = time_derivative.reshape(-1).to(self.alpha.dtype)
        gram, correlation = flat @ flat.T / flat.shape[1], flat @ target / flat.shape[1]
        optimizer = ProximalSGD([self.alpha], lr=1.0 / self.lipschitz_constant(library), l1_weight=self.l1_weight,
                                momentum=momentum)
        for _ in range(steps):
            self.alpha.grad = 2 * (gram @ self.alpha - correlation)
            optimizer.step()
        self.alpha.grad = None
        return float(self.governing_loss(time_derivative, library) + self.l1_penalty())

    # -- sparsity ---------------------------------------------------------------------------------
    @torch.no_grad()
    def soft_threshold_(self, threshold: float) -> None:
        """Apply the L1 proximal step in place: coefficients with |alpha| <= threshold become exactly 0."""
        self.alpha.copy_(soft_threshold(self.alpha, threshold))

    def coefficients(self) -> dict[str, float]:
        """``{term label: alpha}`` for every term of the library."""
        return {term.label(self.variable): float(a) for term, a in zip(self.terms, self.alpha.detach().cpu())}

    def equation(self, threshold: Optional[float] = None) -> str:
        """The learned equation, e.g. ``h_t = 0.031 h_xx - 0.98 h h_x``, without terms below ``threshold``."""
        threshold = self.print_threshold if threshold is None else threshold
        parts = []
        for label, value in self.coefficients().items():
            if abs(value) < threshold or value == 0.0:
                continue
            sign = "-" if value < 0 else "+"
            body = f"{abs(value):.3g}" if label == "1" else f"{abs(value):.3g} {label}"
            parts.append((sign, body))
        if not parts:
            return f"{self.variable}_t = 0"
        text = ("-" if parts[0][0] == "-" else "") + parts[0][1]
        text += "".join(f" {sign} {body}" for sign, body in parts[1:])
        return f"{self.variable}_t = {text}"

    def extra_repr(self) -> str:
        return f"axes={self.axes}, terms={self.num_terms}, l1_weight={self.l1_weight}"

    def __str__(self) -> str:
        return self.equation()


class ProximalSGD(torch.optim.Optimizer):
    """Proximal gradient (ISTA) step for an L1-penalized loss: gradient step, then soft threshold.

    ``p <- soft_threshold(p - lr * grad, lr * l1_weight)``, the standard update for
    ``smooth_loss(p) + l1_weight * |p|_1`` (Beck & Teboulle 2009). Unlike a subgradient step it
    lands exactly on zero for coefficients whose gradient cannot outweigh the penalty. Pass only
    the smooth loss's gradient: the penalty is applied by the step itself.

    ISTA converges only for ``lr <= 1 / L`` (L: Lipschitz constant of the smooth gradient). When L
    changes between steps, as for PR-Net's library of a network in training, set each group's
    ``"max_lr"`` to ``1 / L`` before :meth:`step`: the step then uses ``min(lr, max_lr)``.

    Args:
        params: Parameters (typically ``GoverningEquation.alpha``).
        lr: Step size; converges for lr <= 1 / Lipschitz constant of the smooth gradient.
        l1_weight: Weight w of the L1 penalty.
        momentum: Heavy-ball momentum on the gradient step (0 gives plain ISTA).
    """

    def __init__(self, params, lr: float = 1e-2, l1_weight: float = 1e-4, momentum: float = 0.0) -> None:
        check_positive(lr, "lr")
        if not isinstance(l1_weight, (int, float)) or l1_weight < 0:
            raise ValueError(f"`l1_weight` must be a number >= 0, got {l1_weight!r}.")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        super().__init__(params, dict(lr=lr, l1_weight=l1_weight, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = min(group["lr"], group.get("max_lr", math.inf))
            weight, momentum = group["l1_weight"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if momentum > 0:
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    buffer = update.clone() if buffer is None else buffer.mul_(momentum).add_(update)
                    state["momentum_buffer"] = buffer
                    update = buffer
                param.copy_(soft_threshold(param - lr * update, lr * weight))
        return loss
