"""Ott et al. (ICLR 2021), "ResNet After All", on real MNIST (issue 30 item 1): test-solver grid of trained RK-Nets.

Each training setting is a committed config under ``configs/mnist/ott/`` (trained with ``pdenets fit``, see the
config's header). This script loads each run's ``last.ckpt`` (weights-only load), and measures test accuracy and
forward NFE with Euler, midpoint and RK4 at test step sizes h/8 ... 2h (h: the training step) and with dopri5 at
rtol = atol = 1e-4, through :class:`lightning_pdenets.callbacks.SolverSwapCheck` (its grid, its tqdm progress bar).
For the step-adaptation run, h is the step the StepSizeAdaptation callback ended training with (read from the
checkpoint's callback state).

A training setting "behaves as an ODE" when no finer (step <= h, same order) or higher-order test solver, nor
dopri5 at 1e-4, loses more than 1 percentage point against the training solver at h. The critical step size of
a training solver lies between the largest h that behaves as an ODE and the smallest h that does not.

    python bench/bench_ott_mnist.py --test-size 10000          # evaluate every finished run (cached per run)
    python bench/bench_ott_mnist.py --report-only               # table + figure from the cache

Writes ``bench/results_ott_mnist.md`` and ``bench/ott_mnist_accuracy_vs_step.png``; per-run results are cached
as JSON under ``logs/ott/grid/`` (git-ignored) so that an interrupted evaluation resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import check_output, missing_data_exits, non_negative_int, positive_int

ROOT = Path(__file__).resolve().parents[1]
LOG_ROOT = ROOT / "logs" / "mnist" / "ott"
CACHE = Path(os.environ.get("OTT_GRID_CACHE", ROOT / "logs" / "ott" / "grid"))
TRAIN_LOGS = ROOT / "logs" / "ott"

# (run name = config stem, label, training solver, training step or None when adapted)
RUNS: list[tuple[str, str, str, float | None]] = [
    ("euler_h1", "Euler, h = 1", "euler", 1.0),
    ("euler_h2_3", "Euler, h = 2/3", "euler", 2 / 3),  # steps 2/3 and 1/3 (the last one shortened to end at t = 1)
    ("euler_h1_2", "Euler, h = 1/2", "euler", 0.5),
    ("euler_h1_4", "Euler, h = 1/4", "euler", 0.25),
    ("euler_h1_8", "Euler, h = 1/8", "euler", 0.125),
    ("rk4_h1", "RK4, h = 1", "rk4", 1.0),
    ("rk4_h1_2", "RK4, h = 1/2", "rk4", 0.5),
    ("euler_adaptive", "Euler, step adaptation", "euler", None),
    ("euler_h1_seed1", "Euler, h = 1 (seed 1)", "euler", 1.0),
    ("euler_h2_3_seed1", "Euler, h = 2/3 (seed 1)", "euler", 2 / 3),
    ("euler_h2_3_seed2", "Euler, h = 2/3 (seed 2)", "euler", 2 / 3),
    ("euler_h1_2_seed1", "Euler, h = 1/2 (seed 1)", "euler", 0.5),
    ("euler_adaptive_seed1", "Euler, step adaptation (seed 1)", "euler", None),
]
STEP_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
FIXED_SOLVERS = ("euler", "midpoint", "rk4")
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4}
DOPRI5_TOL = 1e-4
DROP = 0.01  # 1 percentage point
TEST_IMAGES = 10000
KEEP_MARKER = "<!-- hand-written below: kept when the report is regenerated -->"


EXPORTED = ROOT / "bench" / "checkpoints" / "mnist" / "ott"


def checkpoint_of(name: str) -> Path | None:
    """The run's newest last.ckpt under logs/, else the committed weights-only copy (``--export``)."""
    found = sorted(LOG_ROOT.glob(f"{name}/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    exported = EXPORTED / f"{name}.ckpt"
    return exported if exported.exists() else None


def export(name: str) -> Path:
    """Weights-only copy of the run's last.ckpt (no optimizer state; the adaptation callback's state kept), < 1 MB."""
    path = checkpoint_of(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    keep = (
        "state_dict",
        "hyper_parameters",
        "hparams_name",
        "pytorch-lightning_version",
        "lightning_pdenets_version",
        "epoch",
        "global_step",
    )
    slim = {k: state[k] for k in keep if k in state}
    slim["callbacks"] = {k: v for k, v in state.get("callbacks", {}).items() if "StepSizeAdaptation" in k}
    EXPORTED.mkdir(parents=True, exist_ok=True)
    torch.save(slim, EXPORTED / f"{name}.ckpt")
    return EXPORTED / f"{name}.ckpt"


def full_test_accuracy(name: str) -> float | None:
    """test/acc_top1 printed by `pdenets fit` (test after fit, full 10,000 images, training solver)."""
    log = TRAIN_LOGS / f"{name}.log"
    if not log.exists():
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    found = re.findall(r"test/acc_top1[\s│|]+([0-9.]+)", text)
    return float(found[-1]) if found else None


def adapted_history(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if "StepSizeAdaptation" in key:
            return state
    return None


def evaluate(name: str, test_size: int, batch_size: int, data_dir: str) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_pdenets.callbacks import SolverSwapCheck
    from lightning_pdenets.data import MNISTDataModule
    from lightning_pdenets.evaluation import configure_blocks
    from lightning_pdenets.models import RKNetModule
    from lightning_pdenets.protocols import find_ode_blocks

    path = checkpoint_of(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = RKNetModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    blocks = find_ode_blocks(model)
    settings = blocks[0].solver_settings()
    adaptation = adapted_history(state)
    if adaptation is not None:  # the step the callback ended training with (hparams keep the initial one)
        configure_blocks(blocks, settings["method"], step_size=adaptation["step_size"])
        settings = blocks[0].solver_settings()
    check = SolverSwapCheck(
        solvers=(*FIXED_SOLVERS, "dopri5"),
        step_factors=STEP_FACTORS,
        tolerance_factors=(DOPRI5_TOL / settings["rtol"],),
        max_batches=math.ceil(test_size / batch_size),
        log_figure=False,
    )
    data = MNISTDataModule(data_dir=data_dir, download=False, batch_size=batch_size, val_size=5000)
    tester = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[check],
        enable_model_summary=False,
        enable_progress_bar=True,
        limit_test_batches=1,
    )
    start = time.perf_counter()
    tester.test(model, datamodule=data, verbose=False)
    seconds = time.perf_counter() - start
    result = check.results["test"]
    return {
        "name": name,
        "checkpoint": str(path.relative_to(ROOT)),
        "train_solver": result["train_solver"],
        "train_step_size": result["train_step_size"],
        "train_solver_acc": result["train_solver_acc"],
        "train_solver_nfe": result["train_solver_nfe"],
        "combinations": [{"solver": s, "factor": f, **c} for (s, f), c in result["combinations"].items()],
        "full_test_acc_train_solver": full_test_accuracy(name),
        "adaptation": None
        if adaptation is None
        else {
            "step_size": adaptation["step_size"],
            "history": [
                {k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in adaptation["history"]
            ],
        },
        "test_size": test_size,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def full_check(name: str, result: dict[str, Any], size: int, batch_size: int, data_dir: str) -> dict[str, Any]:
    """The training solver against dopri5 at 1e-4 on the first ``size`` test images (the ODE criterion's main test)."""
    import lightning.pytorch as pl

    from lightning_pdenets.callbacks import SolverSwapCheck
    from lightning_pdenets.data import MNISTDataModule
    from lightning_pdenets.evaluation import configure_blocks
    from lightning_pdenets.models import RKNetModule
    from lightning_pdenets.protocols import find_ode_blocks

    path = ROOT / result["checkpoint"]
    model = RKNetModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    blocks = find_ode_blocks(model)
    configure_blocks(blocks, result["train_solver"], step_size=result["train_step_size"])
    rtol = blocks[0].solver_settings()["rtol"]
    check = SolverSwapCheck(
        solvers=("dopri5",),
        tolerance_factors=(DOPRI5_TOL / rtol,),
        max_batches=math.ceil(size / batch_size),
        log_figure=False,
    )
    data = MNISTDataModule(data_dir=data_dir, download=False, batch_size=batch_size, val_size=5000)
    tester = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[check],
        enable_model_summary=False,
        enable_progress_bar=True,
        limit_test_batches=1,
    )
    start = time.perf_counter()
    tester.test(model, datamodule=data, verbose=False)
    measured = check.results["test"]
    dopri = next(iter(measured["combinations"].values()))
    return {
        "size": size,
        "train_solver_acc": measured["train_solver_acc"],
        "dopri5_acc": dopri["accuracy"],
        "dopri5_nfe": dopri["nfe"],
        "seconds": time.perf_counter() - start,
    }


def is_valid(result: dict[str, Any]) -> bool:
    """Behaves as an ODE: no finer or higher-order test solver of the grid, nor dopri5 1e-4, loses more than 1 pp
    against the training solver. Where the grid ran on fewer images than a separate dopri5 comparison, that larger
    comparison decides (on a 1,000-image grid the finest fixed-step solvers agree with dopri5 within 0.2 pp, so
    dopri5 stands for them)."""
    full = result.get("full_check")
    if full is not None and full["size"] > result["test_size"]:
        return full["train_solver_acc"] - full["dopri5_acc"] <= DROP
    return ode_drop(result)[0] <= DROP


def whole_test_set(results: dict[str, dict[str, Any]]) -> bool:
    """Every grid ran on all 10,000 MNIST test images."""
    return all(r["test_size"] >= 10000 for r in results.values())


def grid_images(results: dict[str, dict[str, Any]]) -> str:
    """'1,000' or '10,000' (or '1,000/10,000'): the test images the grids ran on."""
    return "/".join(f"{s:,}" for s in sorted({r["test_size"] for r in results.values()}))


# -- analysis -----------------------------------------------------------------------------------------------------
def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Finer (same order, step <= h) or higher-order (step <= h) test solvers, and dopri5: the ODE criterion."""
    h, order = result["train_step_size"], ORDER[result["train_solver"]]
    chosen = []
    for c in result["combinations"]:
        if c["solver"] == "dopri5" or (
            c["value"] <= h * (1 + 1e-9)
            and ORDER[c["solver"]] >= order
            and not (c["solver"] == result["train_solver"] and abs(c["value"] - h) < 1e-12)
        ):
            chosen.append(c)
    return chosen


def ode_drop(result: dict[str, Any]) -> tuple[float, str]:
    """Largest accuracy drop against the training solver over :func:`comparisons`, and where."""
    worst = max(
        comparisons(result),
        key=lambda c: result["train_solver_acc"] - (c["accuracy"] if not math.isnan(c["accuracy"]) else -1.0),
    )
    acc = worst["accuracy"] if not math.isnan(worst["accuracy"]) else 0.0
    where = (
        f"dopri5 {worst['value']:.0e}" if worst["solver"] == "dopri5" else f"{worst['solver']} h={frac(worst['value'])}"
    )
    return result["train_solver_acc"] - acc, where


def more_images(result: dict[str, Any]) -> str:
    full = result.get("full_check")
    if full is None:
        return "—"
    return (
        f"{full['train_solver_acc']:.4f} / {full['dopri5_acc']:.4f} ({full['size']:,} images; drop "
        f"{100 * (full['train_solver_acc'] - full['dopri5_acc']):+.2f} pp)"
    )


def critical_steps(results: dict[str, dict[str, Any]], seed: int = 0) -> dict[str, tuple[float | None, float | None]]:
    """Per training solver, over the runs of one seed: (largest fixed h that behaves as an ODE, smallest fixed h
    that does not)."""
    out = {}
    for solver in ("euler", "rk4"):
        fixed = [
            (r["train_step_size"], is_valid(r))
            for n, r in results.items()
            if r["train_solver"] == solver and r["adaptation"] is None and seed_of(n) == seed
        ]
        valid = [h for h, ok in fixed if ok]
        largest_valid = max(valid) if valid else None
        invalid_above = [h for h, ok in fixed if not ok and (largest_valid is None or h > largest_valid)]
        if fixed:  # an invalid h below a valid one (a borderline drop) does not move the bracket; see the table
            out[solver] = (largest_valid, min(invalid_above) if invalid_above else None)
    return out


def frac(h: float) -> str:
    """``h`` as a fraction p/q with q <= 64 where it is one (1/2, 2/3), else to 3 significant digits."""
    if h >= 1 or abs(h - round(h)) < 1e-12:
        return f"{h:g}"
    for q in range(2, 65):
        p = round(h * q)
        if abs(h - p / q) < 1e-9:
            return f"{p}/{q}"
    return f"{h:.3g}"


def seed_groups(results: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Runs of one setting trained with several seeds (run names ``<base>`` and ``<base>_seed<k>``)."""
    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(re.sub(r"_seed\d+$", "", name), []).append(name)
    return {base: names for base, names in groups.items() if len(names) > 1}


def train_and_dopri5(result: dict[str, Any]) -> tuple[float, float]:
    """Accuracy with the training solver and with dopri5 1e-4 on the most test images measured (a separate
    full-set comparison where the grid ran on fewer images)."""
    full = result.get("full_check")
    if full is not None and full["size"] > result["test_size"]:
        return full["train_solver_acc"], full["dopri5_acc"]
    return result["train_solver_acc"], next(c["accuracy"] for c in result["combinations"] if c["solver"] == "dopri5")


def seed_of(name: str) -> int:
    found = re.search(r"_seed(\d+)$", name)
    return int(found.group(1)) if found else 0  # the configs without a suffix use seed_everything: 0


def seed_spread(results: dict[str, dict[str, Any]]) -> list[str]:
    """Per setting with several seeds: each seed's training-solver and dopri5 accuracy (10,000 images) and the
    spread (max - min) over seeds."""
    groups = seed_groups(results)
    if not groups:
        return []
    lines = [
        "",
        "## Seed spread at the critical step",
        "",
        "Each seed: accuracy with the training solver and with dopri5 1e-4 on all 10,000 test images, their "
        f"difference (the ODE criterion), and the grid's ODE drop ({grid_images(results)} images). Spread: max - min over seeds.",
        "",
        "| training setting | seed | train solver acc | dopri5 1e-4 acc | drop to dopri5 | grid ODE drop | behaves as ODE |",
        "|---|---|---|---|---|---|---|",
    ]
    for base, names in groups.items():
        label = {n: label for n, label, _, _ in RUNS}[base]
        rows = []
        for name in sorted(names, key=seed_of):
            r = results[name]
            acc, dopri = train_and_dopri5(r)
            rows.append((acc, dopri, acc - dopri, ode_drop(r)[0]))
            lines.append(
                f"| {label} | {seed_of(name)} | {acc:.4f} | {dopri:.4f} | {100 * (acc - dopri):+.2f} pp | "
                f"{100 * ode_drop(r)[0]:+.2f} pp | {'yes' if is_valid(r) else 'no'} |"
            )
        spread = [max(col) - min(col) for col in zip(*rows)]
        lines.append(
            f"| {label} | spread | {100 * spread[0]:.2f} pp | {100 * spread[1]:.2f} pp | {100 * spread[2]:.2f} pp "
            f"| {100 * spread[3]:.2f} pp | |"
        )
    return lines


def label_of(name: str, result: dict[str, Any]) -> str:
    label = {n: label for n, label, _, _ in RUNS}[name]
    if result["adaptation"] is not None:
        label += f" (final h = {result['train_step_size']:.3g})"
    return label


def write_markdown(results: dict[str, dict[str, Any]], out: Path, figure: Path, command: str) -> None:
    sizes = sorted({r["test_size"] for r in results.values()})
    lines = [
        "# ResNet After All on MNIST (Ott et al., ICLR 2021; issue 30 item 1)",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()} CPU, "
        f"{os.cpu_count()} cores visible, shared with other jobs; torch {torch.__version__}, 1 thread per process.",
        "Test images: all 10,000 MNIST test images, for every grid point."
        if whole_test_set(results)
        else f"Test images: the first {', '.join(f'{s:,}' for s in sizes)} of the 10,000 MNIST test images "
        "(the 'full test acc' column: all 10,000, training solver, from `pdenets fit`'s test after fit).",
        "Training: `pdenets fit --config configs/mnist/ott/<run>.yaml --data.data_dir /work/shared/data "
        "--data.download false` (RK-Net of Chen et al., one ODE block over t in [0, 1]; Adam one-cycle peak 1e-3, "
        "batch 32, no augmentation, 1 epoch on 55,000 images).",
        f"Evaluation: `{command}` (SolverSwapCheck grid: Euler, midpoint, RK4 at h/8 ... 2h; dopri5 at rtol = atol "
        f"= {DOPRI5_TOL:g}). A step larger than the interval [0, 1] is clipped to it, so 2h = h for h = 1 and 2h = 1 "
        "for h = 2/3. A step that does not divide [0, 1] is followed by a shorter last step that ends at t = 1 "
        "(torchdiffeq's fixed grid): h = 2/3 takes the steps 2/3 and 1/3.",
        f"Figure: `{figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure}`.",
        "",
        "NFE: forward function evaluations per test batch of the ODE block (fixed-step solvers: steps x stages; "
        "dopri5: mean over batches of 500 images).",
        "",
        "## Training settings and the ODE criterion",
        "",
        "'ODE drop': accuracy with the training solver at h minus the lowest accuracy over finer (step <= h) or "
        f"higher-order fixed-step test solvers and dopri5 at 1e-4 ({grid_images(results)} images). 'Behaves as ODE': "
        "the ODE drop is <= 1 pp; where a grid ran on fewer test images than a separate training-solver-against-"
        "dopri5 comparison, that comparison decides (on 1,000 images one image is 0.1 pp).",
        "",
    ]
    whole = whole_test_set(results)
    if whole:  # the grid itself ran on all 10,000 images: no separate full-set columns
        lines += [
            "| training setting | train NFE | test acc (train solver) | dopri5 1e-4 acc (NFE) | ODE drop | worst at "
            "| behaves as ODE |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| training setting | train NFE | full test acc (train solver) | test acc (train solver) "
            "| dopri5 1e-4 acc (NFE) | ODE drop | worst at | train solver / dopri5 on more images | behaves as ODE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for name, r in results.items():
        drop, where = ode_drop(r)
        dopri = next(c for c in r["combinations"] if c["solver"] == "dopri5")
        full = r["full_test_acc_train_solver"]
        full_cell = "" if whole else f" {'—' if full is None else f'{full:.4f}'} |"
        more_cell = "" if whole else f" {more_images(r)} |"
        lines.append(
            f"| {label_of(name, r)} | {r['train_solver_nfe']:.0f} |{full_cell} {r['train_solver_acc']:.4f} "
            f"| {dopri['accuracy']:.4f} ({dopri['nfe']:.0f}) | {100 * drop:+.2f} pp | {where} |{more_cell} "
            f"{'yes' if is_valid(r) else 'no'} |"
        )
    lines += [
        "",
        "Critical training step size (per seed: largest h that behaves as an ODE, smallest h that does not; "
        "seed 1 trained at Euler h = 1, 2/3 and 1/2 only, seed 2 at h = 2/3 only):",
        "",
    ]
    for seed in sorted({seed_of(n) for n, r in results.items() if r["adaptation"] is None}):
        for solver, (valid, invalid) in critical_steps(results, seed).items():
            lines.append(
                f"- {solver}, seed {seed}: valid up to h = {frac(valid) if valid else '— (none)'}; "
                f"not valid from h = {frac(invalid) if invalid else '— (none trained)'}"
            )
    lines += [
        "",
        "## Test accuracy (forward NFE) against test solver and test step",
        "",
        "| training setting | test solver | h/8 | h/4 | h/2 | h | 2h |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for solver in FIXED_SOLVERS:
            cells = []
            for f in STEP_FACTORS:
                c = next(c for c in r["combinations"] if c["solver"] == solver and abs(c["factor"] - f) < 1e-12)
                mark = "**" if solver == r["train_solver"] and f == 1.0 else ""
                cells.append(f"{mark}{c['accuracy']:.4f}{mark} ({c['nfe']:.0f})")
            label = label_of(name, r) if r["adaptation"] else f"{label_of(name, r)}"
            lines.append(f"| {label} | {solver} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bold: the training solver at the training step. Evaluation wall time per run (s): "
        + ", ".join(f"{n} {r['seconds']:.0f}" for n, r in results.items())
        + ".",
    ]
    adaptive = [(n, r) for n, r in results.items() if r["adaptation"] is not None]
    lines += table_one(results)
    lines += seed_spread(results)
    if adaptive:
        lines += ["", "## Step adaptation: history of the StepSizeAdaptation checks", ""]
        for name, r in adaptive:
            hist = r["adaptation"]["history"]
            steps = " → ".join(
                f"{e['step_size']:.3g}@{e['step']}"
                for e in hist
                if e.get("decision") in ("initial", "shrink", "grow") or e is hist[-1]
            )
            lines.append(
                f"- {name}: h@training step (initial, after each shrink/grow): {steps}; "
                f"{len(hist) - 1} checks; final h = {r['adaptation']['step_size']:.4g}; "
                f"mean forward NFE per training batch {mean_training_nfe(hist):.2f} (from the history)"
            )
    kept = ""  # the hand-written comparison with the paper below the marker survives a regeneration
    if out.exists() and KEEP_MARKER in out.read_text():
        kept = "\n" + KEEP_MARKER + out.read_text().split(KEEP_MARKER, 1)[1]
    out.write_text("\n".join(lines) + "\n" + kept)


def mean_training_nfe(history: list[dict[str, Any]], total_steps: int = 1719) -> float:
    """Mean Euler steps per training batch implied by the adaptation history (h from each check to the next)."""
    points = sorted((e["step"], e["step_size"]) for e in history)
    nfe = 0.0
    for (start, h), (end, _) in zip(points, [*points[1:], (total_steps, None)]):
        nfe += (end - start) * math.ceil(1 / h - 1e-9)
    return nfe / max(total_steps - points[0][0], 1)


def table_one(results: dict[str, dict[str, Any]]) -> list[str]:
    """Ott et al.'s Table 1 format: the cheapest fixed Euler step that behaves as an ODE (grid search) against
    step adaptation, with accuracy and NFE."""
    lines = [
        "",
        "## Table 1 format: grid search against step adaptation (Euler training)",
        "",
        "Grid search: per seed, the largest fixed Euler h trained with it that behaves as an ODE; step "
        "adaptation: one run per seed, started at h = 1. 'train NFE': forward evaluations of the ODE block per "
        "training batch (grid: 1/h; adaptation: the mean over training implied by the callback's history, the "
        "checks' own evaluations not counted). 'test NFE': per image at test (training solver at the training "
        "or final h). 'acc (dopri5)': the same model under dopri5 at 1e-4.",
        "",
        f"| method | h | train NFE | test acc (train solver, {grid_images(results)} images) | acc (dopri5 1e-4) "
        "| ODE drop | test NFE |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for seed in sorted({seed_of(n) for n, r in results.items() if r["adaptation"] is None}):
        valid, _ = critical_steps(results, seed).get("euler", (None, None))
        rows += [
            ("grid search", n, r)
            for n, r in results.items()
            if r["train_solver"] == "euler"
            and r["adaptation"] is None
            and seed_of(n) == seed
            and valid is not None
            and abs(r["train_step_size"] - valid) < 1e-12
        ]
        if valid is None:
            lines.append(f"| grid search, seed {seed} | none of its fixed Euler steps behaves as an ODE | | | | | |")
    rows += [("step adaptation", n, r) for n, r in results.items() if r["adaptation"] is not None]
    for method, name, r in rows:
        dopri = next(c for c in r["combinations"] if c["solver"] == "dopri5")
        adaptation = r["adaptation"]
        train_nfe = (
            mean_training_nfe(adaptation["history"])
            if adaptation is not None
            else math.ceil(1 / r["train_step_size"] - 1e-9)
        )
        lines.append(
            f"| {method} ({name}) | {r['train_step_size']:.4g} | {train_nfe:.2f} | "
            f"{r['train_solver_acc']:.4f} | {dopri['accuracy']:.4f} | {100 * ode_drop(r)[0]:+.2f} pp | "
            f"{r['train_solver_nfe']:.0f} |"
        )
    return lines


def plot(results: dict[str, dict[str, Any]], figure_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crit = critical_steps(results)
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5), gridspec_kw={"width_ratios": [1, 1, 1, 0.8]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["black", "gold", "navy"]  # > 10 runs
    for col, solver in enumerate(FIXED_SOLVERS):
        for row in range(2):
            ax = axes[row, col]
            for i, (name, r) in enumerate(results.items()):
                pts = sorted((c["value"], c["accuracy"]) for c in r["combinations"] if c["solver"] == solver)
                xs, ys = zip(*pts)
                style = (
                    "--"
                    if r["train_solver"] == "rk4"
                    else ("-." if r["adaptation"] else (":" if seed_of(name) else "-"))
                )
                ax.plot(xs, ys, style, marker="o", ms=4, color=colors[i % len(colors)], label=label_of(name, r))
                low = [(x, y) for x, y in pts if y < r["train_solver_acc"] - DROP]
                if low:
                    ax.scatter(*zip(*low), s=70, facecolors="none", edgecolors=colors[i % len(colors)], zorder=3)
                if solver == r["train_solver"]:
                    ax.scatter(
                        [r["train_step_size"]],
                        [r["train_solver_acc"]],
                        marker="*",
                        s=220,
                        color=colors[i % len(colors)],
                        edgecolors="k",
                        zorder=4,
                    )
            for train_solver, ls in (("euler", ":"), ("rk4", "-.")):
                valid, invalid = crit.get(train_solver, (None, None))
                if invalid is not None:
                    ax.axvline(
                        invalid,
                        color="k" if train_solver == "euler" else "grey",
                        ls=ls,
                        lw=1.2,
                        label=f"critical h ({train_solver} training, seed 0): valid ≤ {frac(valid) if valid else '—'}, "
                        f"not from {frac(invalid)}"
                        if (row, col) == (0, 0)
                        else None,
                    )
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"test solver: {solver}")
                ax.set_ylim(0, 1.01)
            else:
                ax.set_ylim(0.95, 1.0)
                ax.set_xlabel("test step size")
            if col == 0:
                ax.set_ylabel("test accuracy" + (" (zoom)" if row else ""))
    names = list(results)
    for row in range(2):  # dopri5 at 1e-4 against the training solver, per training setting
        ax = axes[row, 3]
        xs = range(len(names))

        def pair(n: str) -> tuple[float, float]:
            return train_and_dopri5(results[n])

        ax.bar(
            [x - 0.2 for x in xs],
            [pair(n)[0] for n in names],
            0.4,
            label="training solver at h",
            color=[colors[i % len(colors)] for i in xs],
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [pair(n)[1] for n in names],
            0.4,
            label=f"dopri5 {DOPRI5_TOL:g}",
            color="none",
            edgecolor=[colors[i % len(colors)] for i in xs],
            hatch="//",
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=45, ha="right", fontsize=8)
        ax.set_ylim((0, 1.01) if row == 0 else (0.95, 1.0))
        ax.grid(alpha=0.3, axis="y")
        if row == 0:
            ax.set_title(f"training solver vs dopri5 {DOPRI5_TOL:g}\n(all 10,000 test images)", fontsize=10)
            ax.legend(fontsize=7, loc="lower left")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"RK-Net on MNIST (Ott et al. 2021), 1 epoch: test accuracy vs test step size ({grid_images(results)} "
        "test images); "
        "★ training solver at its h; open circles: > 1 pp below it",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(figure_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", nargs="+", default=[n for n, *_ in RUNS], choices=[n for n, *_ in RUNS], metavar="RUN"
    )
    parser.add_argument(
        "--test-size",
        type=positive_int,
        default=1000,
        help=f"the first N test images, a multiple of --batch-size, at most {TEST_IMAGES:,}",
    )
    parser.add_argument("--batch-size", type=positive_int, default=500)
    parser.add_argument("--data-dir", default="/work/shared/data")
    parser.add_argument("--report-only", action="store_true", help="no evaluation: table and figure from the cache")
    parser.add_argument(
        "--full-check",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also compare the training solver with dopri5 1e-4 on the first N test images (cached)",
    )
    parser.add_argument("--force", action="store_true", help="re-evaluate cached runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_ott_mnist.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "bench" / "ott_mnist_accuracy_vs_step.png")
    parser.add_argument(
        "--export",
        action="store_true",
        help="write weights-only copies of the runs' checkpoints to bench/checkpoints/mnist/ott/",
    )
    args = parser.parse_args()
    # SolverSwapCheck measures whole batches: a size that is not a multiple of the batch would measure more images
    # than it records
    for option, size in (("--test-size", args.test_size), ("--full-check", args.full_check)):
        if size and (size % args.batch_size or size > TEST_IMAGES):  # --full-check 0: none
            parser.error(
                f"{option} {size}: give a multiple of --batch-size ({args.batch_size}) of at most {TEST_IMAGES:,} "
                "(the MNIST test images)"
            )
    check_output(parser, args.out, "--out")
    check_output(parser, args.figure, "--figure")
    if args.export:
        for name in args.runs:
            if checkpoint_of(name) is not None:
                print(f"{name}: {export(name).relative_to(ROOT)}", flush=True)
        return
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    CACHE.mkdir(parents=True, exist_ok=True)
    with missing_data_exits(args.data_dir):
        evaluate_runs(args)
    report(args)


def evaluate_runs(args: argparse.Namespace) -> None:
    for name in args.runs:
        cache = CACHE / f"{name}.json"
        if args.report_only or (cache.exists() and not args.force):
            continue
        if checkpoint_of(name) is None:
            print(f"{name}: no checkpoint yet, skipped", flush=True)
            continue
        result = evaluate(name, args.test_size, args.batch_size, args.data_dir)
        cache.write_text(json.dumps(result, indent=1))
        print(
            f"{name}: train solver acc {result['train_solver_acc']:.4f}, ODE drop {ode_drop(result)[0]:+.4f} "
            f"({result['seconds']:.0f} s)",
            flush=True,
        )
    for name in args.runs:
        cache = CACHE / f"{name}.json"
        if args.report_only or not args.full_check or not cache.exists():
            continue
        result = json.loads(cache.read_text())
        if (result.get("full_check") or {}).get("size") == args.full_check and not args.force:
            continue
        result["full_check"] = full_check(name, result, args.full_check, args.batch_size, args.data_dir)
        cache.write_text(json.dumps(result, indent=1))
        print(f"{name}: {more_images(result)}", flush=True)


def report(args: argparse.Namespace) -> None:
    results = {n: json.loads((CACHE / f"{n}.json").read_text()) for n, *_ in RUNS if (CACHE / f"{n}.json").exists()}
    if not results:
        return
    for name, result in results.items():  # the fit log may have been read before its test finished
        result["full_test_acc_train_solver"] = full_test_accuracy(name) or result["full_test_acc_train_solver"]
    command = "python bench/bench_ott_mnist.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    if args.report_only:
        sizes = "/".join(str(n) for n in sorted({r["test_size"] for r in results.values()}))
        full = "" if whole_test_set(results) else " --full-check 10000"
        command = (
            f"python bench/bench_ott_mnist.py --runs <run> --test-size {sizes}{full} "
            "(per run, as each training ended), then --report-only"
        )
    write_markdown(results, args.out, args.figure, command.strip())
    plot(results, args.figure)
    print(f"wrote {args.out} and {args.figure}", flush=True)


if __name__ == "__main__":
    main()
