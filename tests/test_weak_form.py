"""The weak form of the term library (issue 30, item 3): integrals against test functions.

* the quadrature weights integrate the test functions and their derivatives exactly;
* every weak column equals the integral of the pointwise term (exact derivatives of the closed-form
  solutions) against the test function: the integrations by parts are right, for all 16 terms;
* from samples with 1% multiplicative noise the defaults identify KdV (where the pointwise
  Savitzky-Golay route is 40-100% off), heat and 2D heat;
* trajectories are not mixed, and bad settings get errors naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.special import beta

from lightning_pdenets.blocks.governing import GoverningEquation
from lightning_pdenets.blocks.weak_form import quadrature_weights, weak_form_library
from tests.closed_form_pdes import ONE_DIMENSIONAL, grid, heat_2d, sampled
from tests.test_governing_equation import double_precision  # noqa: F401  (autouse: float64, seed 0)


def noisy(samples: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Multiplicative noise h (1 + sigma N(0, 1)), the convention of bench/bench_identification.py."""
    return samples * (1 + sigma * torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed)))


def worst_error(equation: GoverningEquation, expected: dict[str, float]) -> float:
    coefficients = equation.coefficients()
    return max(abs(coefficients[term] / value - 1) for term, value in expected.items())


@pytest.mark.parametrize("degree", [6, 8])
def test_quadrature_weights_integrate_the_test_function_and_its_derivatives(degree):
    """Sum of step * psi = r * B(1/2, p + 1); sums of derivatives vanish; odd derivatives are odd."""
    half_width, step = 12, 0.05
    weights = quadrature_weights(half_width, step, degree, 3)
    radius = half_width * step
    assert weights.shape == (4, 2 * half_width + 1)
    # the trapezoid rule on 25 points: exact to ~1e-7 here
    assert weights[0].sum() == pytest.approx(radius * beta(0.5, degree + 1), rel=1e-6)
    for k in (1, 2, 3):
        assert abs(weights[k].sum()) < 1e-5 * abs(weights[k]).sum()
        assert weights[k][::-1] == pytest.approx((-1) ** k * weights[k])
    assert weights[0][0] == weights[0][-1] == 0.0


def boxed_integrals(
    values: torch.Tensor, spacing: tuple[float, float], half_width: tuple[int, int], degree: int
) -> torch.Tensor:
    """Integrals of values(..., x, t) against phi on every box, by unfolding the boxes (independent of
    the module's scipy correlation and of its quadrature weights)."""
    phi = [(1 - torch.linspace(-1, 1, 2 * m + 1) ** 2) ** degree * step for m, step in zip(half_width, spacing)]
    boxes = values.unfold(-2, 2 * half_width[0] + 1, 1).unfold(-2, 2 * half_width[1] + 1, 1)
    return torch.einsum("...ijab,a,b->...ij", boxes, *phi)


def relative_errors(
    equation: GoverningEquation,
    function,
    x: torch.Tensor,
    t: torch.Tensor,
    half_width: tuple[int, int],
    degree: int,
    window_length: int = 11,
) -> dict[str, float]:
    """Largest difference between each weak column (and h_t) and the integral of the exact pointwise term,
    relative to the largest integral."""
    coordinates = torch.stack(torch.meshgrid(x, t, indexing="ij"))
    spacing = (float(x[1] - x[0]), float(t[1] - t[0]))
    exact_library, exact_h_t = equation.library_from_function(function, coordinates)
    library, h_t = weak_form_library(
        function(coordinates),
        spacing,
        ("x",),
        equation.terms,
        half_width,
        degree,
        window_length=window_length,
        polyorder=4,
    )
    labels = ["h_t", *(term.label() for term in equation.terms)]
    computed = torch.cat([h_t[None], library])
    expected = boxed_integrals(torch.cat([exact_h_t[None], exact_library]), spacing, half_width, degree)
    assert computed.shape == expected.shape == (17, len(x) - 2 * half_width[0], len(t) - 2 * half_width[1])
    return {label: float((c - e).abs().max() / e.abs().max()) for label, c, e in zip(labels, computed, expected)}


def test_weak_columns_are_the_integrals_of_the_pointwise_terms_on_a_polynomial():
    """Integration by parts, all 16 terms: on a polynomial field the Savitzky-Golay slope h_x is exact,
    so each weak column equals the integral of the exact term up to the trapezoid rule's error."""

    def field(c: torch.Tensor) -> torch.Tensor:
        x, t = c
        return (x**3 - 2 * x + 0.5) * (1 + t - 0.5 * t**2)

    errors = relative_errors(
        GoverningEquation(("x",)), field, torch.linspace(-1, 1, 101), torch.linspace(0, 2, 41), (30, 10), degree=8
    )
    assert max(errors.values()) < 2e-6, errors


def test_weak_columns_are_the_integrals_of_the_pointwise_terms_on_kdv():
    """The two-soliton KdV solution: the terms needing no derivative of the data (h_t, h^i, h^i h_x,
    h_xx, h_xxx) match to the quadrature's accuracy; the others carry the Savitzky-Golay slope's error."""
    function, _, x_range, t_range = ONE_DIMENSIONAL["kdv"]
    errors = relative_errors(
        GoverningEquation(("x",)), function, *grid(x_range, t_range, 128, 41), (16, 8), degree=8, window_length=7
    )
    needs_slope = {"h h_xx", "h^2 h_xx", "h^3 h_xx", "h h_xxx", "h^2 h_xxx", "h^3 h_xxx"}
    assert max(v for k, v in errors.items() if k not in needs_slope) < 1e-5, errors
    assert max(errors[k] for k in needs_slope) < 5e-2, errors


