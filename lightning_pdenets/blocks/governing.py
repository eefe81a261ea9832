"""The governing equation of PR-Net: a sparse library of polynomial-times-derivative terms.

Kim, Choi, Ham, Kim & Park, "PDE-regularized neural networks for image classification"
(PR-Net), Eq. 1. The residual of a hidden field h(d, t) is

    g = h_t - sum_{i=0..P} sum_{j=0..J} alpha_ij * h^i * d^j h / dd^j,

with one family of derivative terms per continuous axis (``x``, ``y``, ...). The coefficients
alpha are learned with an L1 penalty, so that they describe a sparse, readable PDE; during
training :class:`~lightning_pdenets.models.optim.ProximalSGD` performs the soft-threshold (ISTA) step that sets small
coefficients exactly to zero.

The module also works on its own, as an equation-identification tool (PDE-FIND, Rudy et al.
2017; SINDy, Brunton et al. 2016): :meth:`GoverningEquation.library_from_function` builds the
term library of any differentiable function with exact derivatives,
:meth:`GoverningEquation.library_from_samples` that of gridded, noisy samples (in the weak form by
default, :mod:`lightning_pdenets.blocks.weak_form`), and
:meth:`GoverningEquation.fit_coefficients` solves the sparse regression to a certified optimum.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from lightning_pdenets.blocks.lasso import (
    lasso,
    lasso_objective,
    least_squares_on_support,
    sequential_threshold,
)
from lightning_pdenets.blocks.pde import CoordinateDerivatives, coordinate_derivatives
from lightning_pdenets.blocks.sampled import IntPerAxis, Spacing, _per_axis, check_float_tensor, savgol_derivatives
from lightning_pdenets.blocks.weak_form import weak_form_library
from lightning_pdenets.validation import check_bool, check_non_negative, check_positive, check_positive_int

__all__ = ["GoverningEquation", "LibraryTerm", "SparseFit"]

ILL_CONDITIONED = 1e8
"""Condition number of the normalized Gram matrix above which :meth:`GoverningEquation.fit_coefficients`
warns: some combination of terms is then below 1e-4 of their RMS, under 1% noise in the data."""


@dataclass(frozen=True)
class LibraryTerm:
    """One term h^power * (d^order h / d axis^order) of the library (``axis`` is None when order is 0)."""

    power: int
    axis: str | None
    order: int

    def label(self, variable: str = "h") -> str:
        """Human-readable name, e.g. ``1``, ``h``, ``h^2 h_xx``."""
        factors = []
        if self.power == 1:
            factors.append(variable)
        elif self.power > 1:
            factors.append(f"{variable}^{self.power}")
        if self.order > 0:
            factors.append(f"{variable}_{cast(str, self.axis) * self.order}")  # a derivative has an axis
        return " ".join(factors) or "1"


@dataclass(frozen=True)
class SparseFit:
    """What :meth:`GoverningEquation.fit_coefficients` found.

    Attributes:
        objective: L_G + w * sum |beta| at the returned coefficients (normalized units if normalized).
        duality_gap: Lasso duality gap at the Lasso solution: an upper bound on its distance to the optimum.
        steps: FISTA steps taken.
        converged: Whether the relative duality gap reached ``tol``.
        support: Labels of the non-zero terms.
    """

    objective: float
    duality_gap: float
    steps: int
    converged: bool
    support: tuple[str, ...]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_relative_threshold(value: object, argument: str) -> float:
    """``value`` as a float, after checking it is a fraction in [0, 1] (of the largest |coefficient|)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"`{argument}` is relative to the largest |coefficient| and must be a number in [0, 1] (e.g. 1e-3; "
            f"0 prints every non-zero term), got {value!r}."
        )
    return float(value)


