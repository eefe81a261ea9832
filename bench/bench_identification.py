"""Equation identification with GoverningEquation (issues 17 and 30): exact derivatives, then noisy samples.

1. Defaults on exact derivatives: heat, Burgers and KdV (tests/closed_form_pdes.py), the paper's
   16-term library, ``fit_coefficients()`` with no arguments, on several point sets; beside it the
   old fit (5,000 ISTA steps with momentum 0.9 on the raw library) for reference.
2. Samples on a grid (256 x 101; KdV 512 x 201) with multiplicative noise h (1 + sigma N(0, 1)), sigma = 0, 0.1%,
   1%, 5%: ``library_from_samples`` in the weak form (the default since issue 30) and in the pointwise
   (Savitzky-Golay) form, then ``fit_coefficients(threshold=0.05)``; median and worst coefficient error over
   the seeds, and the figure bench/identification_noise.png. With ``--additive``, also KdV with PDE-FIND's
   noise, additive with standard deviation sigma * std(h) (Rudy et al. 2017).
3. With ``--pysindy`` (optional, if PySINDy imports in this interpreter): PySINDy's PDELibrary + STLSQ on the
   same noisy Burgers data, coefficients side by side.
4. With ``--pysindy-python PYTHON`` (an interpreter of a separate venv with PySINDy; never a dependency here):
   PySINDy's WeakPDELibrary and EnsembleOptimizer on the same noisy samples of all three PDEs
   (bench/pysindy_reference.py), worst errors beside ours, and drawn in the figure.

    python bench/bench_identification.py --seeds 10 --pysindy --output bench/results_identification.md
    python -m venv /tmp/sindyvenv && /tmp/sindyvenv/bin/pip install pysindy
    OMP_NUM_THREADS=1 python bench/bench_identification.py --seeds 10 --skip-exact --additive \\
        --pysindy-python /tmp/sindyvenv/bin/python --pysindy-seeds 5 --output bench/results_identification_weak.md
    OMP_NUM_THREADS=1 python bench/bench_identification.py --seeds 5 --box-scan --output bench/results_identification_boxes.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import check_output, positive_int
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets.blocks.governing import GoverningEquation  # noqa: E402
from lightning_pdenets.models.optim import ProximalSGD  # noqa: E402
from tests.closed_form_pdes import ONE_DIMENSIONAL, grid, sampled  # noqa: E402

NOISE_LEVELS = (0.0, 0.001, 0.01, 0.05)
WEAK = ("weak", None, None)  # the defaults: boxes of an eighth of the grid, test functions (1 - s^2)^6
# name: (grid nx x nt, [(form, window, degree), ...]); the KdV solitons need a finer grid and shorter windows
SETUPS = {
    "burgers": ((256, 101), [WEAK, ("pointwise", 21, 4), ("pointwise", 31, 5)]),
    "heat": ((256, 101), [WEAK, ("pointwise", 21, 4), ("pointwise", 31, 5)]),
    "kdv": ((512, 201), [WEAK, ("pointwise", 15, 5), ("pointwise", 21, 5)]),
}


def errors(equation: GoverningEquation, expected: dict[str, float]) -> tuple[float, float]:
    """Worst relative error of the true coefficients; largest other coefficient relative to the largest."""
    coefficients = equation.coefficients()
    largest = max(abs(v) for v in coefficients.values()) or 1.0
    worst = max(abs(coefficients[t] / v - 1) for t, v in expected.items())
    spurious = max((abs(v) for t, v in coefficients.items() if t not in expected), default=0.0) / largest
    return worst, spurious


def old_fit(equation: GoverningEquation, library: torch.Tensor, h_t: torch.Tensor) -> None:
    """The fit before issue 17: 5,000 proximal steps of size 1/L with momentum 0.9 on the raw library."""
    flat = library.reshape(library.shape[0], -1)
    gram, correlation = flat @ flat.T / flat.shape[1], flat @ h_t.reshape(-1) / flat.shape[1]
    with torch.no_grad():
        equation.alpha.zero_()
    optimizer = ProximalSGD(
        [equation.alpha], lr=1 / equation.lipschitz_constant(library), l1_weight=equation.l1_weight, momentum=0.9
    )
    for _ in range(5000):
        equation.alpha.grad = 2 * (gram @ equation.alpha.detach() - correlation)
        optimizer.step()


def points(kind: str, count: int, x_range, t_range, generator: torch.Generator) -> torch.Tensor:
    (x0, x1), (t0, t1) = x_range, t_range
    if kind == "grid":
        side = round(math.sqrt(count))
        x, t = torch.meshgrid(torch.linspace(x0, x1, side), torch.linspace(t0, t1, side), indexing="ij")
        return torch.stack([x.reshape(-1), t.reshape(-1)])
    unit = torch.rand(2, count, generator=generator)
    return torch.stack([x0 + (x1 - x0) * unit[0], t0 + (t1 - t0) * unit[1]])


def exact_table() -> list[str]:
    rows = [
        "| PDE | points | true coeff. error | largest other / largest | steps | fit time | old fit: error | old fit: other / largest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, (function, expected, x_range, t_range) in ONE_DIMENSIONAL.items():
        for kind, count in (("uniform", 200), ("uniform", 2000), ("grid", 4900)):
            equation = GoverningEquation(("x",))
            library, h_t = equation.library_from_function(function, points(kind, count, x_range, t_range, generator))
            start = time.perf_counter()
            fit = equation.fit_coefficients(library, h_t)
            elapsed = time.perf_counter() - start
            error, other = errors(equation, expected)
            old_fit(equation, library, h_t)
            old_error, old_other = errors(equation, expected)
            rows.append(
                f"| {name} | {kind} {count} | {error:.2%} | {other:.2%} | {fit.steps} | {elapsed * 1e3:.0f} ms "
                f"| {old_error:.1%} | {old_other:.1%} |"
            )
    return rows


def noisy(samples: torch.Tensor, sigma: float, seed: int, additive: bool = False) -> torch.Tensor:
    """Multiplicative noise h (1 + sigma N(0, 1)) (issue 17's convention), or PDE-FIND's additive
    h + sigma std(h) N(0, 1); the same draws N(0, 1) for both."""
    draws = torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed))
    return samples + sigma * samples.std() * draws if additive else samples * (1 + sigma * draws)


def identify(samples: torch.Tensor, spacing, form: str, window, degree) -> tuple[GoverningEquation, tuple]:
    """``library_from_samples`` (weak defaults, or pointwise with window and degree), STLSQ threshold 0.05."""
    equation = GoverningEquation(("x",))
    options = {"form": "weak"} if form == "weak" else {"form": form, "window_length": window, "polyorder": degree}
    library, h_t = equation.library_from_samples(samples, spacing, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = equation.fit_coefficients(library, h_t, threshold=0.05)
    return equation, fit.support


def setup_label(form: str, window, degree) -> str:
    return (
        "weak (defaults)"
        if form == "weak"
        else f"pointwise {window}, {degree}" + (" (old default)" if (window, degree) == (21, 4) else "")
    )


def noise_table(seeds: int, additive: bool = False, names=None) -> tuple[list[str], dict]:
    rows = [
        "| PDE, grid | form, window, degree | " + " | ".join(f"noise {s:.1%}" for s in NOISE_LEVELS) + " |",
        "| --- | --- |" + " --- |" * len(NOISE_LEVELS),
    ]
    curves = {}
    fits = sum(
        len(setups) * sum(seeds if sigma > 0 else 1 for sigma in NOISE_LEVELS)
        for name, (_, setups) in SETUPS.items()
        if not names or name in names
    )
    progress = tqdm(total=fits, desc="noise table", unit="fit")
    for name, (shape, setups) in SETUPS.items():
        if names and name not in names:
            continue
        expected = ONE_DIMENSIONAL[name][1]
        samples, spacing = sampled(name, *shape)
        for form, window, degree in setups:
            cells, medians, worsts = [], [], []
            for sigma in NOISE_LEVELS:
                worst, wrong_support = [], 0
                for seed in range(seeds if sigma > 0 else 1):
                    equation, support = identify(noisy(samples, sigma, seed, additive), spacing, form, window, degree)
                    progress.update()
                    worst.append(errors(equation, expected)[0])
                    wrong_support += set(support) != set(expected)
                medians.append(statistics.median(worst))
                worsts.append(max(worst))
                cells.append(
                    f"{statistics.median(worst):.2%} / {max(worst):.2%}"
                    + (f" ({wrong_support} wrong support)" if wrong_support else "")
                )
            curves[(name, form, window, degree)] = (medians, worsts)
            rows.append(
                f"| {name} {shape[0]} x {shape[1]} | {setup_label(form, window, degree)} | " + " | ".join(cells) + " |"
            )
    progress.close()
    return rows, curves


def box_scan(seeds: int, fractions=(4, 8, 12, 16), levels=(0.01, 0.05)) -> list[str]:
    """Weak form with boxes of half-width grid / fraction (the default: 8) at 1% and 5% noise."""
    rows = [
        "| PDE, grid | half-width | " + " | ".join(f"noise {s:.0%}" for s in levels) + " |",
        "| --- | --- |" + " --- |" * len(levels),
    ]
    progress = tqdm(total=len(SETUPS) * len(fractions) * len(levels) * seeds, desc="box scan", unit="fit")
    for name, (shape, _) in SETUPS.items():
        expected = ONE_DIMENSIONAL[name][1]
        samples, spacing = sampled(name, *shape)
        for fraction in fractions:
            half_width = tuple(size // fraction for size in shape)
            cells = []
            for sigma in levels:
                worst, wrong = [], 0
                for seed in range(seeds):
                    equation = GoverningEquation(("x",))
                    library, h_t = equation.library_from_samples(
                        noisy(samples, sigma, seed), spacing, half_width=half_width
                    )
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        fit = equation.fit_coefficients(library, h_t, threshold=0.05)
                    progress.update()
                    worst.append(errors(equation, expected)[0])
                    wrong += set(fit.support) != set(expected)
                cells.append(
                    f"{statistics.median(worst):.2%} / {max(worst):.2%}"
                    + (f" ({wrong} wrong support)" if wrong else "")
                )
            rows.append(
                f"| {name} {shape[0]} x {shape[1]} | grid / {fraction} = {half_width}"
                + (" (default)" if fraction == 8 else "")
                + " | "
                + " | ".join(cells)
                + " |"
            )
    progress.close()
    return rows


def figure(curves: dict, references: dict, path: Path) -> None:
    """Median worst error against noise, one panel per PDE: weak (ours, solid), pointwise (dashed), PySINDy (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [max(s, 1e-4) for s in NOISE_LEVELS]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, name in zip(axes, SETUPS):
        pointwise = 0
        for (pde, form, window, degree), (medians, worsts) in curves.items():
            if pde != name:
                continue
            pointwise += form != "weak"
            style = (
                dict(linestyle="-", linewidth=2.2, color="C0")
                if form == "weak"
                else dict(linestyle="--", color=f"C{pointwise}")
            )
            ax.plot(
                levels, [max(m, 1e-5) for m in medians], marker="o", label=setup_label(form, window, degree), **style
            )
            if form == "weak":
                ax.fill_between(
                    levels,
                    [max(m, 1e-5) for m in medians],
                    [max(w, 1e-5) for w in worsts],
                    color="C0",
                    alpha=0.15,
                    label="weak: median to worst draw",
                )
        for index, (method, by_level) in enumerate(references.get(name, {}).items()):
            ax.plot(
                [max(s, 1e-4) for s in by_level],
                [max(statistics.median(v), 1e-5) for v in by_level.values()],
                marker="xs^"[index % 3],
                linestyle=":",
                color=f"C{5 + index}",
                label=f"PySINDy {method}",
            )
        ax.axhline(0.05, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.02, color="grey", linestyle="--", linewidth=1)
        ax.set(xscale="log", yscale="log", title=name, xlabel="multiplicative noise sigma")
        ax.set_xticks(levels, ["0", "0.1%", "1%", "5%"])
        ax.legend(fontsize=6.5, loc="upper left")
    axes[0].set_ylabel("worst true-coefficient error (median over draws)")
    fig.suptitle(
        "Identification from noisy samples, threshold 0.05 (grey: 5% target, 2% goal at 1% noise; "
        "errors below 1e-5 drawn at 1e-5)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pysindy_references(python: str, seeds: int) -> tuple[list[str], dict, str]:
    """PySINDy's WeakPDELibrary and EnsembleOptimizer (bench/pysindy_reference.py, run by ``python``)."""
    arrays = {}
    for name, (shape, _) in SETUPS.items():
        samples, _ = sampled(name, *shape)
        x, t = grid(*ONE_DIMENSIONAL[name][2:], *shape)
        arrays[f"x/{name}"], arrays[f"t/{name}"] = x.numpy(), t.numpy()
        for sigma in NOISE_LEVELS:
            for seed in range(seeds if sigma > 0 else 1):
                arrays[f"samples/{name}/{sigma}/{seed}"] = noisy(samples, sigma, seed).numpy()
    with tempfile.TemporaryDirectory() as folder:
        cases = Path(folder) / "cases.npz"
        np.savez(cases, **arrays)
        done = subprocess.run(
            [python, str(REPO / "bench" / "pysindy_reference.py"), str(cases)], capture_output=True, text=True
        )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no error output"
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: error: bench/pysindy_reference.py failed under --pysindy-python {python} "
            f"(exit status {done.returncode}): {tail}"
        )
    output = json.loads(done.stdout)
    by_method: dict = {}
    for case, methods in output["results"].items():
        name, sigma, _ = case.split("/")
        expected = ONE_DIMENSIONAL[name][1]
        for method, coefficients in methods.items():
            worst = max(abs(coefficients.get(term, 0.0) / value - 1) for term, value in expected.items())
            wrong = {t for t, v in coefficients.items() if v != 0} != set(expected)
            by_method.setdefault(name, {}).setdefault(method, {}).setdefault(float(sigma), []).append((worst, wrong))
    rows = [
        "| PDE | PySINDy method | " + " | ".join(f"noise {s:.1%}" for s in NOISE_LEVELS) + " |",
        "| --- | --- |" + " --- |" * len(NOISE_LEVELS),
    ]
    references: dict = {}
    for name, methods in by_method.items():
        for method, by_level in methods.items():
            cells = []
            for sigma in NOISE_LEVELS:
                runs = by_level[sigma]
                wrong = sum(w for _, w in runs)
                cells.append(
                    f"{statistics.median(e for e, _ in runs):.2%} / {max(e for e, _ in runs):.2%}"
                    + (f" ({wrong} wrong support)" if wrong else "")
                )
            references.setdefault(name, {})[method] = {s: [e for e, _ in by_level[s]] for s in NOISE_LEVELS}
            rows.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return rows, references, output["version"]


def check_pysindy_python(python: str) -> None:
    """Exit with status 2 and one line unless ``python`` runs and imports pysindy (before the bench's work)."""
    try:
        done = subprocess.run([python, "-c", "import pysindy"], capture_output=True, text=True, timeout=120)
        problem = (
            (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1] if done.returncode else ""
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        print(
            f"{Path(sys.argv[0]).name}: error: --pysindy-python {python} cannot import pysindy ({problem}); install "
            f"it there ({python} -m pip install pysindy) or leave out --pysindy-python.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def pysindy_table(seeds: int) -> list[str]:
    """PySINDy's PDELibrary (h^0..3 x derivatives 0..3, as ours) + STLSQ on the same noisy Burgers samples."""
    try:
        import pysindy as ps
    except ImportError:
        return ["PySINDy is not installed here (optional): `pip install pysindy` to add this table."]
    expected = ONE_DIMENSIONAL["burgers"][1]
    samples, (dx, dt) = sampled("burgers")
    x = (torch.arange(samples.shape[0]) * dx).numpy()
    pointwise_h_t = GoverningEquation(("x",)).library_from_samples(samples, (dx, dt), form="pointwise")[1]
    h_t_rms = float(pointwise_h_t.pow(2).mean().sqrt())
    # PySINDy normalizes columns by their 2-norm and not the target: our threshold 0.05 in its units
    threshold = 0.05 * h_t_rms * math.sqrt(samples.numel())
    smoothing = {"smoother_kws": {"window_length": 21, "polyorder": 4}}
    methods = {
        "PySINDy, finite differences": lambda: (ps.PDELibrary(**library_kwargs), ps.FiniteDifference(axis=-2)),
        "PySINDy, Savitzky-Golay 21, 4": lambda: (
            ps.PDELibrary(**library_kwargs, differentiation_method=ps.SmoothedFiniteDifference, diff_kwargs=smoothing),
            ps.SmoothedFiniteDifference(axis=-2, **smoothing),
        ),
    }
    library_kwargs = dict(
        function_library=ps.PolynomialLibrary(degree=3, include_bias=False),
        derivative_order=3,
        spatial_grid=x,
        include_bias=True,
        is_uniform=True,
    )
    rows = [
        f"PySINDy {ps.__version__}: `PDELibrary(PolynomialLibrary(degree=3), derivative_order=3)` (the same 16 "
        "terms), `STLSQ(threshold, alpha=1e-5, normalize_columns=True)` with our threshold 0.05 converted to "
        f"PySINDy's units (columns divided by their 2-norm, target not normalized: {threshold:.3g}), its default "
        "finite differences or Savitzky-Golay smoothing (`SmoothedFiniteDifference`, window 21, degree 4, along "
        "x for the library and t for h_t). lightning_pdenets: `library_from_samples` defaults + "
        "`fit_coefficients(threshold=0.05)`. Coefficients of seed 0; error: worst true-coefficient error, "
        "median / max over the seeds.",
        "",
        "| noise | method | h h_x (−1) | h_xx (0.1) | other non-zero terms (seed 0) | error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for sigma in NOISE_LEVELS:
        results: dict[str, list[dict[str, float]]] = {}
        for seed in range(seeds if sigma > 0 else 1):
            data = noisy(samples, sigma, seed)
            equation = GoverningEquation(("x",))
            equation.fit_coefficients(*equation.library_from_samples(data, (dx, dt)), threshold=0.05)
            results.setdefault("lightning_pdenets", []).append(equation.coefficients())
            for label, build in methods.items():
                library, differentiation = build()
                model = ps.SINDy(
                    feature_library=library,
                    differentiation_method=differentiation,
                    optimizer=ps.STLSQ(threshold=threshold, alpha=1e-5, normalize_columns=True),
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(data.numpy()[:, :, None], t=dt)
                names = [
                    n.replace("x0x0", "h h")
                    .replace("x0^", "h^")
                    .replace("x0", "h")
                    .replace("_111", "_xxx")
                    .replace("_11", "_xx")
                    .replace("_1", "_x")
                    for n in model.get_feature_names()
                ]
                results.setdefault(label, []).append(dict(zip(names, map(float, model.coefficients()[0]))))
        for label, runs in results.items():
            worst = [max(abs(r.get(t, 0.0) / v - 1) for t, v in expected.items()) for r in runs]
            others = sum(1 for t, v in runs[0].items() if t not in expected and v != 0)
            rows.append(
                f"| {sigma:.1%} | {label} | {runs[0].get('h h_x', 0.0):.4f} | {runs[0].get('h_xx', 0.0):.4f} "
                f"| {others} | {statistics.median(worst):.1%} / {max(worst):.1%} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=positive_int, default=10, help="noise draws per level")
    parser.add_argument("--skip-exact", action="store_true", help="leave out section 1 (exact derivatives)")
    parser.add_argument(
        "--box-scan",
        action="store_true",
        help="only the weak form's box sizes (grid / 4, 8, 12, 16) at 1%% and 5%% noise; no figure",
    )
    parser.add_argument("--additive", action="store_true", help="add KdV with PDE-FIND's additive noise")
    parser.add_argument("--pysindy", action="store_true", help="add PySINDy on the same noisy Burgers data")
    parser.add_argument("--pysindy-python", help="interpreter with PySINDy for its weak and ensemble references")
    parser.add_argument("--pysindy-seeds", type=positive_int, default=5, help="noise draws per level for PySINDy")
    parser.add_argument("--figure", type=Path, default=REPO / "bench" / "identification_noise.png")
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    check_output(parser, args.output)
    check_output(parser, args.figure, "--figure")
    if args.pysindy_python:
        check_pysindy_python(args.pysindy_python)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lines = [f"# Equation identification ({datetime.date.today()}, {args.seeds} seeds)", ""]
    if args.box_scan:
        lines += [
            "## Weak form: box half-width (median / max worst true-coefficient error, multiplicative noise)",
            "",
            *box_scan(args.seeds),
        ]
        print("\n".join(lines))
        if args.output:
            args.output.write_text("\n".join(lines) + "\n")
        return
    if not args.skip_exact:
        lines += ["## 1. Defaults, exact derivatives (16-term library, `fit_coefficients()`)", "", *exact_table(), ""]
    start = time.perf_counter()
    rows, curves = noise_table(args.seeds)
    lines += [
        "## 2. Samples with multiplicative noise h (1 + sigma N(0, 1)) (median / max worst true-coefficient "
        "error, wrong supports)",
        "",
        *rows,
        "",
        f"({time.perf_counter() - start:.0f} s)",
        "",
    ]
    if args.additive:
        rows, _ = noise_table(args.seeds, additive=True, names=("kdv",))
        lines += ["### KdV with PDE-FIND's additive noise h + sigma std(h) N(0, 1)", "", *rows, ""]
    references: dict = {}
    if args.pysindy_python:
        rows, references, version = pysindy_references(args.pysindy_python, args.pysindy_seeds)
        lines += [
            f"## 4. PySINDy {version} references on the same multiplicative-noise samples "
            f"({args.pysindy_seeds} draws per level; bench/pysindy_reference.py)",
            "",
            *rows,
            "",
        ]
    figure(curves, references, args.figure)
    if args.pysindy:
        lines += ["## 3. PySINDy on the same noisy Burgers data", "", *pysindy_table(args.seeds), ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