@pytest.mark.parametrize("seed", range(2))
def test_identifies_kdv_from_samples_with_one_percent_noise_at_the_defaults(seed):
    """Issue 30's target: 5% (goal 2%) at 1% noise; the pointwise form is 40-100% off on this data."""
    samples, spacing = sampled("kdv", 256, 101)
    equation = GoverningEquation(("x",))
    fit = equation.fit_coefficients(*equation.library_from_samples(noisy(samples, 0.01, seed), spacing), threshold=0.05)
    assert set(fit.support) == {"h h_x", "h_xxx"}
    assert worst_error(equation, ONE_DIMENSIONAL["kdv"][1]) < 0.02


@pytest.mark.parametrize("seed", range(2))
def test_identifies_heat_from_samples_with_one_percent_noise_at_the_defaults(seed):
    samples, spacing = sampled("heat", 128, 51)
    equation = GoverningEquation(("x",))
    fit = equation.fit_coefficients(*equation.library_from_samples(noisy(samples, 0.01, seed), spacing), threshold=0.05)
    assert fit.support == ("h_xx",)
    assert worst_error(equation, ONE_DIMENSIONAL["heat"][1]) < 0.01


def test_default_boxes_keep_enough_points_on_short_grids():
    """21 time steps: an eighth would be boxes of 5 points (heat 5% off); the floor of 11 points gives 0.1%."""
    samples, spacing = sampled("heat", 64, 21)
    equation = GoverningEquation(("x",))
    library, h_t = equation.library_from_samples(noisy(samples, 0.01, 0), spacing, window_length=11)
    assert library.shape == (16, 64 - 2 * 8, 21 - 2 * 5)
    fit = equation.fit_coefficients(library, h_t, threshold=0.05)
    assert fit.support == ("h_xx",)
    assert worst_error(equation, ONE_DIMENSIONAL["heat"][1]) < 0.01


def test_identifies_two_dimensional_heat_with_one_percent_noise():
    """Two axes: each family integrates by parts along its own axis (28 terms, h_t = 0.3 (h_xx + h_yy))."""
    x = torch.linspace(0, 2 * math.pi, 41)[:-1]
    t = torch.linspace(0, 1, 25)
    samples = heat_2d(torch.stack(torch.meshgrid(x, x, t, indexing="ij")))
    spacing = (float(x[1] - x[0]), float(x[1] - x[0]), float(t[1] - t[0]))
    equation = GoverningEquation(("x", "y"))
    library, h_t = equation.library_from_samples(noisy(samples, 0.01, 0), spacing, window_length=(11, 11, 11))
    fit = equation.fit_coefficients(library, h_t, threshold=0.05)
    assert set(fit.support) == {"h_xx", "h_yy"}
    assert worst_error(equation, {"h_xx": 0.3, "h_yy": 0.3}) < 0.01


def test_trajectories_are_integrated_separately():
    first, spacing = sampled("burgers", 64, 31)
    second = 0.5 * first.flip(0)
    equation = GoverningEquation(("x",))
    together, h_t = equation.library_from_samples(torch.stack([first, second]), spacing, window_length=11)
    alone, alone_h_t = equation.library_from_samples(second, spacing, window_length=11)
    assert together.shape[:2] == (16, 2)
    torch.testing.assert_close(together[:, 1], alone)
    torch.testing.assert_close(h_t[1], alone_h_t)


def test_stride_keeps_every_other_box():
    samples, spacing = sampled("burgers", 64, 31)
    terms = GoverningEquation(("x",)).terms
    every, h_t = weak_form_library(samples, spacing, ("x",), terms, window_length=11)
    sparse, sparse_h_t = weak_form_library(samples, spacing, ("x",), terms, stride=(2, 3), window_length=11)
    torch.testing.assert_close(sparse, every[:, ::2, ::3])
    torch.testing.assert_close(sparse_h_t, h_t[::2, ::3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(form="strong"), r"`form` must be 'weak' or 'pointwise', got 'strong'"),
        (dict(half_width=(30, 5)), r"along 'x' \(50 points\) the test functions' boxes .* half_width=30"),
        (dict(half_width=(3, 3, 3)), r"`half_width` must be an integer or one integer per axis \['x', 't'\]"),
        (dict(test_degree=3), r"`test_degree` .* above the highest derivative order 3 .* got 3"),
        (dict(test_degree=True), r"`test_degree` .* got True"),
        (dict(spacing=(0.1, 0.0)), r"`spacing` must hold one grid step > 0"),
        (dict(window_length=41), r"the weak form takes h_x of the terms .* Savitzky-Golay .* along 't' \(40 points"),
    ],
)
def test_bad_weak_form_settings_are_explained(kwargs, message):
    kwargs = {"spacing": (0.1, 0.1), "window_length": 11, **kwargs}
    with pytest.raises(ValueError, match=message):
        GoverningEquation(("x",)).library_from_samples(torch.rand(50, 40), **kwargs)


def test_orders_beyond_three_are_refused_with_the_alternative():
    equation = GoverningEquation(("x",), max_derivative_order=4)
    with pytest.raises(ValueError, match=r"orders up to 3 .* got terms with orders up to 4.* pointwise"):
        equation.library_from_samples(torch.rand(50, 40), (0.1, 0.1))
    library, _ = equation.library_from_samples(torch.rand(50, 40), (0.1, 0.1), window_length=11, form="pointwise")
    assert library.shape[0] == equation.num_terms


def test_non_finite_samples_are_located_in_the_weak_form():
    samples = torch.rand(40, 30)
    samples[3, 7] = math.inf
    with pytest.raises(ValueError, match=r"1 non-finite values, e.g. at indices \[\(3, 7\)\]"):
        GoverningEquation(("x",)).library_from_samples(samples, (0.1, 0.1), window_length=11)
