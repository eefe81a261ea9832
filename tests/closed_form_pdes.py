"""Closed-form solutions of known PDEs, the references of the identification tests and bench.

None of them is a single traveling wave h(x - c t), which also satisfies the sparser h_t = -c h_x:

* heat: h_t = nu h_xx with two Fourier modes (so h_xx is not a multiple of h);
* Burgers: h_t = -h h_x + nu h_xx, the Cole-Hopf transform of a heat kernel (a spreading front);
* KdV: h_t = -6 h h_x - h_xxx, the two-soliton solution (the faster soliton overtakes the slower);
* 2D heat: h_t = nu (h_xx + h_yy) with modes of different wave numbers along x and y.

Every function takes coordinates stacked on the first dimension, (x, t) or (x, y, t), as torch
tensors, and acts pointwise.
"""

from __future__ import annotations

import math

import torch


def heat(c: torch.Tensor, nu: float = 0.5) -> torch.Tensor:
    x, t = c
    return torch.exp(-nu * t) * torch.sin(x) + torch.exp(-4 * nu * t) * torch.sin(2 * x)


def burgers(c: torch.Tensor, nu: float = 0.1, mass: float = 4.0, t0: float = 0.5) -> torch.Tensor:
    """Cole-Hopf: h = -2 nu phi_x / phi, phi = 1 + mass * G, G the heat kernel of diffusivity nu at t + t0."""
    x, t = c
    s = t + t0
    kernel = torch.exp(-(x**2) / (4 * nu * s)) / torch.sqrt(4 * math.pi * nu * s)
    return -2 * nu * mass * kernel * (-x / (2 * nu * s)) / (1 + mass * kernel)


def kdv(c: torch.Tensor, k1: float = 1.0, k2: float = 1.6, x1: float = -4.0, x2: float = -8.0) -> torch.Tensor:
    """Two-soliton (Hirota): h = 2 (log F)_xx, F = 1 + e1 + e2 + a e1 e2, e_i = exp(k_i (x - x_i) - k_i^3 t)."""
    x, t = c
    e1 = torch.exp(k1 * (x - x1) - k1**3 * t)
    e2 = torch.exp(k2 * (x - x2) - k2**3 * t)
    e12 = ((k1 - k2) / (k1 + k2)) ** 2 * e1 * e2
    f = 1 + e1 + e2 + e12
    f_x = k1 * e1 + k2 * e2 + (k1 + k2) * e12
    f_xx = k1**2 * e1 + k2**2 * e2 + (k1 + k2) ** 2 * e12
    return 2 * (f * f_xx - f_x**2) / f**2


def heat_2d(c: torch.Tensor, nu: float = 0.3) -> torch.Tensor:
    x, y, t = c
    modes = torch.sin(x) * torch.sin(y) * torch.exp(-2 * nu * t) + torch.sin(x) * torch.sin(2 * y) * torch.exp(
        -5 * nu * t
    )
    return modes + torch.sin(2 * x) * torch.cos(y) * torch.exp(-5 * nu * t)  # no axis sees a single wave number


# name: (function, true coefficients, x range, t range)
ONE_DIMENSIONAL = {
    "heat": (heat, {"h_xx": 0.5}, (0.0, 2 * math.pi), (0.0, 1.0)),
    "burgers": (burgers, {"h h_x": -1.0, "h_xx": 0.1}, (-4.0, 4.0), (0.0, 4.0)),
    "kdv": (kdv, {"h h_x": -6.0, "h_xxx": -1.0}, (-15.0, 15.0), (0.0, 4.0)),
}


def grid(x_range: tuple[float, float], t_range: tuple[float, float], nx: int, nt: int) -> tuple[torch.Tensor, ...]:
    """Uniform grid vectors x (right end excluded) and t (both ends included), float64."""
    x = torch.linspace(*x_range, nx + 1, dtype=torch.float64)[:-1]
    t = torch.linspace(*t_range, nt, dtype=torch.float64)
    return x, t


def sampled(name: str, nx: int = 256, nt: int = 101) -> tuple[torch.Tensor, tuple[float, float]]:
    """The solution ``name`` of :data:`ONE_DIMENSIONAL` on an nx x nt grid, and the spacing (dx, dt)."""
    function, _, x_range, t_range = ONE_DIMENSIONAL[name]
    x, t = grid(x_range, t_range, nx, nt)
    values = function(torch.stack(torch.meshgrid(x, t, indexing="ij")))
    return values, (float(x[1] - x[0]), float(t[1] - t[0]))
