"""Table 1 of Ott et al. (ICLR 2021) on 2-D concentric spheres: fixed steps vs step / tolerance adaptation.

For every training setup (Euler at a grid of fixed step sizes, Euler with StepSizeAdaptation,
dopri5 with ToleranceAdaptation) this trains the vector neural-ODE classifier and reports the test
accuracy with the training solver, with an accurate test solver (RK4 at h = 0.01), the largest drop
over SolverSwapCheck's default grid, and the forward NFE per training batch in the last epoch.

    flock /tmp/pdenets-cpu.lock python bench/bench_solver_adaptation.py --seeds 0 1 --epochs 30 \
        --out bench/results_solver_adaptation.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from _common import check_output, positive_int
from tqdm import tqdm

from lightning_pdenets.callbacks import NFEMonitor, SolverSwapCheck, StepSizeAdaptation, ToleranceAdaptation
from lightning_pdenets.data import ConcentricSpheresDataModule
from lightning_pdenets.evaluation import configure_blocks, evaluate_batches, evaluation_pass
from lightning_pdenets.models import VectorODEClassifierModule

FIXED_STEPS = (1.0, 0.5, 0.25, 0.1, 0.05)


def setups() -> list[tuple[str, dict[str, Any], Any]]:
    """(name, model kwargs, adaptation callback factory or None)."""
    rows: list[tuple[str, dict[str, Any], Any]] = [
        (f"Euler, fixed h = {h:g}", dict(solver={"method": "euler", "step_size": h}), None) for h in FIXED_STEPS
    ]
    rows.append(
        (
            "Euler, step adaptation",
            dict(solver={"method": "euler", "step_size": 0.5}),
            lambda: StepSizeAdaptation(interval=5, threshold=0.1, initial_step_size="hairer"),
        )
    )
    rows.append(
        (
            "dopri5, tolerance adaptation",
            dict(solver={"method": "dopri5", "step_size": None, "rtol": 1e-6, "atol": 1e-6}),
            lambda: ToleranceAdaptation(interval=5, threshold=0.1, initial_tol=1e-6),
        )
    )
    return rows


def run(model_kwargs: dict[str, Any], adaptation: Any, seed: int, epochs: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    data = ConcentricSpheresDataModule(dim=2, variant="ott", batch_size=128, seed=seed)
    module = VectorODEClassifierModule(network={"hidden_width": 32}, lr=1e-2, **model_kwargs)
    monitor = NFEMonitor(log_steps=False)
    swap = SolverSwapCheck(log_figure=False)
    callbacks = [monitor] + ([adaptation()] if adaptation else [])
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, swap],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    data.setup("test")
    trainer.test(module, data, verbose=False)  # SolverSwapCheck measures its grid on the test set
    swap_result = swap.results["test"]
    blocks = [module.network.ode]
    settings = blocks[0].solver_settings()
    with evaluation_pass(module):
        configure_blocks(blocks, "rk4", step_size=0.01)
        accurate, _, _ = evaluate_batches(trainer, module, blocks, iter(data.test_dataloader()))
    blocks[0].configure_solver(**{k: settings[k] for k in ("method", "step_size", "rtol", "atol", "max_num_steps")})
    train_nfe = [e["train/nfe_forward_epoch"] for e in monitor.epoch_history if e["stage"] == "train"][-1]
    return {
        "acc_train_solver": swap_result["train_solver_acc"],
        "acc_rk4": accurate,
        "drop_rk4": swap_result["train_solver_acc"] - accurate,
        "max_drop": swap_result["max_drop"],
        "nfe": train_nfe,
        "final_h": settings["step_size"] if settings["method"] != "dopri5" else float("nan"),
        "final_tol": settings["rtol"] if settings["method"] == "dopri5" else float("nan"),
        "seconds": seconds,
    }


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    check_output(parser, args.out, "--out")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = setups()
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in rows}
    jobs = [(row, seed) for row in rows for seed in args.seeds]
    for (name, kwargs, adaptation), seed in tqdm(jobs, desc="trainings"):
        results[name].append(run(kwargs, adaptation, seed, args.epochs))
    lines = [
        "| Training | final h / tol | test acc (train solver) | test acc (RK4, h = 0.01) | drop to RK4 | largest drop over the grid | forward NFE / batch | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in rows:
        rs = results[name]
        final = [r["final_h"] if r["final_h"] == r["final_h"] else r["final_tol"] for r in rs]
        final_text = ", ".join(f"{v:.3g}" for v in final)
        lines.append(
            f"| {name} | {final_text} | {mean_std([r['acc_train_solver'] for r in rs])} | "
            f"{mean_std([r['acc_rk4'] for r in rs])} | {mean_std([r['drop_rk4'] for r in rs])} | "
            f"{mean_std([r['max_drop'] for r in rs])} | "
            f"{mean_std([r['nfe'] for r in rs], 1)} | {mean_std([r['seconds'] for r in rs], 0)} |"
        )
    header = (
        f"# Solver adaptation on 2-D concentric spheres (Ott et al., ICLR 2021, Table 1 format)\n\n"
        f"Date: {datetime.date.today()}. Machine: 2-core CPU container (shared). Seeds: {args.seeds}; "
        f"{args.epochs} epochs; Ott et al.'s three shells, 2,000 train / 1,000 test points; MLP field "
        f"(2 hidden layers of 32), Adam lr 1e-2, batch 128. Accuracies are on the test set (mean ± std over "
        f"seeds); 'drop to RK4' is test accuracy with the training solver minus that with RK4 at h = 0.01 (the "
        f"paper's train/test solver gap); 'largest drop over the grid' is SolverSwapCheck's max_drop over its "
        f"default grid (euler/midpoint/rk4 at 0.5–2× h, dopri5 at 0.1–10× tol; coarser settings included, for "
        f"dopri5 training the fixed-step solvers use h = 0.1); NFE is the mean forward NFE per training batch in "
        f"the last epoch; 'final h / tol' lists each seed's value at the end of training.\n\n"
        f"Command: `flock /tmp/pdenets-cpu.lock python bench/bench_solver_adaptation.py --seeds "
        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs} --out bench/results_solver_adaptation.md`\n\n"
    )
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
