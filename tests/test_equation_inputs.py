"""Hostile input to the governing-equation identification: each is refused with a short, actionable error, or
handled right (never a silently wrong equation).

* dtypes: integer, bool, complex and half-precision samples or coordinates, non-tensor and complex libraries;
* the printed equation keeps terms relative to the largest coefficient (data not of unit scale);
* term labels that would collide, and a bad ``variable`` or ``init_std``, fail at construction;
* string booleans are refused; steady data fits h_t = 0 with a warning; data of extreme scale fits or is refused;
* spacing errors are short, a NumPy array of steps is accepted; warnings point at the caller's line.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from lightning_pdenets.blocks.governing import GoverningEquation
from tests.closed_form_pdes import ONE_DIMENSIONAL, sampled
from tests.test_governing_equation import double_precision  # noqa: F401  (autouse: float64, seed 0)


def grid_samples(function, nx: int = 64, nt: int = 40, t_end: float = 1.0) -> tuple[torch.Tensor, tuple[float, float]]:
    """function(X, T) on a periodic grid of [0, 2 pi) x [0, t_end], and its steps."""
    x = torch.linspace(0, 2 * math.pi, nx + 1)[:-1]
    t = torch.linspace(0, t_end, nt)
    grid_x, grid_t = torch.meshgrid(x, t, indexing="ij")
    return function(grid_x, grid_t), (float(x[1] - x[0]), float(t[1] - t[0]))


def burgers_points(count: int = 300) -> tuple[GoverningEquation, torch.Tensor, torch.Tensor]:
    function, _, x_range, t_range = ONE_DIMENSIONAL["burgers"]
    coordinates = torch.stack([torch.empty(count).uniform_(*x_range), torch.empty(count).uniform_(*t_range)])
    equation = GoverningEquation(("x",))
    return equation, *equation.library_from_function(function, coordinates)


# -- dtypes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["weak", "pointwise"])
@pytest.mark.parametrize(
    "dtype, message",
    [
        (torch.int64, r"must be a floating-point tensor, got torch.int64 .* samples.double\(\)"),
        (torch.int32, r"must be a floating-point tensor, got torch.int32"),
        (torch.bool, r"must be a floating-point tensor, got torch.bool"),
        (torch.complex128, "complex data is not supported"),
        (torch.float16, r"must be float32 or float64, got torch.float16.* samples.double\(\)"),
        (torch.bfloat16, "must be float32 or float64, got torch.bfloat16"),
    ],
)
def test_samples_that_are_not_float32_or_float64_are_refused(form, dtype, message):
    """Integer samples used to give a library truncated to integers, complex ones their real part."""
    samples = (100 * torch.rand(64, 40)).to(dtype)
    with pytest.raises(TypeError, match=message):
        GoverningEquation(("x",)).library_from_samples(samples, (0.1, 0.1), form=form)


def test_non_tensor_samples_name_the_conversion():
    with pytest.raises(TypeError, match=r"`samples` must be a torch.Tensor, got ndarray; .*torch.as_tensor"):
        GoverningEquation(("x",)).library_from_samples(np.random.rand(64, 40), (0.1, 0.1))


@pytest.mark.parametrize(
    "dtype, message",
    [
        (torch.float16, r"`coordinates` must be float32 or float64, got torch.float16"),
        (torch.bfloat16, r"`coordinates` must be float32 or float64, got torch.bfloat16"),
        (torch.int64, r"`coordinates` must be a floating-point tensor, got torch.int64.*coordinates.double\(\)"),
        (torch.complex128, "complex data is not supported"),
    ],
)
def test_coordinates_that_are_not_float32_or_float64_are_refused(dtype, message):
    """Half precision gave a wrong equation silently, integers torch's unnamed 'Expected primal' error."""
    coordinates = (10 * torch.rand(2, 50)).to(dtype)
    with pytest.raises(TypeError, match=message):
        GoverningEquation(("x",)).library_from_function(lambda c: torch.sin(c[0]) * c[1], coordinates)


@pytest.mark.parametrize(
    "convert, message",
    [
        (lambda v: v.numpy(), r"`library` must be a torch.Tensor, got ndarray; convert it first with torch.as_tensor"),
        (lambda v: v.to(torch.complex128), "complex data is not supported"),
        (lambda v: v > 0, r"`library` must be a floating-point tensor, got torch.bool"),
        (lambda v: v.long(), r"`library` must be a floating-point tensor, got torch.int64"),
    ],
)
def test_fit_refuses_libraries_that_are_not_real_floating_tensors(convert, message):
    equation, library, h_t = burgers_points(50)
    with pytest.raises(TypeError, match=message):
        equation.fit_coefficients(convert(library), convert(h_t))


