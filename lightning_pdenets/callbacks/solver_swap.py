"""Measure how a neural ODE's accuracy depends on the solver it is tested with (train/test solver swap).

Ott, Katiyar, Hennig & Tiemann, "ResNet After All: Neural ODEs and Their Numerical Solution",
ICLR 2021, Figures 2-4: a model trained with a coarse solver loses accuracy when tested with a more
accurate one. This callback only measures; :class:`StepSizeAdaptation` and
:class:`ToleranceAdaptation` act on the result.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import (
    add_figure,
    configure_blocks,
    evaluate_batches,
    evaluation_pass,
    require_ode_blocks,
    restored_solvers,
)
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.solvers import SOLVERS, check_solver_name
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = ["SolverSwapCheck"]


def _check_factors(values: Any, argument: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"`{argument}` must be a non-empty list of positive numbers, got {values!r}.")
    for value in values:
        check_positive(value, argument)
    return tuple(float(v) for v in values)


class SolverSwapCheck(Callback):
    """Evaluate the model over a grid of test solvers × step-size (or tolerance) factors.

    Runs at the end of validation every ``every_n_epochs`` epochs and at the end of testing, on that
    stage's dataloader. Fixed-step solvers run at ``factor × h`` for each step factor, where h is
    the training step size (``base_step_size`` when the training solver is adaptive); adaptive
    solvers run at ``factor × (rtol, atol)`` of training for each tolerance factor. The blocks'
    training settings are restored afterwards; evaluation runs in eval mode under ``no_grad``, so
    batch-norm statistics and parameter gradients are untouched, and NFE counters are preserved.
    Under ``fast_dev_run`` only one batch and factor 1 of each solver are evaluated.

    Logged (``{stage}`` is ``val`` or ``test``): ``solver_swap/{stage}/{solver}_x{factor}`` accuracies,
    ``solver_swap/{stage}/train_solver_acc`` and ``solver_swap/{stage}/max_drop`` (largest accuracy
    drop against the training solver). With a TensorBoard logger, a figure of accuracy against
    test step size (and tolerance) is added. The latest results are in :attr:`results`.

    Args:
        solvers: Test solvers.
        step_factors: Multiples of the training step size for fixed-step test solvers.
        tolerance_factors: Multiples of the training tolerance for adaptive test solvers.
        every_n_epochs: Validation epochs between measurements.
        max_batches: Evaluate at most this many batches per combination (default: all the batches the trainer
            validates or tests, after its ``limit_val_batches``/``limit_test_batches``).
        base_step_size: Step size multiplied by the factors when training with an adaptive solver
            (default: (t1 − t0)/10).
        log_figure: Add the accuracy-versus-step-size figure to TensorBoard.
    """

    def __init__(
        self,
        solvers: Sequence[str] = ("euler", "midpoint", "rk4", "dopri5"),
        step_factors: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0),
        tolerance_factors: Sequence[float] = (0.1, 1.0, 10.0),
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        base_step_size: float | None = None,
        log_figure: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(solvers, (str, bytes)) or not isinstance(solvers, Sequence) or len(solvers) == 0:
            raise ValueError(f"`solvers` must be a non-empty list of solver names, got {solvers!r}.")
        for name in solvers:
            check_solver_name(name, "solvers")
        self.solvers = tuple(solvers)
        self.step_factors = _check_factors(step_factors, "step_factors")
        self.tolerance_factors = _check_factors(tolerance_factors, "tolerance_factors")
        check_positive_int(every_n_epochs, "every_n_epochs")
        if max_batches is not None:
            check_positive_int(max_batches, "max_batches")
        check_positive(base_step_size, "base_step_size", allow_none=True)
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.base_step_size = base_step_size
        self.log_figure = log_figure
        self.results: dict[str, dict[str, Any]] = {}

    # -- hooks -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a model without ODE blocks is refused before the run, not after its first training epoch; a
        # ConfigurationError is a short message with exit code 2 in the CLI (every DDP rank decides alike)
        if stage == "predict":
            return
        try:
            require_ode_blocks(pl_module, type(self).__name__)
        except ValueError as error:
            raise ConfigurationError(str(error)) from None

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._run(trainer, pl_module, "val", trainer.val_dataloaders, trainer.num_val_batches)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test", trainer.test_dataloaders, trainer.num_test_batches)

    # -- measurement ----------------------------------------------------------------------------------
    def _batches(self, trainer: pl.Trainer, dataloaders: Any, batch_limits: Sequence[float] | None = None):
        loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        for index, loader in enumerate(loaders):
            limits = [1 if trainer.fast_dev_run else self.max_batches]  # type: ignore[attr-defined]  # Trainer sets it
            if batch_limits is not None and index < len(batch_limits) and math.isfinite(batch_limits[index]):
                limits.append(int(batch_limits[index]))  # the trainer's own limit_val_batches / limit_test_batches
            bounded = [limit for limit in limits if limit is not None]
            for batch in itertools.islice(loader, min(bounded) if bounded else None):
                yield trainer.strategy.batch_to_device(batch)

    def grid(self, step_size: float, tol: float, quick: bool = False) -> list[tuple[str, float, float]]:
        """(solver, factor, step size or tolerance) combinations; ``quick`` keeps factor 1 only."""
        combos = []
        for solver in self.solvers:
            factors = self.tolerance_factors if SOLVERS[solver].adaptive else self.step_factors
            factors = (1.0,) if quick else factors
            base = tol if SOLVERS[solver].adaptive else step_size
            combos += [(solver, factor, factor * base) for factor in factors]
        return combos

    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloaders: Any,
        stage: str = "",
        batch_limits: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Accuracy of every grid combination and of the training solver; restores the training solver.

        Each combination is a pass over ``dataloaders`` (at most ``max_batches`` and ``batch_limits[i]`` batches
        of loader i: the hooks pass the trainer's ``num_val_batches``/``num_test_batches``, so
        ``limit_val_batches``/``limit_test_batches`` hold); a progress bar counts them on rank 0 when the trainer
        shows progress bars.
        """
        blocks = require_ode_blocks(pl_module, type(self).__name__)
        settings = blocks[0].solver_settings()
        method = settings["method"]
        adaptive = SOLVERS[method].adaptive
        span = settings["t1"] - settings["t0"]
        if adaptive:
            step = self.base_step_size if self.base_step_size is not None else span / 10
        else:
            step = settings["step_size"]
        tol = settings["rtol"]
        combos: dict[tuple[str, float], dict[str, float]] = {}
        grid = self.grid(step, tol, quick=bool(trainer.fast_dev_run))  # type: ignore[attr-defined]  # Trainer sets it
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        progress = tqdm(
            total=len(grid) + 1,
            desc=f"SolverSwapCheck {stage}".rstrip(),
            unit="solver",
            leave=False,
            disable=not show,
            dynamic_ncols=True,
        )
        with progress, evaluation_pass(pl_module), restored_solvers(blocks):
            progress.set_postfix_str(f"{method} (training solver)")
            train_acc, train_nfe, _ = evaluate_batches(
                trainer, pl_module, blocks, self._batches(trainer, dataloaders, batch_limits), "SolverSwapCheck"
            )
            progress.update()
            for solver, factor, value in grid:
                progress.set_postfix_str(f"{solver} x{factor:g}")
                is_adaptive = SOLVERS[solver].adaptive
                configure_blocks(
                    blocks, solver, step_size=None if is_adaptive else value, tol=value if is_adaptive else None
                )
                acc, nfe, _ = evaluate_batches(
                    trainer, pl_module, blocks, self._batches(trainer, dataloaders, batch_limits), "SolverSwapCheck"
                )
                combos[(solver, factor)] = {"accuracy": acc, "nfe": nfe, "value": value}
                progress.update()
        drops = [train_acc - c["accuracy"] for c in combos.values() if not math.isnan(c["accuracy"])]
        return {
            "train_solver": method,
            "train_step_size": step,
            "train_tol": tol,
            "train_solver_acc": train_acc,
            "train_solver_nfe": train_nfe,
            "combinations": combos,
            "max_drop": max(drops) if drops else math.nan,
        }

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        dataloaders: Any,
        batch_limits: Sequence[float],
    ) -> None:
        if dataloaders is None:
            return
        result = self.measure(trainer, pl_module, dataloaders, stage, batch_limits)
        result["epoch"] = trainer.current_epoch
        self.results[stage] = result
        metrics = {f"solver_swap/{stage}/train_solver_acc": result["train_solver_acc"]}
        if not math.isnan(result["max_drop"]):
            metrics[f"solver_swap/{stage}/max_drop"] = result["max_drop"]
        for (solver, factor), combo in result["combinations"].items():
            if not math.isnan(combo["accuracy"]):
                metrics[f"solver_swap/{stage}/{solver}_x{factor:g}"] = combo["accuracy"]
        log_replicated(pl_module, metrics)
        if self.log_figure:
            add_figure(trainer, f"solver_swap/{stage}", lambda: self.figure(result))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The latest results per stage, so that they survive a resume."""
        return {"results": copy.deepcopy(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = copy.deepcopy(state_dict.get("results", {}))

    @staticmethod
    def figure(result: dict[str, Any]):
        """Matplotlib figure: accuracy against test step size (fixed-step) and against tolerance (adaptive)."""
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend and open figures alone

        figure = Figure(figsize=(9, 3.5))
        fixed_ax, adaptive_ax = figure.subplots(1, 2)
        by_solver: dict[str, list[tuple[float, float]]] = {}
        for (solver, _), combo in result["combinations"].items():
            by_solver.setdefault(solver, []).append((combo["value"], combo["accuracy"]))
        for solver, points in by_solver.items():
            ax = adaptive_ax if SOLVERS[solver].adaptive else fixed_ax
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=solver)
        train_x = result["train_tol"] if SOLVERS[result["train_solver"]].adaptive else result["train_step_size"]
        train_ax = adaptive_ax if SOLVERS[result["train_solver"]].adaptive else fixed_ax
        train_ax.scatter(
            [train_x],
            [result["train_solver_acc"]],
            marker="*",
            s=150,
            c="k",
            zorder=3,
            label=f"train ({result['train_solver']})",
        )
        for ax, label in ((fixed_ax, "test step size"), (adaptive_ax, "test tolerance (rtol = atol)")):
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
        figure.tight_layout()
        return figure
