"""Weak (integral) form of the PDE term library: integrals of every term against test functions.

Pointwise derivatives of noisy samples amplify the noise by the derivative order: a third
derivative of data with 1% noise is mostly noise. The weak form instead multiplies the PDE by
smooth, compactly supported test functions phi and integrates over boxes of the grid; integration
by parts moves the derivatives onto phi, which is known exactly, and the integral averages the noise
(Messenger & Bortz 2021, "Weak SINDy for partial differential equations", J. Comput. Phys. 443;
Reinbold, Gurevich & Grigoriev 2020, "Using noisy or incomplete data to discover models of
spatiotemporal dynamics", Phys. Rev. E 101). The regression is then the same sparse regression, on
the integrals instead of the pointwise values.

Every term h^i d^j h / da^j of PR-Net's library is written as derivatives of functions of h and of
the first derivative h_a only, so that at most h_a is needed from the data:

* j = 0: h^i;
* j = 1: h^i h_a = (h^(i+1) / (i+1))_a;
* j = 2: h^i h_aa = (h^(i+1) / (i+1))_aa - i h^(i-1) h_a^2;
* j = 3: h^i h_aaa = (h^(i+1) / (i+1))_aaa - (3i/2) (h^(i-1) h_a^2)_a + (i(i-1)/2) h^(i-2) h_a^3.

The pure derivatives (i = 0, or j <= 1: every term of heat, Burgers and KdV) then need no
derivative of the data at all; the rest use h_a from a Savitzky-Golay fit. The time derivative is
integrated by parts as well: the integral of phi h_t is minus that of phi_t h.

Test functions are Messenger & Bortz's separable piecewise polynomials
phi = prod_d (1 - ((s_d - c_d) / r_d)^2)^p on boxes of half-width r_d = m_d grid steps, centred on
every grid point at least m_d points from the edges (a "valid" correlation). The integrals are sums
over the grid points times the steps: for a test function that vanishes with its first p - 1
derivatives at both ends this trapezoid rule is accurate to high order (Euler-Maclaurin).

Written here rather than taken from PySINDy's ``WeakPDELibrary`` (the reference implementation, used
in bench/bench_identification.py): PySINDy may not become a dependency, and its library is made of
derivatives of functions of h, not PR-Net's terms h^i d^j h. SciPy does the correlations (overlap-add FFT convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from numpy.polynomial import Polynomial
from scipy.signal import oaconvolve

from lightning_pdenets.blocks.sampled import (
    IntPerAxis,
    Spacing,
    _per_axis,
    check_finite_samples,
    check_sample_grid,
    savgol_derivatives,
    zero_if_steady,
)

__all__ = [
    "DEFAULT_BOX_FRACTION",
    "MAX_WEAK_ORDER",
    "MIN_DEFAULT_HALF_WIDTH",
    "quadrature_weights",
    "weak_form_library",
]

MAX_WEAK_ORDER = 3
"""Highest spatial derivative order that :func:`weak_form_library` rewrites (PR-Net's library has 3)."""

DEFAULT_BOX_FRACTION = 8
"""Default half-width of the test functions' boxes: the grid's points along a dimension divided by this.
Boxes a quarter of the grid wide identify heat, Burgers and KdV with 5% noise within 1.5% (worst of five
draws); narrower ones (a sixth, an eighth of the grid) leave heat with 5% noise 3-7% off, wider ones (half
the grid) keep spurious terms in 3 of 5 draws (bench/results_identification_boxes.md)."""

MIN_DEFAULT_HALF_WIDTH = 5
"""Smallest default half-width (where the grid allows): the sums over fewer than 11 points integrate the
test functions' derivatives poorly (heat on 21 time steps: 5% off with boxes of 5 points, 0.02% with 11)."""


class Term(Protocol):
    """A library term h^power d^order h / d axis^order, e.g. a governing.LibraryTerm (read-only attributes)."""

    @property
    def power(self) -> int: ...

    @property
    def axis(self) -> str | None: ...

    @property
    def order(self) -> int: ...


def quadrature_weights(half_width: int, step: float, degree: int, max_order: int) -> np.ndarray:
    """Quadrature weights of psi^(k)(s), k = 0..max_order, for psi(s) = (1 - (s / r)^2)^degree, r = half_width * step.

    Row k holds step * psi^(k) at the 2 * half_width + 1 grid points of [-r, r]; correlating samples
    with row k integrates them against psi^(k) (the trapezoid rule: psi vanishes at both ends).
    """
    unit = Polynomial([1.0, 0.0, -1.0]) ** degree  # on s / r in [-1, 1]
    points = np.arange(-half_width, half_width + 1) / half_width
    radius = half_width * step
    return np.stack([unit.deriv(k)(points) * step / radius**k for k in range(max_order + 1)])


def weak_form_library(
    samples: torch.Tensor,
    spacing: Spacing,
    axes: Sequence[str],
    terms: Sequence[Term],
    half_width: IntPerAxis | None = None,
    test_degree: int = 6,
    stride: IntPerAxis = 1,
    window_length: IntPerAxis = 21,
    polyorder: IntPerAxis = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrals of every library term and of h_t against test functions on boxes of the grid.

    Args:
        samples: Shape (..., *grid): the last len(axes) + 1 dimensions are the axes, then the
            time; leading dimensions are independent trajectories.
        spacing: Grid step of each axis, then of the time (uniform grids only).
        axes: Names of the spatial axes, in the order of the grid dimensions.
        terms: The library terms (``power``, ``axis``, ``order``), e.g. ``GoverningEquation.terms``;
            orders up to :data:`MAX_WEAK_ORDER`.
        half_width: Half-width m of the test functions' boxes in grid points, one for all or one per
            axis and the time; boxes span 2 m + 1 points. None: an eighth of the grid along every
            dimension (:data:`DEFAULT_BOX_FRACTION`), at least :data:`MIN_DEFAULT_HALF_WIDTH` where
            the grid allows. Wider boxes average more noise but must stay
            narrower than the solution's features (KdV's solitons, say).
        test_degree: Exponent p of the test functions (1 - s^2)^p; above the highest derivative order,
            so that the boundary terms of the integrations by parts vanish.
        stride: Distance between neighbouring box centres in grid points, one for all or per dimension.
        window_length: Savitzky-Golay window for h_a, needed only by terms h^i d^j h with i >= 1
            and j >= 2 (see :func:`~lightning_pdenets.blocks.sampled.savgol_derivatives`).
        polyorder: Savitzky-Golay degree for h_a.

    Returns:
        ``(library, h_t)``: shapes (len(terms), ..., *centres) and (..., *centres), one value per
        test function, in the samples' dtype. h_t is exactly 0 when the samples do not change in time
        to within rounding (:func:`~lightning_pdenets.blocks.sampled.zero_if_steady`).

    Raises:
        TypeError: on samples that are not a float32 or float64 tensor.
        ValueError: on a shape, spacing, box, degree or term that does not fit, or non-finite samples.
    """
    dims, steps = check_sample_grid(samples, axes, spacing)
    grid_shape = samples.shape[samples.ndim - len(dims) :]
    if half_width is None:
        half_width = [
            max(1, min((size - 1) // 2, max(size // DEFAULT_BOX_FRACTION, MIN_DEFAULT_HALF_WIDTH)))
            for size in grid_shape
        ]
    widths = _per_axis(half_width, dims, "half_width", 1, 10_000)
    strides = _per_axis(stride, dims, "stride", 1, 10_000)
    highest = max((term.order for term in terms), default=0)
    if highest > MAX_WEAK_ORDER or any(term.order and term.axis not in axes for term in terms):
        raise ValueError(
            f"the weak form rewrites derivative orders up to {MAX_WEAK_ORDER} along the axes {list(axes)}; got terms "
            f"with orders up to {highest}. Lower `max_derivative_order` or use the pointwise (Savitzky-Golay) library."
        )
    if isinstance(test_degree, bool) or not isinstance(test_degree, int) or not max(highest, 1) < test_degree <= 32:
        raise ValueError(
            f"`test_degree` (the test functions' exponent p) must be an integer above the highest derivative order "
            f"{max(highest, 1)} and at most 32, got {test_degree!r}."
        )
    for dim, size, width in zip(dims, grid_shape, widths):
        if 2 * width + 1 > size:
            raise ValueError(
                f"along {dim!r} ({size} points) the test functions' boxes of 2 * half_width + 1 points must fit the "
                f"grid; got half_width={width}."
            )
    check_finite_samples(samples)
    first_dim = samples.ndim - len(dims)
    kernels = [
        quadrature_weights(w, s, test_degree, highest if d != "t" else 1) for d, w, s in zip(dims, widths, steps)
    ]
    keep = tuple([slice(None)] * first_dim + [slice(None, None, k) for k in strides])

    def integral(values: np.ndarray, axis_index: int = -1, order: int = 0) -> np.ndarray:
        """The integral of phi^(order along dimension axis_index) * values over every box that fits."""
        for index, weights in enumerate(kernels):
            # a correlation is a convolution with the reversed weights; overlap-add FFTs, one dimension at a
            # time (phi is separable), are ~5x faster than direct sums for boxes of 50-130 points
            shape = [1] * values.ndim
            shape[first_dim + index] = -1
            kernel = weights[order if index == axis_index else 0][::-1].reshape(shape)
            values = oaconvolve(values, kernel, mode="valid", axes=first_dim + index)
        return values[keep]

    h = samples.detach().cpu().double().numpy()
    powers = [np.ones_like(h)]
    for _ in range(max((term.power for term in terms), default=0) + 1):
        powers.append(powers[-1] * h)
    needs_slope = {term.axis for term in terms if term.order >= 2 and term.power >= 1 and term.axis is not None}
    slopes: dict[str, np.ndarray] = {}
    for axis in needs_slope:
        try:
            derivatives = savgol_derivatives(samples, spacing, axes, {axis: 1}, window_length, polyorder, trim=False)
        except ValueError as error:
            raise ValueError(
                f"the weak form takes h_{axis} of the terms h^i d^j h with i >= 1, j >= 2 from a Savitzky-Golay fit "
                f"(`window_length`, `polyorder`): {error}"
            ) from error
        slopes[axis] = derivatives.spatial[axis][0].detach().cpu().double().numpy()

    def weak_term(term: Term) -> np.ndarray:
        i, j = term.power, term.order
        if j == 0:
            return integral(powers[i])
        index = axes.index(term.axis)
        # d^j/da^j moved onto phi: the integral of phi * f^(j) is (-1)^j that of phi^(j) * f
        column = (-1) ** j * integral(powers[i + 1] / (i + 1), index, j)
        if j >= 2 and i >= 1:
            slope = slopes[axes[index]]
            if j == 2:
                column = column - i * integral(powers[i - 1] * slope**2)
            else:
                column = column + 1.5 * i * integral(powers[i - 1] * slope**2, index, 1)
                if i >= 2:
                    column = column + 0.5 * i * (i - 1) * integral(powers[i - 2] * slope**3)
        return column

    library = torch.as_tensor(np.stack([weak_term(term) for term in terms])).to(samples.dtype)
    time_derivative = torch.as_tensor(-integral(h, len(axes), 1)).to(samples.dtype)
    gains = [float(np.abs(weights[1 if dim == "t" else 0]).sum()) for dim, weights in zip(dims, kernels)]
    taps = sum(2 * width + 1 for width in widths)
    return library, zero_if_steady(time_derivative, samples, gains, taps)
