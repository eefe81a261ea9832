"""Adapt the training solver of neural ODEs until a more accurate test solver agrees with it.

Ott, Katiyar, Hennig & Tiemann, "ResNet After All: Neural ODEs and Their Numerical Solution",
ICLR 2021, Section 4 ("step size adaptation" and "tolerance adaptation"). A neural ODE trained with
a coarse solver can come to depend on it (trajectory crossing, Lady Windermere's fan): with a more
accurate solver at test time its accuracy drops. Every ``interval`` training steps these callbacks
compare, on the current batch and under ``no_grad``, the accuracy of the training solver with that
of a more accurate test solver, and shrink the training step size (or tolerance) while they
disagree, and try to grow it while they agree.

ODE blocks are found through :class:`lightning_pdenets.protocols.ODESolverBlock` only, so the
callbacks work on any LightningModule whose network contains such blocks, provided that its
batches are ``(inputs, targets, ...)`` and ``pl_module(inputs)`` returns class logits. The
states y0 that Hairer's initial-step heuristic needs are captured with a forward pre-hook
(``nn.Module.register_forward_pre_hook``) on each block during one no-grad forward pass.

Under DDP every decision is collective: correct counts and NFE are all-reduced, and each new step
size or tolerance is broadcast from rank 0, so every rank keeps identical solver settings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import (
    configure_blocks,
    configured_solvers,
    evaluate_batches,
    evaluation_pass,
    require_ode_blocks,
    restored_solvers,
    shrink_grow_keep,
    split_batch,
)
from lightning_pdenets.metric_logging import log_occasional_step_values
from lightning_pdenets.protocols import ODEModule, find_ode_blocks
from lightning_pdenets.solvers import SOLVERS, check_solver_name
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = [
    "DEFAULT_TEST_SOLVERS",
    "StepSizeAdaptation",
    "ToleranceAdaptation",
    "hairer_initial_step",
    "step_for_test_solver",
]

DEFAULT_TEST_SOLVERS: dict[str, str] = {
    "euler": "midpoint",
    "midpoint": "rk4",
    "heun2": "rk4",
    "heun3": "rk4",
    "rk4": "rk4",
}
"""The test solver paired with each fixed-step training solver (Ott et al.: Euler → midpoint, midpoint → RK4)."""

RETRY_SETTINGS = ("failure_retries", "failure_tol_factor", "failure_max_tol")
"""The solver settings through which ToleranceAdaptation lets the blocks retry a failed solve (SolverConfig's)."""


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.pow(2).mean().sqrt())


def hairer_initial_step(vector_field: Any, t0: float, y0: torch.Tensor, order: int) -> float:
    """Initial step size by Hairer's heuristic (Hairer, Nørsett & Wanner, *Solving ODEs I*, 2nd ed., p. 169).

    d0 = ‖y0‖, d1 = ‖f(t0, y0)‖; h0 = 0.01·d0/d1, or 1e-6 if either is below 1e-5;
    d2 = ‖f(t0 + h0, y0 + h0·f0) − f0‖ / h0; h1 = (0.01 / max(d1, d2))^(1/(p+1)),
    or max(1e-6, 1e-3·h0) if max(d1, d2) ≤ 1e-15; return min(100·h0, h1).

    ‖·‖ is the root-mean-square norm over all entries (Hairer's norm with unit scale, as fixed-step
    solvers have no tolerances to scale by).

    Args:
        vector_field: Callable f(t, y).
        t0: Start time.
        y0: Initial state (a whole batch).
        order: Order p of the solver.
    """
    t = torch.as_tensor(t0, dtype=y0.dtype, device=y0.device)
    f0 = vector_field(t, y0)
    d0, d1 = _rms(y0), _rms(f0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = vector_field(t + h0, y0 + h0 * f0)
    d2 = _rms(f1 - f0) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def step_for_test_solver(step_size: float, train_order: int, test_order: int, error_ratio: float = 50.0) -> float:
    """Step of the test solver whose global error ~h^q is ``error_ratio`` times below the training solver's ~h^p.

    h_test = (h^p / error_ratio)^(1/q), never above h: Euler at h → midpoint at sqrt(h/50).
    """
    return min(step_size, (step_size**train_order / error_ratio) ** (1.0 / test_order))


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"`threshold` must be an accuracy difference in (0, 1], got {threshold!r}.")