def _reverse_mode_derivatives(
    function: Callable[[torch.Tensor], torch.Tensor],
    coordinates: torch.Tensor,
    axes: Sequence[str],
    orders: dict[str, int],
) -> CoordinateDerivatives:
    """Exact derivatives of a pointwise ``function`` by nested reverse-mode autograd.

    The fallback of :meth:`GoverningEquation.library_from_function` for functions that forward
    mode cannot transform. Pointwise means d(sum u)/dc = du/dc per point, so one backward pass
    per order and axis gives every point's derivative.
    """
    with torch.enable_grad():
        coordinates = coordinates.detach().requires_grad_(True)
        u = function(coordinates)

        def derivative(values: torch.Tensor, index: int) -> torch.Tensor:
            (gradient,) = torch.autograd.grad(values.sum(), coordinates, create_graph=True, allow_unused=True)
            return torch.zeros_like(values) if gradient is None else gradient[index]

        spatial = {}
        for index, axis in enumerate(axes):
            chain = [u]
            for _ in range(orders.get(axis, 0)):
                chain.append(derivative(chain[-1], index))
            spatial[axis] = tuple(d.detach() for d in chain[1:])
        u_t = derivative(u, len(axes)).detach()
    return CoordinateDerivatives(u.detach(), u_t, spatial)


