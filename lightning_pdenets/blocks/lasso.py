"""A Lasso solver on Gram matrices with a certified optimum, and sequentially thresholded least squares.

The sparse regression behind :meth:`lightning_pdenets.blocks.GoverningEquation.fit_coefficients`, usable on its own:
:func:`lasso` minimizes ``beta^T G beta - 2 c^T beta + energy + sum_k w_k |beta_k|`` by FISTA with adaptive
restart (Beck & Teboulle 2009; O'Donoghue & Candes 2015) until the duality gap certifies the optimum, and
:func:`sequential_threshold` is STLSQ (Brunton et al. 2016; PDE-FIND's STRidge, Rudy et al. 2017).
:func:`soft_threshold` is the proximal operator of the L1 norm that both the solver and
:class:`~lightning_pdenets.models.optim.ProximalSGD` apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LassoSolution",
    "lasso",
    "lasso_objective",
    "least_squares_on_support",
    "sequential_threshold",
    "soft_threshold",
]

POLISH_EVERY = 25
"""FISTA steps between two attempts at the exact solution on the current support."""


def soft_threshold(values: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The proximal operator of ``threshold * |.|_1`` (per entry if a tensor): sign(v) * max(|v| - threshold, 0)."""
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0.0)


@dataclass(frozen=True)
class LassoSolution:
    """What :func:`lasso` found: the coefficients, the objective and duality gap there, the steps, and convergence."""

    coefficients: torch.Tensor
    objective: float
    duality_gap: float
    steps: int
    converged: bool


def lasso_objective(
    gram: torch.Tensor, correlation: torch.Tensor, energy: torch.Tensor, weights: torch.Tensor, beta: torch.Tensor
) -> float:
    """mean((b - X beta)^2) + sum_k w_k |beta_k| in Gram form: G = X^T X / n, c = X^T b / n, energy = b^T b / n."""
    return float(energy - 2 * correlation @ beta + beta @ gram @ beta + weights @ beta.abs())


def duality_gap(
    gram: torch.Tensor, correlation: torch.Tensor, energy: torch.Tensor, weights: torch.Tensor, beta: torch.Tensor
) -> float:
    """The Lasso duality gap at beta, with the scaled residual as dual point (as scikit-learn's coordinate
    descent computes it), here for mean((b - X beta)^2) + sum_k w_k |beta_k| in Gram form."""
    residual_energy = energy - 2 * correlation @ beta + beta @ gram @ beta
    residual_correlation = energy - correlation @ beta  # b^T r / n
    dual_norm = float(((correlation - gram @ beta).abs() / (weights / 2)).max())  # weighted |X^T r / n|_inf
    scale = 1.0 if dual_norm <= 1 else 1 / dual_norm
    return float(residual_energy * (1 + scale**2) + weights @ beta.abs() - 2 * scale * residual_correlation)


def least_squares_on_support(
    gram: torch.Tensor, correlation: torch.Tensor, support: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Solve G_SS beta_S = c_S (- offset_S) on the support S; zero elsewhere."""
    beta = torch.zeros_like(correlation)
    index = support.nonzero().squeeze(1)
    if index.numel():
        rhs = correlation[index] if offset is None else correlation[index] - offset[index]
        beta[index] = torch.linalg.lstsq(gram[index][:, index], rhs[:, None]).solution[:, 0]
    return beta


def lasso(
    gram: torch.Tensor,
    correlation: torch.Tensor,
    energy: torch.Tensor,
    weights: torch.Tensor,
    tol: float,
    max_steps: int,
) -> LassoSolution:
    """min_beta beta^T G beta - 2 c^T beta + energy + sum_k w_k |beta_k| by FISTA with adaptive restart.

    FISTA (Beck & Teboulle 2009) with the gradient restart scheme of O'Donoghue & Candes (2015),
    on a Gram matrix with unit diagonal (normalized columns; per-term weights carry any other
    scaling), which keeps first-order steps fast on PDE libraries. Written by hand rather than
    with scikit-learn's coordinate descent because it works on the num_terms^2 Gram matrix in
    torch (any number of points), and because of the exact-solution polish: every
    ``POLISH_EVERY`` steps the Lasso's KKT system on the current support and signs is solved
    directly, which ends in a few hundred steps where first-order methods crawl. Stops when the
    duality gap is below ``tol`` times the objective, floored at the rounding of the Gram form.

    Args:
        gram: G = X^T X / n, shape (terms, terms), best with unit diagonal.
        correlation: c = X^T b / n, shape (terms,).
        energy: b^T b / n (a 0-d tensor).
        weights: Per-term L1 weights w_k >= 0; all zero gives the least-squares fit.
        tol: Relative duality gap at which it stops.
        max_steps: Most FISTA steps; ``converged`` is False when they did not suffice.
    """
    if not bool((weights > 0).any()):
        beta = least_squares_on_support(gram, correlation, torch.ones_like(correlation, dtype=torch.bool))
        return LassoSolution(beta, lasso_objective(gram, correlation, energy, weights, beta), 0.0, 0, True)
    step = 1.0 / max(2 * float(torch.linalg.eigvalsh(gram)[-1]), 1e-300)
    rounding = 64 * torch.finfo(gram.dtype).eps * float(energy + correlation.abs().sum())
    beta = torch.zeros_like(correlation)
    extrapolated, momentum = beta, 1.0
    for steps in range(1, max_steps + 1):
        previous = beta
        beta = soft_threshold(extrapolated - step * 2 * (gram @ extrapolated - correlation), step * weights)
        if torch.dot(extrapolated - beta, beta - previous) > 0:  # the momentum points uphill: restart
            extrapolated, momentum = beta, 1.0
        else:
            next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
            extrapolated = beta + (momentum - 1) / next_momentum * (beta - previous)
            momentum = next_momentum
        if steps % POLISH_EVERY and steps != max_steps:
            continue
        polished = least_squares_on_support(gram, correlation, beta != 0, weights / 2 * torch.sign(beta))
        for candidate in (polished, beta):
            objective = lasso_objective(gram, correlation, energy, weights, candidate)
            gap = duality_gap(gram, correlation, energy, weights, candidate)
            if gap <= max(tol * objective, rounding):
                return LassoSolution(candidate, objective, gap, steps, True)
    return LassoSolution(beta, objective, gap, max_steps, False)


def sequential_threshold(
    gram: torch.Tensor, correlation: torch.Tensor, beta: torch.Tensor, threshold: float
) -> torch.Tensor:
    """STLSQ (Brunton et al. 2016): drop |beta| < threshold, refit the rest by least squares, repeat."""
    support = beta.abs() >= threshold
    for _ in range(beta.numel()):  # the support only shrinks, so this ends
        beta = least_squares_on_support(gram, correlation, support)
        smaller = support & (beta.abs() >= threshold)
        if torch.equal(smaller, support):
            break
        support = smaller
    return least_squares_on_support(gram, correlation, support)