def _check_factor(value: Any, argument: str, low: float, high: float) -> None:
    check_positive(value, argument)
    if not low < value < high:
        raise ValueError(f"`{argument}` must lie in ({low}, {high}), got {value!r}.")


class _SolverAdaptation(Callback):
    """Shared loop of :class:`StepSizeAdaptation` and :class:`ToleranceAdaptation`.

    Subclasses define the adapted quantity (``value``): how to apply it, its initial value, how the two solvers
    are compared at a value (:meth:`_compare`), and the shrunk and grown values; :meth:`check` decides with
    :func:`~lightning_pdenets.evaluation.shrink_grow_keep`.
    """

    quantity = "value"
    needs_adaptive: bool = False

    def __init__(self, interval: int, threshold: float, train_solver: str | None, test_solver: str | None) -> None:
        super().__init__()
        check_positive_int(interval, "interval")
        _check_threshold(threshold)
        self.interval = interval
        self.threshold = float(threshold)
        # None until setup() takes them from the model's blocks; every check runs after that
        self.train_solver: str = train_solver  # type: ignore[assignment]
        self.test_solver: str = test_solver  # type: ignore[assignment]
        if train_solver is not None:
            self.test_solver = self._check_solver_pair(train_solver, test_solver)
        elif test_solver is not None:
            self._check_test_solver_kind(test_solver)
        self.value: float | None = None
        self.history: list[dict[str, Any]] = []
        self._last_checked_step = -1

    # -- validation -------------------------------------------------------------------------
    def _default_test_solver(self, train_solver: str) -> str:
        raise NotImplementedError

    def _check_solver_pair(self, train_solver: str, test_solver: str | None) -> str:
        name = type(self).__name__
        train_info = check_solver_name(train_solver, "train_solver")
        kind = "adaptive" if self.needs_adaptive else "fixed-step"
        if train_info.adaptive != self.needs_adaptive:
            allowed = sorted(n for n, i in SOLVERS.items() if i.adaptive == self.needs_adaptive)
            raise ValueError(
                f"{name} adapts {kind} solvers: `train_solver` must be one of {allowed}, got {train_solver!r}."
            )
        test_solver = test_solver if test_solver is not None else self._default_test_solver(train_solver)
        test_info = self._check_test_solver_kind(test_solver)
        if test_info.order < train_info.order:
            raise ValueError(
                f"`test_solver` {test_solver!r} (order {test_info.order}) is less accurate than `train_solver` "
                f"{train_solver!r} (order {train_info.order}); choose a test solver of order >= {train_info.order}."
            )
        return test_solver

    def _check_test_solver_kind(self, test_solver: str) -> Any:
        test_info = check_solver_name(test_solver, "test_solver")
        if self.needs_adaptive and not test_info.adaptive:
            raise ValueError(
                f"{type(self).__name__} needs an adaptive `test_solver` (its tolerance is tightened), "
                f"got {test_solver!r}."
            )
        return test_info

    # -- resolution at fit time ---------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> list[ODEModule]:
        """The model's ODE blocks and the solver pair; a model that does not suit the callback (no ODE block, a
        solver of the other kind) is a :class:`ConfigurationError`, a short message with exit code 2 in the CLI,
        raised alike on every DDP rank (they hold the same model)."""
        try:
            blocks = require_ode_blocks(pl_module, type(self).__name__)
            if self.train_solver is None:
                self.train_solver = blocks[0].solver_settings()["method"]
            self.test_solver = self._check_solver_pair(self.train_solver, self.test_solver)
        except ConfigurationError:
            raise
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
        return blocks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolve(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = self._resolve(pl_module)
        if self.value is not None:  # resumed: the checkpointed value wins over the configured one
            self.apply(blocks, self.value)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.value is not None:
            return
        blocks = find_ode_blocks(pl_module)
        value = self.initial_value(trainer, pl_module, blocks, batch)
        self.value = self._broadcast(trainer, pl_module, value)
        self.apply(blocks, self.value)
        self.history.append({"step": trainer.global_step, self.quantity: self.value, "decision": "initial"})

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_checked_step or step % self.interval != 0 or step == 0:
            return
        self._last_checked_step = step
        blocks = find_ode_blocks(pl_module)
        with evaluation_pass(pl_module), restored_solvers(blocks):
            record = self.check(trainer, pl_module, blocks, batch)
        record[self.quantity] = self._broadcast(trainer, pl_module, record[self.quantity])
        self.value = record[self.quantity]
        self.apply(blocks, self.value)
        record["step"] = step
        self.history.append(record)
        metrics = {f"solver/{self.quantity}": self.value}
        for key in ("acc_train_solver", "acc_test_solver", "nfe_train_solver", "nfe_test_solver"):
            if key in record and not math.isnan(record[key]):
                metrics[f"solver/{key}"] = record[key]
        log_occasional_step_values(pl_module, metrics)

    # -- collective helpers ---------------------------------------------------------------------
    @staticmethod
    def _broadcast(trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> float:
        return float(trainer.strategy.broadcast(torch.tensor(float(value), dtype=torch.float64), src=0))

    def _accuracy(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        blocks: Sequence[ODEModule],
        batch: Any,
        method: str,
        step_size: float | None = None,
        tol: float | None = None,
    ) -> tuple[float, float, bool]:
        configure_blocks(blocks, method, step_size=step_size, tol=tol)
        return evaluate_batches(trainer, pl_module, blocks, iter([batch]), type(self).__name__)

    # -- the check ------------------------------------------------------------------------------
    def _agree(self, record: dict[str, Any] | None) -> bool:
        return record is not None and abs(record["acc_test_solver"] - record["acc_train_solver"]) <= self.threshold

    def check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, blocks: Sequence[ODEModule], batch: Any
    ) -> dict[str, Any]:
        """Compare the solvers at the current value on ``batch`` and decide: the record of the check.

        Shrink while they disagree; else grow if they still agree at the grown value; else keep.
        """
        value = float(cast(float, self.value))  # on_fit_start set it
        compare = functools.partial(self._compare, trainer, pl_module, blocks, batch)
        record = compare(value)
        if record is None:
            return self._failed_check(value)
        self._observe(record)
        grown = self._grown(blocks, value)
        decision = shrink_grow_keep(
            self._agree(record), value, grown, lambda candidate: self._agree(compare(candidate))
        )
        new_value = {"grow": grown, "keep": value}.get(decision)
        record.update(
            decision=decision, **{self.quantity: self._shrunk(blocks, value) if new_value is None else new_value}
        )
        return record

    # -- subclass API ---------------------------------------------------------------------------
    def initial_value(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, blocks: Sequence[ODEModule], batch: Any
    ) -> float:
        raise NotImplementedError

    def apply(self, blocks: Sequence[ODEModule], value: float) -> None:
        raise NotImplementedError

    def _compare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, blocks: Sequence[ODEModule], batch: Any, value: float
    ) -> dict[str, Any] | None:
        """Accuracies and NFE of the training and test solvers at ``value``; ``None`` when a solver failed."""
        raise NotImplementedError

    def _shrunk(self, blocks: Sequence[ODEModule], value: float) -> float:
        return value * 0.5

    def _grown(self, blocks: Sequence[ODEModule], value: float) -> float:
        """The value tried when the solvers agree; ``value`` itself when growing is not allowed."""
        raise NotImplementedError

    def _observe(self, record: dict[str, Any]) -> None:
        """Note a successful comparison before the decision."""

    def _failed_check(self, value: float) -> dict[str, Any]:
        raise RuntimeError(f"{type(self).__name__}: a solver failed during the check at {self.quantity}={value:g}.")

    # -- checkpointing --------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {self.quantity: self.value, "history": list(self.history), "train_solver": self.train_solver}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = state_dict[self.quantity]
        self.history = list(state_dict["history"])
        if state_dict.get("train_solver") is not None:
            self.train_solver = state_dict["train_solver"]