def test_fit_accepts_a_half_precision_library_and_computes_in_float64():
    equation, library, h_t = burgers_points()
    equation.fit_coefficients(library.float().half(), h_t.half(), threshold=0.05)
    assert equation.coefficients()["h h_x"] == pytest.approx(-1.0, rel=0.01)


# -- the printed equation ------------------------------------------------------------------------------
def test_printed_equation_keeps_terms_relative_to_the_largest_coefficient():
    """A heat equation with nu = 1e-4 printed as h_t = 0 with the old absolute threshold 1e-3."""
    equation = GoverningEquation(("x",))
    labels = [term.label() for term in equation.terms]
    with torch.no_grad():
        equation.alpha[labels.index("h_xx")] = 1e-4
        equation.alpha[labels.index("h")] = 5e-8  # below 1e-3 of the largest: left out
    assert str(equation) == "h_t = 0.0001 h_xx"
    with torch.no_grad():  # Burgers with h in mm/s: h h_x 1e-3 times smaller, and with it 5e-3 of h_xx
        equation.alpha[labels.index("h h_x")] = -5e-4
        equation.alpha[labels.index("h_xx")] = 0.1
    assert equation.equation() == "h_t = -0.0005 h h_x + 0.1 h_xx"
    assert equation.equation(threshold=0.5) == "h_t = 0.1 h_xx"
    assert equation.equation(threshold=0.0).startswith("h_t = 5e-08 h - 0.0005 h h_x")


def test_slow_heat_from_samples_prints_its_only_term():
    nu = 1e-4
    samples, spacing = grid_samples(
        lambda x, t: torch.exp(-nu * t) * torch.sin(x) + torch.exp(-4 * nu * t) * torch.sin(2 * x), t_end=5000.0
    )
    equation = GoverningEquation(("x",), max_power=2, max_derivative_order=2)
    fit = equation.fit_coefficients(*equation.library_from_samples(samples, spacing), threshold=0.05)
    assert fit.support == ("h_xx",) and str(equation) == "h_t = 0.0001 h_xx"


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, "0.1", True])
def test_print_thresholds_outside_zero_to_one_are_refused(value):
    with pytest.raises(ValueError, match=r"`print_threshold` is relative to the largest \|coefficient\|"):
        GoverningEquation(("x",), print_threshold=value)
    with pytest.raises(ValueError, match=r"`threshold` is relative .* must be a number in \[0, 1\]"):
        GoverningEquation(("x",), init_std=1.0).equation(threshold=value)


# -- construction ----------------------------------------------------------------------------------------
def test_axes_whose_term_labels_collide_are_refused():
    """('x', 'xx') labelled two terms h_xx, and coefficients() (a dict by label) lost one."""
    with pytest.raises(ValueError, match=r"the axes \('x', 'xx'\) give several terms the labels \['h_xx'\]"):
        GoverningEquation(("x", "xx"), max_power=0, max_derivative_order=2)
    assert GoverningEquation(("x", "xx"), max_power=0, max_derivative_order=1).num_terms == 3  # h_x, h_xx: distinct


@pytest.mark.parametrize("variable", ["", "h t", "5", 5, None])
def test_variable_must_be_an_identifier(variable):
    with pytest.raises(ValueError, match=r"`variable` \(the field's name in term labels\) must be a non-empty"):
        GoverningEquation(("x",), variable=variable)


def test_another_variable_names_every_label():
    equation = GoverningEquation(("x",), max_power=1, max_derivative_order=1, variable="u", init_std=1.0)
    assert list(equation.coefficients()) == ["1", "u", "u_x", "u u_x"] and str(equation).startswith("u_t = ")


@pytest.mark.parametrize("init_std", [-1.0, math.nan, math.inf])
def test_init_std_must_be_finite_and_non_negative(init_std):
    with pytest.raises(ValueError, match="`init_std` must be a finite number >= 0"):
        GoverningEquation(("x",), init_std=init_std)


# -- booleans ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argument", ["debias", "normalize"])
def test_fit_refuses_string_booleans(argument):
    equation, library, h_t = burgers_points(50)
    with pytest.raises(ValueError, match=f"`{argument}` must be True or False, got 'no'"):
        equation.fit_coefficients(library, h_t, **{argument: "no"})


@pytest.mark.parametrize("form", ["weak", "pointwise"])
def test_library_from_samples_refuses_a_string_trim(form):
    with pytest.raises(ValueError, match="`trim` must be True or False, got 'no'"):
        GoverningEquation(("x",)).library_from_samples(torch.rand(64, 40), (0.1, 0.1), form=form, trim="no")


