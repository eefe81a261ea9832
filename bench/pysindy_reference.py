"""PySINDy references for bench/bench_identification.py, run by an interpreter that has PySINDy.

PySINDy is not a dependency of lightning_pdenets: install it in a separate venv
(``python -m venv /tmp/sindyvenv && /tmp/sindyvenv/bin/pip install pysindy``) and pass that
interpreter to the bench (``--pysindy-python /tmp/sindyvenv/bin/python``). The bench writes the noisy
samples to an ``.npz`` file and runs this script on it; this script needs only NumPy and PySINDy and
prints one JSON object: {case: {method: {term: coefficient}}}.

Methods, each with the same 16 candidate terms h^i d^j h (i, j <= 3) plus a constant:

* ``weak``: ``WeakPDELibrary`` (WeakSINDy, Messenger & Bortz 2021) with its defaults (p = 4, boxes of
  half-width L / 20 per dimension) but K = 500 boxes (placed at random; NumPy's global seed is the
  noise draw's), and ``STLSQ``;
* ``weak_L/8``: the same with boxes of half-width L / 8, as lightning_pdenets' default;
* ``ensemble``: ``PDELibrary`` on Savitzky-Golay-smoothed finite differences (window 21, degree 4) and
  ``EnsembleOptimizer(STLSQ, bagging=True, n_models=20)`` (E-SINDy, Fasel et al. 2022; median of the
  bagged models).

The threshold is the bench's 0.05 on normalized coefficients, converted to PySINDy's units (columns
divided by their 2-norm, target not normalized): 0.05 times the 2-norm of the target on the rows fitted.

    /tmp/sindyvenv/bin/python bench/pysindy_reference.py cases.npz
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pysindy as ps

THRESHOLD = 0.05
SMOOTHING = {"smoother_kws": {"window_length": 21, "polyorder": 4}}


def label(name: str) -> str:
    """PySINDy's feature name (x0, x0x0_1, x0^2x0_111) in the bench's notation (h, h h_x, h^2 h_xxx)."""
    name = name.replace("x0x0x0", "h^3 h").replace("x0x0", "h h").replace("x0^3x0", "h^3 h").replace("x0^2x0", "h^2 h")
    name = name.replace("x0^", "h^").replace("x0", "h")
    return name.replace("_111", "_xxx").replace("_11", "_xx").replace("_1", "_x")


def weak(samples: np.ndarray, x: np.ndarray, t: np.ndarray, fraction: float = 20) -> dict[str, float]:
    grid = np.stack(np.meshgrid(x, t, indexing="ij"), axis=-1)
    half = [(x[-1] - x[0]) / fraction, (t[-1] - t[0]) / fraction]
    library = ps.WeakPDELibrary(
        function_library=ps.PolynomialLibrary(degree=3, include_bias=False),
        derivative_order=3,
        spatiotemporal_grid=grid,
        include_bias=True,
        is_uniform=True,
        K=500,
        H_xt=half,
    )
    data = samples[:, :, None]
    target = library.convert_u_dot_integral(data)
    model = ps.SINDy(
        feature_library=library,
        optimizer=ps.STLSQ(threshold=THRESHOLD * float(np.linalg.norm(target)), alpha=1e-5, normalize_columns=True),
    )
    model.fit(data, t=float(t[1] - t[0]))
    return dict(zip(map(label, model.get_feature_names()), map(float, model.coefficients()[0])))


def ensemble(samples: np.ndarray, x: np.ndarray, t: np.ndarray, seed: int) -> dict[str, float]:
    dt = float(t[1] - t[0])
    target = ps.SmoothedFiniteDifference(axis=-2, **SMOOTHING)._differentiate(samples[:, :, None], dt)
    rows = 0.6  # EnsembleOptimizer's default subset: 60% of the rows
    threshold = THRESHOLD * float(np.sqrt(np.mean(target**2) * target.size * rows))
    library = ps.PDELibrary(
        function_library=ps.PolynomialLibrary(degree=3, include_bias=False),
        derivative_order=3,
        spatial_grid=x,
        include_bias=True,
        is_uniform=True,
        differentiation_method=ps.SmoothedFiniteDifference,
        diff_kwargs=SMOOTHING,
    )
    np.random.seed(seed)  # the bagging draws
    optimizer = ps.EnsembleOptimizer(
        ps.STLSQ(threshold=threshold, alpha=1e-5, normalize_columns=True), bagging=True, n_models=20
    )
    model = ps.SINDy(
        feature_library=library,
        optimizer=optimizer,
        differentiation_method=ps.SmoothedFiniteDifference(axis=-2, **SMOOTHING),
    )
    model.fit(samples[:, :, None], t=dt)
    return dict(zip(map(label, model.get_feature_names()), map(float, model.coefficients()[0])))


def main() -> None:
    cases = np.load(sys.argv[1])
    methods = sys.argv[2].split(",") if len(sys.argv) > 2 else ["weak", "weak_L/8", "ensemble"]
    results = {}
    for key in sorted(k for k in cases.files if k.startswith("samples/")):
        case = key.split("/", 1)[1]  # "name/sigma/seed"
        name, _, seed = case.split("/")
        samples, x, t = cases[key], cases[f"x/{name}"], cases[f"t/{name}"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[case] = {}
            if "weak" in methods:
                np.random.seed(int(seed))  # WeakPDELibrary places its K boxes at random
                results[case]["weak"] = weak(samples, x, t)
            if "weak_L/8" in methods:
                np.random.seed(int(seed))
                results[case]["weak_L/8"] = weak(samples, x, t, fraction=8)
            if "ensemble" in methods:
                results[case]["ensemble"] = ensemble(samples, x, t, int(seed))
    json.dump({"version": ps.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