class StepSizeAdaptation(_SolverAdaptation):
    """Adapt the step size of a fixed-step training solver (Ott et al. 2021, ICLR, Section 4).

    The initial step comes from Hairer's heuristic (:func:`hairer_initial_step`) on the first batch,
    unless ``initial_step_size`` is a number. Every ``interval`` training steps, on the current batch:
    if |acc_test − acc_train| > ``threshold`` the step is halved (never below (t1 − t0)/``max_num_steps``,
    with a warning when that bound binds); otherwise h' = min(1.1·h, ``max_step_size``) is tried and
    kept only if the two accuracies still agree at h'. The test solver runs at
    :func:`step_for_test_solver` (error about ``error_ratio`` times smaller).

    Args:
        interval: Training steps between checks.
        threshold: Largest accepted accuracy difference, in (0, 1].
        train_solver: Fixed-step solver to train with (default: the blocks' current method).
        test_solver: More accurate solver for the check (default: Euler → midpoint, midpoint → RK4, else RK4).
        initial_step_size: ``"hairer"`` or a step size.
        max_num_steps: Upper bound on the number of training steps over [t0, t1].
        max_step_size: Largest step (default: t1 − t0, a single step).
        error_ratio: How much smaller the test solver's error should be.

    Logged at every check: ``solver/step_size``, ``solver/acc_train_solver``, ``solver/acc_test_solver``.
    """

    quantity = "step_size"
    needs_adaptive = False

    def __init__(
        self,
        interval: int = 50,
        threshold: float = 0.1,
        train_solver: str | None = None,
        test_solver: str | None = None,
        initial_step_size: str | float = "hairer",
        max_num_steps: int = 500,
        max_step_size: float | None = None,
        error_ratio: float = 50.0,
    ) -> None:
        super().__init__(interval, threshold, train_solver, test_solver)
        if isinstance(initial_step_size, str) and initial_step_size != "hairer":
            raise ValueError(f"`initial_step_size` must be 'hairer' or a number > 0, got {initial_step_size!r}.")
        if initial_step_size != "hairer":
            check_positive(initial_step_size, "initial_step_size")
        check_positive_int(max_num_steps, "max_num_steps")
        check_positive(max_step_size, "max_step_size", allow_none=True)
        check_positive(error_ratio, "error_ratio")
        self.initial_step_size = initial_step_size
        self.max_num_steps = max_num_steps
        self.max_step_size = max_step_size
        self.error_ratio = float(error_ratio)

    def _default_test_solver(self, train_solver: str) -> str:
        return DEFAULT_TEST_SOLVERS.get(train_solver, "rk4")

    def _bounds(self, blocks: Sequence[ODEModule]) -> tuple[float, float]:
        span = max(b.solver_settings()["t1"] - b.solver_settings()["t0"] for b in blocks)
        upper = self.max_step_size if self.max_step_size is not None else span
        return span / self.max_num_steps, upper

    def _clamp(self, blocks: Sequence[ODEModule], step: float) -> float:
        lower, upper = self._bounds(blocks)
        return min(max(step, lower), upper)

    def initial_value(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, blocks: Sequence[ODEModule], batch: Any
    ) -> float:
        if self.initial_step_size != "hairer":
            return self._clamp(blocks, float(self.initial_step_size))
        inputs, _ = split_batch(batch, type(self).__name__)
        initial_states: dict[nn.Module, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple) -> None:
            initial_states.setdefault(module, args[0].detach())

        # Forward pre-hooks (standard nn.Module API) see each block's input y0 without knowing the block's class.
        handles = [b.register_forward_pre_hook(capture) for b in blocks]
        try:
            with evaluation_pass(pl_module):
                pl_module(inputs)
                order = SOLVERS[self.train_solver].order
                steps = [
                    hairer_initial_step(b.vector_field, b.solver_settings()["t0"], initial_states[b], order)
                    for b in blocks
                    if b in initial_states
                ]
        finally:
            for handle in handles:
                handle.remove()
        if not steps:
            raise RuntimeError("StepSizeAdaptation: no ODE block was called in the forward pass; cannot pick h0.")
        local = torch.tensor(min(steps), dtype=torch.float64, device=pl_module.device)
        smallest = float(trainer.strategy.all_gather(local).min())  # the most cautious rank decides
        return self._clamp(blocks, smallest)

    def apply(self, blocks: Sequence[ODEModule], value: float) -> None:
        configure_blocks(blocks, self.train_solver, step_size=value)

    def _compare(self, trainer, pl_module, blocks, batch, step: float) -> dict[str, float]:
        test_order, train_order = SOLVERS[self.test_solver].order, SOLVERS[self.train_solver].order
        test_step = step_for_test_solver(step, train_order, test_order, self.error_ratio)
        acc_train, nfe_train, _ = self._accuracy(trainer, pl_module, blocks, batch, self.train_solver, step_size=step)
        acc_test, nfe_test, _ = self._accuracy(trainer, pl_module, blocks, batch, self.test_solver, step_size=test_step)
        return dict(
            acc_train_solver=acc_train,
            acc_test_solver=acc_test,
            nfe_train_solver=nfe_train,
            nfe_test_solver=nfe_test,
            test_step_size=test_step,
        )

    def _shrunk(self, blocks: Sequence[ODEModule], step: float) -> float:
        lower, _ = self._bounds(blocks)
        if step * 0.5 >= lower * (1 - 1e-9):
            return step * 0.5
        rank_zero_warn(
            f"StepSizeAdaptation: the training and test solvers still disagree, but halving h={step:.4g} "
            f"would exceed max_num_steps={self.max_num_steps}; h stays at {lower:.4g}. Raise max_num_steps "
            f"or the threshold."
        )
        return lower

    def _grown(self, blocks: Sequence[ODEModule], step: float) -> float:
        return min(step * 1.1, self._bounds(blocks)[1])