# -- steady data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["weak", "pointwise"])
@pytest.mark.parametrize("steady", ["profile", "constant"])
def test_data_that_does_not_change_in_time_fits_h_t_equals_zero_with_a_warning(steady, form, dtype):
    """h_t at rounding level used to be fitted: all 16 terms in the support."""
    samples, spacing = grid_samples(
        (lambda x, t: 1e3 * torch.exp(-((x - 3) ** 2)) + 0 * t) if steady == "profile" else lambda x, t: 3.7 + 0 * x
    )
    equation = GoverningEquation(("x",))
    library, h_t = equation.library_from_samples(samples.to(dtype), spacing, form=form, window_length=11)
    assert not h_t.any()
    with pytest.warns(RuntimeWarning, match="the data does not change in time") as record:
        fit = equation.fit_coefficients(library, h_t, threshold=0.05)
    assert fit.support == () and str(equation) == "h_t = 0" and not equation.alpha.any()
    assert len(record) == 1  # not also the ill-conditioned warning of a single profile


def test_changing_data_keeps_its_time_derivative():
    samples, spacing = grid_samples(lambda x, t: torch.sin(x) * (1 + 1e-6 * t))  # changes by 1e-6 only
    _, h_t = GoverningEquation(("x",)).library_from_samples(samples.double(), spacing)
    assert h_t.abs().min() > 0


# -- scale and representable coefficients ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e60, 1e-60])
def test_coefficients_outside_alphas_dtype_are_refused_and_fit_in_float64(scale):
    """At h * 1e60 the Gram matrix overflowed (a raw LinAlgError); at h * 1e-60 the float32 alpha got -inf."""
    function, _, x_range, t_range = ONE_DIMENSIONAL["burgers"]
    coordinates = torch.stack([torch.empty(300).uniform_(*x_range), torch.empty(300).uniform_(*t_range)])
    equation = GoverningEquation(("x",)).float()
    library, h_t = GoverningEquation(("x",)).library_from_function(lambda c: scale * function(c), coordinates)
    with pytest.raises(ValueError, match=r"outside what alpha's dtype torch.float32 holds .*`equation.double\(\)`"):
        equation.fit_coefficients(library, h_t, threshold=0.05)
    assert not equation.alpha.any()  # left as it was
    equation.double().fit_coefficients(library, h_t, threshold=0.05)
    assert equation.coefficients()["h h_x"] == pytest.approx(-1.0 / scale, rel=1e-6)
    assert equation.coefficients()["h_xx"] == pytest.approx(0.1, rel=1e-6)


def test_fit_refuses_no_points_and_subnormal_terms():
    equation, library, h_t = burgers_points(50)
    with pytest.raises(ValueError, match=r"hold no points \(shapes \(16, 0\) and \(0,\)\)"):
        equation.fit_coefficients(library[:, :0], h_t[:0])
    library[3] = 1e-310  # below float64's normal range
    with pytest.raises(ValueError, match=r"h\^3 is at most 1e-310 .* rescale the data"):
        equation.fit_coefficients(library, h_t)


# -- spacing --------------------------------------------------------------------------------------------------
def test_a_non_uniform_grid_gets_a_short_message():
    x = np.linspace(0, 1, 257) ** 2
    with pytest.raises(ValueError, match="only uniform grids are supported") as error:
        GoverningEquation(("x",)).library_from_samples(torch.rand(256, 40), (np.diff(x), 0.1))
    assert len(str(error.value)) < 300 and "ndarray of 256 values (" in str(error.value)


def test_a_numpy_array_or_tensor_of_steps_is_accepted():
    samples, spacing = sampled("burgers", 64, 41)
    equation = GoverningEquation(("x",))
    reference = equation.library_from_samples(samples, spacing)
    for steps in (np.array(spacing), torch.tensor(spacing), tuple(torch.tensor(s) for s in spacing)):
        for computed, expected in zip(equation.library_from_samples(samples, steps), reference):
            torch.testing.assert_close(computed, expected, rtol=0, atol=0)


# -- warnings point at the caller ---------------------------------------------------------------------------
def test_fit_warnings_point_at_the_callers_line():
    """They pointed at torch/utils/_contextlib.py, the frame of the @torch.no_grad() decorator."""
    generator = torch.Generator().manual_seed(0)
    library, h_t = torch.randn(16, 8, generator=generator), torch.randn(8, generator=generator)  # 8 points, 16 terms
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        GoverningEquation(("x",)).fit_coefficients(library, h_t, max_steps=1)
    messages = {str(w.message).split(" ", 3)[1]: w.filename for w in record}
    assert {"library", "stopped"} <= set(messages) and set(messages.values()) == {__file__}
