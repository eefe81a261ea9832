"""Solver checks on blocks found through :class:`lightning_pdenets.protocols.ODESolverBlock` only.

Set, change and restore the solvers of a model's ODE blocks, evaluate the model with them, and decide the next
step size or tolerance of Ott et al.'s adaptation (:func:`shrink_grow_keep`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.evaluation.passes import split_batch
from lightning_pdenets.interruption import raise_if_stop_requested
from lightning_pdenets.protocols import ODEModule, find_ode_blocks
from lightning_pdenets.solvers import SOLVERS, fixed_step_count

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "SOLVER_FAILURES",
    "configure_blocks",
    "configured_solvers",
    "evaluate_batches",
    "require_ode_blocks",
    "restored_solvers",
    "shrink_grow_keep",
]

SOLVER_FAILURES = (SolverFailedError, AssertionError, RuntimeError)
"""Exception types a solver failure can take (torchdiffeq asserts on "underflow in dt"); :func:`is_solver_failure`."""


def require_ode_blocks(module: nn.Module, owner: str) -> list[ODEModule]:
    """The ODE blocks of ``module``, or a ``ValueError`` explaining the protocol when there are none."""
    blocks = find_ode_blocks(module)
    if not blocks:
        raise ValueError(
            f"{owner} found no ODE block in {type(module).__name__}: a block must provide vector_field(t, y), "
            f"solver_settings(), configure_solver(**changes), nfe_forward and nfe_backward "
            f"(see lightning_pdenets.protocols.ODESolverBlock)."
        )
    return blocks


def _with_room_for_steps(settings: Mapping[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` plus a ``max_num_steps`` raised to what a new fixed ``step_size`` needs over [t0, t1]."""
    if changes.get("step_size") is not None and "max_num_steps" not in changes:
        steps = fixed_step_count(settings["t0"], settings["t1"], changes["step_size"])
        changes["max_num_steps"] = max(int(settings["max_num_steps"]), steps)
    return changes


def configure_blocks(
    blocks: Sequence[ODEModule], method: str, step_size: float | None = None, tol: float | None = None
) -> None:
    """Set ``method`` and its step size (fixed-step) or rtol = atol = ``tol`` (adaptive) on every block.

    ``max_num_steps`` is raised where a fixed step needs more steps than the block allows.
    """
    for block in blocks:
        changes: dict[str, Any] = {"method": method}
        if step_size is not None:
            changes["step_size"] = float(step_size)
        if tol is not None:
            changes.update(rtol=float(tol), atol=float(tol))
        block.configure_solver(**_with_room_for_steps(block.solver_settings(), changes))


@contextlib.contextmanager
def restored_solvers(
    blocks: Sequence[ODEModule], keys: Sequence[str] = ("method", "step_size", "rtol", "atol", "max_num_steps")
) -> Iterator[None]:
    """Restore the settings ``keys`` of every block afterwards (default: method, step size, tolerances, step bound)."""
    saved = [{k: block.solver_settings()[k] for k in keys} for block in blocks]
    try:
        yield
    finally:
        for block, settings in zip(blocks, saved):
            block.configure_solver(**settings)


@contextlib.contextmanager
def configured_solvers(blocks: Sequence[ODEModule], **changes: Any) -> Iterator[None]:
    """Apply ``changes`` (:class:`~lightning_pdenets.solvers.SolverConfig` fields) to every block, then restore exactly.

    A fixed ``step_size`` raises ``max_num_steps`` where needed. Every setting changed is put back as
    ``solver_settings()`` reported it before, also when the block rejects the changes (``ValueError``).
    """
    originals = [block.solver_settings() for block in blocks]
    applied: list[tuple[ODEModule, dict[str, Any]]] = []
    try:
        for block, settings in zip(blocks, originals):
            block_changes = _with_room_for_steps(settings, dict(changes))
            applied.append((block, {k: settings[k] for k in block_changes if k in settings}))
            block.configure_solver(**block_changes)
        yield
    finally:
        for block, restore in applied:
            block.configure_solver(**restore)


def evaluate_batches(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    blocks: Sequence[ODEModule],
    batches: Iterator[Any],
    owner: str = "a solver check",
) -> tuple[float, float, bool]:
    """Accuracy and mean forward NFE per batch over ``batches``, all-reduced over ranks.

    A solver failure on any rank makes ``failed`` True on every rank (its accuracy is then NaN). SIGTERM stops
    the pass before the next batch with :class:`~lightning_pdenets.interruption.RunInterrupted`, naming
    ``owner`` and the solver being evaluated.
    """
    correct = total = nfe = 0.0
    num_batches = 0
    failed = False
    for batch in batches:
        raise_if_stop_requested(trainer, lambda: f"{owner} (evaluating with {_solver_text(blocks)})")
        inputs, targets = split_batch(batch, "the solver callbacks")
        before = sum(b.nfe_forward for b in blocks)
        try:
            logits = pl_module(inputs)
        except SOLVER_FAILURES as error:
            if not is_solver_failure(error):
                raise
            failed = True
            break
        nfe += sum(b.nfe_forward for b in blocks) - before
        correct += float((logits.argmax(dim=-1) == targets).sum())
        total += targets.numel()
        num_batches += 1
    stats = torch.tensor(
        [correct, total, nfe, float(num_batches), float(failed)], dtype=torch.float64, device=pl_module.device
    )
    stats = trainer.strategy.reduce(stats, reduce_op="sum")
    correct, total, nfe, batches_done, failures = (float(v) for v in stats)
    if failures > 0 or total == 0:
        return math.nan, nfe / max(batches_done, 1), True
    return correct / total, nfe / batches_done, False


def _solver_text(blocks: Sequence[ODEModule]) -> str:
    settings = blocks[0].solver_settings() if blocks else {}
    method = settings.get("method", "?")
    # an adaptive solver keeps the step_size of an earlier fixed-step setting (ignored), so ask the method
    adaptive = method not in SOLVERS or SOLVERS[method].adaptive
    detail = f"tol {settings.get('rtol', float('nan')):g}" if adaptive else f"step {settings['step_size']:g}"
    return f"{method}, {detail}"


def shrink_grow_keep(agree: bool, value: float, grown: float, agree_at: Callable[[float], bool]) -> str:
    """The decision of Ott et al.'s step-size and tolerance adaptation (ICLR 2021, Section 4).

    ``"shrink"`` while the training and test solvers disagree at ``value``; otherwise ``"grow"`` when the larger
    ``grown`` (> ``value``) still agrees (``agree_at(grown)``, evaluated only then), else ``"keep"``.
    """
    if not agree:
        return "shrink"
    if grown <= value:
        return "keep"
    return "grow" if agree_at(grown) else "keep"