class ToleranceAdaptation(_SolverAdaptation):
    """Adapt rtol = atol of an adaptive training solver (Ott et al. 2021, ICLR, Section 4).

    Every ``interval`` training steps, on the current batch, the training solver is compared with
    ``test_solver`` at a tighter tolerance (``tol·test_tol_factor``, tightened further until its
    forward NFE exceeds the training solver's). If the accuracies differ by more than ``threshold``,
    tol ← tol·0.5; otherwise tol·1.1 is tried and reverted if the accuracies disagree at it, or if
    the training solver's forward NFE has not changed over the last ``nfe_patience`` checks.

    Solver failures ("underflow in dt", "max_num_steps exceeded") in a forward pass during ``fit`` are
    retried by the blocks themselves: while the callback is active it sets their solver configuration's
    ``failure_retries = max_backoffs``, ``failure_tol_factor = backoff_factor`` and ``failure_max_tol = max_tol``
    (:class:`~lightning_pdenets.solvers.SolverConfig`), so a block loosens its tolerance by ``backoff_factor``
    (capped at ``max_tol``) and solves again. After each training step (and validation) the callback reads
    the blocks' settings, records every back-off in :attr:`history` with a warning, and makes all blocks, on
    every rank, adopt the loosest tolerance. A failure in the backward pass (adjoint) cannot be retried and
    stops training; inside a check a failure is a result, not retried. The blocks' own retry settings are
    restored when ``fit`` ends, and checkpoints written during ``fit`` hold them too (the callback's apply only
    while it is active: a model loaded from such a checkpoint for testing does not retry). Blocks whose
    ``solver_settings()`` have no ``failure_retries`` cannot back off (a warning says so).

    Args:
        interval: Training steps between checks.
        threshold: Largest accepted accuracy difference, in (0, 1].
        train_solver: Adaptive solver to train with (default: the blocks' current method).
        test_solver: Adaptive solver for the check (default ``dopri5``).
        initial_tol: Starting rtol = atol.
        test_tol_factor: Factor in (0, 1) applied to tol for the test solver, and per tightening.
        max_tightenings: Tightenings of the test tolerance per check.
        max_tol: Largest tolerance.
        nfe_patience: Checks with unchanged NFE after which a tolerance increase is reverted.
        backoff_factor: Factor > 1 loosening tol after a solver failure.
        max_backoffs: Consecutive back-offs in one forward pass before the failure is raised.

    Logged at every check: ``solver/tol``, ``solver/acc_train_solver``, ``solver/acc_test_solver``, NFE.
    """

    quantity = "tol"
    needs_adaptive = True

    def __init__(
        self,
        interval: int = 50,
        threshold: float = 0.1,
        train_solver: str | None = None,
        test_solver: str | None = "dopri5",
        initial_tol: float = 1e-6,
        test_tol_factor: float = 0.1,
        max_tightenings: int = 3,
        max_tol: float = 1.0,
        nfe_patience: int = 5,
        backoff_factor: float = 2.0,
        max_backoffs: int = 10,
    ) -> None:
        super().__init__(interval, threshold, train_solver, test_solver)
        check_positive(initial_tol, "initial_tol")
        _check_factor(test_tol_factor, "test_tol_factor", 0.0, 1.0)
        check_positive(max_tol, "max_tol")
        _check_factor(backoff_factor, "backoff_factor", 1.0, math.inf)
        for name, value in (
            ("max_tightenings", max_tightenings),
            ("nfe_patience", nfe_patience),
            ("max_backoffs", max_backoffs),
        ):
            check_positive_int(value, name)
        self.initial_tol = float(initial_tol)
        self.test_tol_factor = float(test_tol_factor)
        self.max_tightenings = max_tightenings
        self.max_tol = float(max_tol)
        self.nfe_patience = nfe_patience
        self.backoff_factor = float(backoff_factor)
        self.max_backoffs = max_backoffs
        self.nfe_history: list[float] = []
        self._blocks_retry_settings: list[dict[str, Any]] | None = None

    def _default_test_solver(self, train_solver: str) -> str:
        return "dopri5"

    def initial_value(self, trainer, pl_module, blocks, batch) -> float:
        return min(self.initial_tol, self.max_tol)

    def apply(self, blocks: Sequence[ODEModule], value: float) -> None:
        configure_blocks(blocks, self.train_solver, tol=value)

    # -- back-off on solver failure: the blocks retry (SolverConfig.failure_*), the callback keeps account ---------
    @staticmethod
    def _retrying_blocks(blocks: Sequence[ODEModule]) -> list[ODEModule]:
        return [block for block in blocks if set(RETRY_SETTINGS) <= set(block.solver_settings())]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        blocks = find_ode_blocks(pl_module)
        retrying = self._retrying_blocks(blocks)
        if len(retrying) < len(blocks):
            names = sorted({type(block).__name__ for block in blocks if block not in retrying})
            rank_zero_warn(
                f"ToleranceAdaptation cannot back off on solver failures in {names}: their solver_settings() have no "
                f"{list(RETRY_SETTINGS)}, so a failed solve stops training. Give the blocks these settings "
                f"(see lightning_pdenets.solvers.SolverConfig) to retry at a looser tolerance."
            )
        if self._blocks_retry_settings is None:  # resumed runs keep the blocks' settings from before the callback
            self._blocks_retry_settings = [
                {k: block.solver_settings()[k] for k in RETRY_SETTINGS} for block in retrying
            ]
        for block in retrying:
            block.configure_solver(
                failure_retries=self.max_backoffs, failure_tol_factor=self.backoff_factor, failure_max_tol=self.max_tol
            )

    def _restore_retry_settings(self, pl_module: pl.LightningModule) -> None:
        if self._blocks_retry_settings is None:
            return
        for block, settings in zip(self._retrying_blocks(find_ode_blocks(pl_module)), self._blocks_retry_settings):
            block.configure_solver(**settings)
        self._blocks_retry_settings = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_retry_settings(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_retry_settings(pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store each block's state with its own retry settings, not the callback's."""
        state = checkpoint.get("state_dict")
        if self._blocks_retry_settings is None or state is None:
            return
        names = {id(module): name for name, module in pl_module.named_modules()}
        for block, settings in zip(self._retrying_blocks(find_ode_blocks(pl_module)), self._blocks_retry_settings):
            key = f"{names[id(block)]}._extra_state"
            if key in state and hasattr(block, "get_extra_state"):
                with configured_solvers([block], **settings):
                    state[key] = block.get_extra_state()

    def _adopt_backoffs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the blocks' back-offs since the last call; every block on every rank takes the loosest tolerance."""
        if self.value is None:
            return
        blocks = find_ode_blocks(pl_module)
        loosest = max(float(block.solver_settings()["rtol"]) for block in blocks)
        backed_off = loosest > self.value * (1 + 1e-9)
        if not trainer.strategy.reduce_boolean_decision(backed_off, all=False):
            return
        local = torch.tensor(max(loosest, self.value), dtype=torch.float64, device=pl_module.device)
        loosest = float(trainer.strategy.all_gather(local).max())
        tol = self.value
        while tol < loosest * (1 - 1e-9):  # one record per retry: tol·factor, capped at max_tol
            loosened = min(tol * self.backoff_factor, self.max_tol, loosest)
            self.history.append({"step": trainer.global_step, "decision": "backoff", self.quantity: loosened})
            rank_zero_warn(
                f"ToleranceAdaptation: the ODE solver failed; loosening tol {tol:.3g} -> {loosened:.3g} and retrying.",
                category=RuntimeWarning,
            )
            tol = loosened
        self.value = loosest
        self.apply(blocks, self.value)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._adopt_backoffs(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._blocks_retry_settings is not None and not trainer.sanity_checking:  # validation inside fit
            self._adopt_backoffs(trainer, pl_module)

    # -- the check --------------------------------------------------------------------------------
    def check(self, trainer, pl_module, blocks, batch) -> dict[str, Any]:
        # inside a check a failure is a result, not something to retry
        with configured_solvers(self._retrying_blocks(blocks), failure_retries=0):
            return super().check(trainer, pl_module, blocks, batch)

    def _compare(self, trainer, pl_module, blocks, batch, tol: float) -> dict[str, float] | None:
        acc_train, nfe_train, failed = self._accuracy(trainer, pl_module, blocks, batch, self.train_solver, tol=tol)
        if failed:
            return None
        test_tol = tol * self.test_tol_factor
        acc_test = nfe_test = math.nan
        for _ in range(self.max_tightenings):
            acc, nfe, failed = self._accuracy(trainer, pl_module, blocks, batch, self.test_solver, tol=test_tol)
            if failed:  # the test solver cannot go tighter: use the last tolerance that worked
                break
            acc_test, nfe_test, used_tol = acc, nfe, test_tol
            if nfe > nfe_train:
                break
            test_tol *= self.test_tol_factor
        if math.isnan(acc_test):
            return None
        return dict(
            acc_train_solver=acc_train,
            acc_test_solver=acc_test,
            nfe_train_solver=nfe_train,
            nfe_test_solver=nfe_test,
            test_tol=used_tol,
        )

    def _observe(self, record: dict[str, Any]) -> None:
        self.nfe_history = [*self.nfe_history, record["nfe_train_solver"]][-self.nfe_patience :]

    def _grown(self, blocks: Sequence[ODEModule], tol: float) -> float:
        stalled = len(self.nfe_history) >= self.nfe_patience and len(set(self.nfe_history)) == 1
        return tol if stalled else min(tol * 1.1, self.max_tol)

    def _failed_check(self, tol: float) -> dict[str, Any]:
        new_tol = min(tol * self.backoff_factor, self.max_tol)
        rank_zero_warn(
            f"ToleranceAdaptation: a solver failed during the check; loosening tol {tol:.3g} -> {new_tol:.3g}."
        )
        return {"decision": "backoff", self.quantity: new_tol}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "nfe_history": list(self.nfe_history),
            "blocks_retry_settings": self._blocks_retry_settings,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.nfe_history = list(state_dict.get("nfe_history", []))
        self._blocks_retry_settings = state_dict.get("blocks_retry_settings")