class GoverningEquation(nn.Module):
    """Term library, coefficients alpha, residual g and L1 penalty of PR-Net's Eq. 1.

    Terms are h^i for i = 0..max(max_power) (no derivative, shared by all axes), then for every
    axis a the terms h^i * d^j h / da^j with i = 0..max_power[a] and j = 1..max_derivative_order[a].
    With one axis and the defaults (3, 3) this is the paper's 16-term library.

    Args:
        axes: Names of the continuous axes d, used in labels (``h_xx``) and derivative dictionaries.
        max_power: Highest power of h, one integer for all axes or one per axis.
        max_derivative_order: Highest derivative order, one integer for all axes or one per axis.
        l1_weight: Weight w of the sparsity penalty R_G = w * sum |alpha|; also the default of
            :meth:`fit_coefficients`, where it acts on normalized coefficients (1e-4 identifies
            heat, Burgers and KdV from exact derivatives to 0.2%).
        print_threshold: Relative: terms with |alpha| below this fraction of the largest |alpha| are
            left out of :meth:`equation` (so data of any scale prints all its terms), in [0, 1].
        variable: Name of the field in printed equations and term labels, an identifier such as ``h``.
        init_std: Standard deviation of the normal initialization of alpha (0 gives zeros).

    Raises:
        ValueError: on empty or duplicated axes, axis names whose term labels collide (``x`` and ``xx``),
            out-of-range powers and orders, or a bad ``variable``, ``print_threshold`` or ``init_std``.
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
        check_non_negative(l1_weight, "l1_weight")
        check_non_negative(init_std, "init_std")
        if not isinstance(variable, str) or not variable.isidentifier():
            raise ValueError(
                f"`variable` (the field's name in term labels) must be a non-empty identifier such as 'h' or 'u', "
                f"got {variable!r}."
            )
        self.axes = tuple(axes)
        self.max_power = dict(zip(self.axes, powers))
        self.max_derivative_order = dict(zip(self.axes, orders))
        self.l1_weight = float(l1_weight)
        self.print_threshold = _check_relative_threshold(print_threshold, "print_threshold")
        self.variable = variable
        terms = [LibraryTerm(i, None, 0) for i in range(max(powers) + 1)]
        for axis, power, order in zip(self.axes, powers, orders):
            terms += [LibraryTerm(i, axis, j) for j in range(1, order + 1) for i in range(power + 1)]
        labels = [term.label(variable) for term in terms]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"the axes {self.axes} give several terms the labels {repeated}: a derivative's label repeats the "
                "axis name (h_xx is x twice or xx once), so coefficients() and the printed equation would mix them "
                "up. Use axis names that are not repetitions of one another, e.g. ('x', 'y')."
            )
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
                derivative = derivatives.spatial[cast(str, term.axis)][term.order - 1]
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
        Derivatives come from forward-mode :func:`torch.func.jvp`; a function that forward mode
        cannot run (one calling ``torch.autograd.grad`` inside, say) is differentiated with
        reverse-mode autograd instead, which is slower but exact too.

        Returns:
            ``(library, h_t)``: shapes (num_terms, *points) and (*points).

        Raises:
            ValueError: on a wrong number of coordinate rows, an output of the wrong shape, or
                points where the function or its derivatives are not finite (they are named).
            TypeError: on coordinates that are not a float32 or float64 tensor, or if ``function``
                cannot be differentiated by torch at all.
        """
        check_float_tensor(coordinates, "coordinates")
        if coordinates.ndim < 2 or coordinates.shape[0] != len(self.axes) + 1:
            raise ValueError(
                f"`coordinates` must be a tensor of shape ({len(self.axes) + 1}, *points): one row per axis "
                f"({', '.join(self.axes)}) then t; got {tuple(coordinates.shape)}."
            )
        names = (*self.axes, "t")
        self._check_finite_points(coordinates, ~torch.isfinite(coordinates), names, "`coordinates` are not finite")
        orders = dict(self.max_derivative_order)
        try:
            derivatives = coordinate_derivatives(function, coordinates, self.axes, orders, coordinate_dim=0)
        except (RuntimeError, NotImplementedError) as forward_error:
            try:
                derivatives = _reverse_mode_derivatives(function, coordinates, self.axes, orders)
            except (RuntimeError, NotImplementedError) as reverse_error:
                raise TypeError(
                    "`function` could not be differentiated by torch, neither in forward mode (torch.func.jvp: "
                    f"{_first_line(forward_error)}) nor in reverse mode (torch.autograd: "
                    f"{_first_line(reverse_error)}). "
                    "Write it with torch operations on the coordinates only (no .numpy(), .item(), float(tensor) "
                    "or NumPy/SciPy calls), or sample it on a grid and use `library_from_samples`."
                ) from reverse_error
        if derivatives.u.shape != coordinates.shape[1:]:
            raise ValueError(
                f"`function` must act pointwise and return one value per point, shape {tuple(coordinates.shape[1:])}; "
                f"got shape {tuple(derivatives.u.shape)}."
            )
        u_t = cast(torch.Tensor, derivatives.u_t)  # computed with the spatial derivatives
        fields = [derivatives.u, u_t, *(d for ds in derivatives.spatial.values() for d in ds)]
        not_finite = torch.stack([~torch.isfinite(f.detach()) for f in fields]).any(0)
        self._check_finite_points(
            coordinates,
            not_finite[None].expand_as(coordinates),
            names,
            "`function` or its derivatives are not finite (outside its domain?)",
        )
        return self.library(derivatives), u_t

    def library_from_samples(
        self,
        samples: torch.Tensor,
        spacing: Spacing,
        window_length: IntPerAxis = 21,
        polyorder: IntPerAxis = 4,
        trim: bool = True,
        form: str = "weak",
        half_width: IntPerAxis | None = None,
        test_degree: int = 6,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Library and h_t of gridded samples h(d_i, t_j), e.g. measured and noisy data.

        Two forms of the same 16-term (by default) regression, fitted alike by :meth:`fit_coefficients`:

        * ``"weak"`` (default): every term and h_t integrated against smooth test functions on boxes
          of the grid, with the derivatives moved onto the test functions by integration by parts
          (:func:`~lightning_pdenets.blocks.weak_form.weak_form_library`; WeakSINDy, Messenger & Bortz
          2021; Reinbold et al. 2020). Only terms h^i d^j h with i >= 1 and j >= 2 need a derivative
          of the data, the first one, from a Savitzky-Golay fit (``window_length``, ``polyorder``).
          With 1% noise it identifies heat, Burgers and KdV within 0.3% (worst of 10 noise draws).
        * ``"pointwise"``: derivatives at every grid point from Savitzky-Golay filters
          (:func:`~lightning_pdenets.blocks.sampled.savgol_derivatives`), the local polynomial fits of
          PDE-FIND (Rudy et al. 2017). The defaults (21 points, degree 4) are PDE-FIND's for noisy
          data; on clean, finely sampled data a shorter window (e.g. 7) is more accurate. Noise in the
          third derivative defeats it on KdV (40% off at 1% noise).

        Args:
            samples: Shape (..., *grid): the last len(axes) + 1 dimensions are the axes in order,
                then the time; leading dimensions hold independent trajectories.
            spacing: Grid step of each axis, then of the time (uniform grids only): numbers, 0-d
                tensors, or a 1-d NumPy array or tensor of the steps.
            window_length: Odd filter length in points, one for all or one per axis and the time.
            polyorder: Degree of the local polynomial (at least the highest derivative order).
            trim: ``"pointwise"`` only: drop ``window_length // 2`` points at every edge, where the
                fits are one-sided.
            form: ``"weak"`` or ``"pointwise"``.
            half_width: ``"weak"`` only: half-width of the test functions' boxes in grid points, one
                for all or one per axis and the time; None is an eighth of the grid per dimension, at
                least 5 points where the grid allows.
            test_degree: ``"weak"`` only: exponent p of the test functions (1 - s^2)^p, above the
                highest derivative order.

        Returns:
            ``(library, h_t)``: shapes (num_terms, ..., *trimmed grid) and (..., *trimmed grid)
            (pointwise), or (num_terms, ..., *box centres) and (..., *box centres) (weak), in the
            samples' dtype. h_t is exactly 0 when the samples do not change in time to within
            rounding, and :meth:`fit_coefficients` then returns h_t = 0.

        Raises:
            TypeError: on samples that are not a float32 or float64 tensor (convert integer data
                with ``samples.double()``; complex data is not supported).
            ValueError: on an unknown ``form`` or settings that do not fit the grid.
        """
        check_bool(trim, "trim")
        if form == "weak":
            return weak_form_library(
                samples,
                spacing,
                self.axes,
                self.terms,
                half_width,
                test_degree,
                window_length=window_length,
                polyorder=polyorder,
            )
        if form != "pointwise":
            raise ValueError(f"`form` must be 'weak' or 'pointwise', got {form!r}.")
        derivatives = savgol_derivatives(
            samples, spacing, self.axes, dict(self.max_derivative_order), window_length, polyorder, trim
        )
        return self.library(derivatives), cast(torch.Tensor, derivatives.u_t)  # computed with the spatial ones

    @staticmethod
    def _check_finite_points(
        coordinates: torch.Tensor, not_finite: torch.Tensor, names: Sequence[str], problem: str
    ) -> None:
        """Raise a ``ValueError`` naming the first points (columns of ``coordinates``) flagged in ``not_finite``."""
        bad = not_finite.reshape(coordinates.shape[0], -1).any(0)
        if not bad.any():
            return
        points = coordinates.reshape(coordinates.shape[0], -1)[:, bad].T[:3].tolist()
        shown = "; ".join("(" + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, point)) + ")" for point in points)
        raise ValueError(
            f"{problem} at {int(bad.sum())} of {bad.numel()} points, e.g. {shown}. "
            "Keep `coordinates` inside the function's domain and drop those points."
        )

    @torch.no_grad()
    def lipschitz_constant(self, library: torch.Tensor) -> float:
        """Lipschitz constant of the gradient of L_G in alpha: 2 * the largest eigenvalue of the library's
        Gram matrix. A gradient step on alpha is stable only for step sizes up to its inverse."""
        flat = library.reshape(library.shape[0], -1).to(self.alpha.dtype)
        gram = flat @ flat.T / flat.shape[1]
        return 2 * float(torch.linalg.eigvalsh(gram).max())

    def fit_coefficients(
        self,
        library: torch.Tensor,
        time_derivative: torch.Tensor,
        l1_weight: float | None = None,
        threshold: float = 0.0,
        debias: bool = False,
        normalize: bool = True,
        tol: float = 1e-8,
        max_steps: int = 100_000,
    ) -> SparseFit:
        """Sparse regression of h_t on the library: identify the PDE, set ``alpha`` in place.

        Minimizes the Lasso objective L_G + w * sum |beta_k| with FISTA and adaptive restart
        (Beck & Teboulle 2009; O'Donoghue & Candes 2015) to a certified optimum: it stops once
        the Lasso duality gap is below ``tol`` times the objective (as scikit-learn's ``Lasso``
        does), and every few steps it tries the exact solution on the current support. Small
        coefficients are exactly zero. The same problem as PR-Net's alpha step when
        ``normalize=False``.

        With ``normalize`` (the default, like PySINDy's ``normalize_columns``) each library column
        is divided by its root mean square and h_t by its own, so beta_k = alpha_k * rms(term_k) /
        rms(h_t) is the share of h_t that term k explains and ``l1_weight`` and ``threshold`` mean
        the same for any scaling of the data; ``alpha`` is reported in the original units.

        Args:
            library: Terms, shape (num_terms, *points), e.g. from :meth:`library_from_function`.
            time_derivative: h_t, shape (*points).
            l1_weight: Weight w of the L1 penalty; defaults to the module's ``l1_weight``. 0 gives
                the (dense) least-squares fit.
            threshold: If > 0, sequentially thresholded least squares after the Lasso (STLSQ,
                Brunton et al. 2016; PDE-FIND's STRidge, Rudy et al. 2017): terms with
                |beta| < threshold are dropped and the rest refit, until the support is stable.
                Use it on noisy data (0.05-0.1), where the Lasso keeps many small noise terms.
            debias: Refit the Lasso's support by least squares. The Lasso shrinks every kept
                coefficient by about w/2 (normalized units); refit when the values matter more
                than the objective, and the support is right (clean data, or after ``threshold``,
                which always refits).
            normalize: Fit normalized columns and target (see above); False fits the raw library.
            tol: Relative duality gap at which the Lasso stops.
            max_steps: Most FISTA steps; a :class:`RuntimeWarning` says when they did not suffice.

        Returns:
            A :class:`SparseFit` with the objective, duality gap, steps and the support.

        Raises:
            TypeError: on a library or h_t that is not a real floating-point tensor.
            ValueError: on bad settings, shapes that do not match, no points, non-finite values, data
                whose sums of squares overflow or underflow float64 (rescale it), or coefficients that
                ``alpha``'s dtype cannot hold (use a float64 equation, ``equation.double()``).

        Warns:
            RuntimeWarning: if the library is ill-conditioned, naming its near-collinear terms; if h_t
                is 0 at every point (the data does not change in time: the fit is h_t = 0); if
                ``max_steps`` did not suffice.
        """
        l1_weight = self.l1_weight if l1_weight is None else l1_weight
        check_non_negative(l1_weight, "l1_weight")
        check_non_negative(threshold, "threshold")
        check_bool(debias, "debias")
        check_bool(normalize, "normalize")
        check_positive(tol, "tol")
        check_positive_int(max_steps, "max_steps")
        # any real floating dtype: the fit runs in float64 (a no_grad block, not the decorator, so that the
        # warnings' stacklevel reaches the caller)
        check_float_tensor(library, "library", dtypes=None)
        check_float_tensor(time_derivative, "time_derivative", dtypes=None)
        if library.ndim < 1 or library.shape[0] != self.num_terms or library.shape[1:] != time_derivative.shape:
            raise ValueError(
                f"`library` must have shape ({self.num_terms}, *points) and `time_derivative` shape (*points); "
                f"got {tuple(library.shape)} and {tuple(time_derivative.shape)}."
            )
        if time_derivative.numel() == 0:
            raise ValueError(
                f"`library` and `time_derivative` hold no points (shapes {tuple(library.shape)} and "
                f"{tuple(time_derivative.shape)}); pass at least as many points as the {self.num_terms} terms."
            )
        with torch.no_grad():
            flat = library.detach().reshape(self.num_terms, -1).double()
            target = time_derivative.detach().reshape(-1).double()
            if not (torch.isfinite(flat).all() and torch.isfinite(target).all()):
                raise ValueError(
                    "`library` and `time_derivative` must be finite; drop the points where they are not (or rescale "
                    "data so large that the library's powers overflow)."
                )
            if not bool(target.any()):
                # library_from_samples sets an h_t that is rounding everywhere to 0: no time scale is known here,
                # so an h_t "small next to the library" (whose units differ) cannot be told from slow dynamics
                warnings.warn(
                    "`time_derivative` is 0 at every point: the data does not change in time (to within rounding, "
                    "for samples), so the fitted equation is h_t = 0.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.alpha.zero_()
                return SparseFit(objective=0.0, duality_gap=0.0, steps=0, converged=True, support=())
            column_max, target_max = flat.abs().amax(1), target.abs().max()
            self._check_normal_range(column_max, target_max)
            # Mean products of the columns and target scaled to a largest |value| of 1, the scales put back
            # after: no overflow or underflow in the squares for data of any scale (h * 1e60, h * 1e-60).
            column_max = torch.where(column_max > 0, column_max, torch.ones(()))
            scaled, scaled_target = flat / column_max[:, None], target / target_max
            gram = scaled @ scaled.T / flat.shape[1]
            correlation = scaled @ scaled_target / flat.shape[1]
            column_rms = torch.where(gram.diagonal() > 0, gram.diagonal().sqrt(), torch.ones(()))
            target_rms = (scaled_target @ scaled_target / flat.shape[1]).sqrt()
            # Solved in normalized units either way (fast, well-scaled steps); without `normalize` the
            # per-term weights w / (rms(h_t) rms(term_k)) make it the raw problem divided by mean(h_t^2).
            gram = gram / torch.outer(column_rms, column_rms)
            correlation = correlation / (column_rms * target_rms)
            column_scale, target_scale = column_max * column_rms, target_max * target_rms  # the raw RMS
            self._warn_if_ill_conditioned(gram)
            weights = torch.full_like(correlation, float(l1_weight))
            objective_scale = 1.0
            if not normalize:
                weights, objective_scale = weights / (target_scale * column_scale), float(target_scale) ** 2
                if not (torch.isfinite(weights).all() and math.isfinite(objective_scale)):
                    raise ValueError(
                        "with normalize=False the L1 weights in the data's units overflow float64 (rms of h_t "
                        f"{float(target_scale):.3g}); rescale the data, or fit with normalize=True."
                    )
            solution = lasso(gram, correlation, torch.ones((), dtype=torch.float64), weights, tol, max_steps)
            beta = solution.coefficients
            if threshold > 0:
                beta = sequential_threshold(gram, correlation, beta, threshold)
            elif debias:
                beta = least_squares_on_support(gram, correlation, beta != 0)
            if not solution.converged:
                warnings.warn(
                    f"fit_coefficients stopped after max_steps={max_steps} with a relative duality gap of "
                    f"{solution.duality_gap / solution.objective:.1e} > tol={tol:g}; raise `max_steps` or `tol`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.alpha.copy_(self._fits_alpha(beta * target_scale / column_scale))
            objective = lasso_objective(gram, correlation, torch.ones((), dtype=torch.float64), weights, beta)
        return SparseFit(
            objective=objective * objective_scale,
            duality_gap=solution.duality_gap * objective_scale,
            steps=solution.steps,
            converged=solution.converged,
            support=tuple(term.label(self.variable) for term, keep in zip(self.terms, beta != 0) if keep),
        )

    def _check_normal_range(self, column_max: torch.Tensor, target_max: torch.Tensor) -> None:
        """Refuse a library term or h_t whose largest |value| is subnormal in float64: too few digits to fit."""
        largest = torch.cat([column_max, target_max[None]])
        subnormal = (largest > 0) & (largest < torch.finfo(torch.float64).tiny)
        if subnormal.any():
            index = int(subnormal.nonzero()[0])
            name = self.terms[index].label(self.variable) if index < self.num_terms else "h_t (`time_derivative`)"
            raise ValueError(
                f"{name} is at most {float(largest[index]):.3g} in magnitude, below float64's normal range, where "
                "too few digits are left to fit it: rescale the data, e.g. divide the samples by their largest "
                "|value| and the steps or coordinates by a typical length and time."
            )

    def _fits_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """The float64 coefficients ``alpha`` in alpha's dtype, after checking that dtype holds them."""
        info = torch.finfo(self.alpha.dtype)
        magnitude = alpha.abs()
        bad = ~torch.isfinite(alpha) | (magnitude > info.max) | ((magnitude > 0) & (magnitude < info.tiny))
        if bad.any():
            index = int(bad.nonzero()[0])
            raise ValueError(
                f"the fitted coefficient of {self.terms[index].label(self.variable)} is {float(alpha[index]):.3g}, "
                f"outside what alpha's dtype {self.alpha.dtype} holds (|alpha| from {info.tiny:.1e} to "
                f"{info.max:.1e}): use a float64 equation (`equation.double()`) or rescale the data (e.g. divide "
                "the samples by their largest |value|)."
            )
        return alpha.to(self.alpha)

    def _warn_if_ill_conditioned(self, normalized_gram: torch.Tensor) -> None:
        """Warn when some combination of the normalized terms is (nearly) zero on the points."""
        eigenvalues, eigenvectors = torch.linalg.eigh(normalized_gram)
        condition = float(eigenvalues[-1] / eigenvalues[0]) if eigenvalues[0] > 0 else math.inf
        if condition <= ILL_CONDITIONED:
            return
        direction = eigenvectors[:, 0]
        order = [int(i) for i in direction.abs().argsort(descending=True) if direction[i].abs() >= 0.1]
        combination = " ".join(
            f"{'-' if direction[i] < 0 else '+'} {abs(float(direction[i])):.2f} {self.terms[i].label(self.variable)}"
            for i in order[:5]
        ).lstrip("+ ")
        warnings.warn(
            f"the library is ill-conditioned on these points (condition number {condition:.1e} after normalizing the "
            f"columns): the terms {', '.join(self.terms[i].label(self.variable) for i in order[:5])} are nearly "
            f"collinear ({combination} ~ 0 in normalized units), so their coefficients are not identifiable. Sample "
            "more varied points (a wider range of h, several modes, longer times) or remove terms with "
            "`max_power` / `max_derivative_order`.",
            RuntimeWarning,
            stacklevel=3,
        )

    def coefficients(self) -> dict[str, float]:
        """``{term label: alpha}`` for every term of the library."""
        return {term.label(self.variable): float(a) for term, a in zip(self.terms, self.alpha.detach().cpu())}

    def equation(self, threshold: float | None = None) -> str:
        """The learned equation, e.g. ``h_t = 0.031 h_xx - 0.98 h h_x``.

        Args:
            threshold: Terms with |alpha| below this fraction of the largest |alpha| are left out;
                None: ``print_threshold``. Relative, so that a heat equation with nu = 1e-4 prints
                its h_xx term; 0 prints every non-zero term.
        """
        threshold = self.print_threshold if threshold is None else _check_relative_threshold(threshold, "threshold")
        coefficients = self.coefficients()
        largest = max((abs(value) for value in coefficients.values()), default=0.0)
        parts = []
        for label, value in coefficients.items():
            if value == 0.0 or abs(value) < threshold * largest:
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
