"""Evaluation toolkit shared by the callbacks (private: its names may change between releases).

One place for what every callback that runs the model for its own purposes needs:

* **passes**: :func:`evaluation_pass` puts the model in eval mode, marks the pass as the callback's own
  (:func:`callback_pass`, so :class:`~lightning_pdenets.callbacks.NFEMonitor` never counts its function
  evaluations, whatever the order of the callbacks) and either turns autograd off or, for attacks, leaves it on
  for input gradients only; everything it changes is restored. The blocks' NFE counters only ever increase;
  nothing is reset or restored.
* **batches**: :func:`split_batch` reads ``(inputs, targets, ...)``, ``{"inputs": ..., "targets": ...}`` or bare inputs.
* **accuracy**: :func:`accuracy_metrics` builds the top-1 (and top-5) torchmetrics collection.
* **pixels**: :class:`PixelSpace`, :func:`normalization_of` and :func:`check_channel_stats` let attacks and
  perturbations work on [0, 1] pixels whatever normalization the inputs carry.
* **ODE solvers**: :func:`require_ode_blocks`, :func:`configure_blocks`, :func:`configured_solvers`,
  :func:`restored_solvers` and :func:`evaluate_batches` act on blocks found through
  :class:`lightning_pdenets.protocols.ODESolverBlock` only.
* **adaptation**: :func:`shrink_grow_keep`, the decision rule of the step-size and tolerance adaptation callbacks.
* **figures**: :func:`add_figure` adds a matplotlib figure to the loggers that take figures (TensorBoard).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_pdenets.errors import SolverFailedError, is_solver_failure
from lightning_pdenets.interruption import raise_if_stop_requested
from lightning_pdenets.protocols import find_ode_blocks

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = [
    "PixelSpace",
    "SOLVER_FAILURES",
    "accuracy_metrics",
    "add_figure",
    "callback_pass",
    "check_channel_stats",
    "configure_blocks",
    "configured_solvers",
    "eval_mode",
    "evaluate_batches",
    "evaluation_pass",
    "frozen_parameters",
    "in_callback_pass",
    "normalization_of",
    "require_ode_blocks",
    "restored_solvers",
    "shrink_grow_keep",
    "split_batch",
]

_depth = 0

SOLVER_FAILURES = (SolverFailedError, AssertionError, RuntimeError)
"""Exception types a solver failure can take (torchdiffeq asserts on "underflow in dt"); see :func:`is_solver_failure`."""


# -- passes ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def callback_pass() -> Iterator[None]:
    """Mark the forward and backward passes run inside as a callback's own, not the model's step."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_callback_pass() -> bool:
    """Whether a :func:`callback_pass` is in progress."""
    return _depth > 0


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no batch-norm statistic updates, no dropout); restores every submodule's ``training`` flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """No parameter takes a gradient inside; restores every ``requires_grad`` and ``.grad`` (the same tensors)."""
    saved = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    for p, _, _ in saved:
        p.grad = None
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


@contextlib.contextmanager
def evaluation_pass(module: nn.Module, input_gradients: bool = False) -> Iterator[None]:
    """A callback's own pass over ``module``: eval mode, never counted as the model's NFE, all state restored.

    Args:
        module: The model (usually the LightningModule).
        input_gradients: ``False``: autograd off (``no_grad``), for measurements. ``True``: autograd on, also
            inside Lightning's ``inference_mode`` evaluation loops, with the parameters frozen, so attacks get
            gradients with respect to their input while a training step in progress (or a user's accumulated
            ``.grad``) is never disturbed and no weight gradient is computed.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(module))
        stack.enter_context(callback_pass())
        if input_gradients:
            stack.enter_context(frozen_parameters(module))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
        else:
            stack.enter_context(torch.no_grad())
        yield


# -- batches and accuracy ------------------------------------------------------------------------------------------
def split_batch(batch: Any, owner: str = "this callback", need_targets: bool = True) -> tuple[Any, Optional[torch.Tensor]]:
    """``(inputs, targets)`` of a batch ``(inputs, targets, ...)``, ``{"inputs": ..., "targets": ...}`` or bare inputs.

    Args:
        batch: What the dataloader yields.
        owner: Name of the caller, for the error message.
        need_targets: Raise when the batch has no targets; otherwise ``targets`` is ``None`` then.

    Raises:
        TypeError: when ``need_targets`` and the batch has no targets.
    """
    if isinstance(batch, Mapping) and "inputs" in batch:
        inputs, targets = batch["inputs"], batch.get("targets")
    elif isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    else:
        inputs, targets = batch, None
    if need_targets and targets is None:
        raise TypeError(
            f"{owner} needs batches of the form (inputs, targets, ...) or {{'inputs': ..., 'targets': ...}}, "
            f"got {type(batch).__name__}; return targets from the dataloader or drop the callback."
        )
    return inputs, targets


def accuracy_metrics(num_classes: int, device: torch.device) -> MetricCollection:
    """Micro top-1 accuracy (``top1``) and, with more than 5 classes, top-5 accuracy (``top5``), on ``device``."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics).to(device)


def compute_on_every_rank(
    trainer: Optional["pl.Trainer"], metrics: dict[str, MetricCollection], device: torch.device,
) -> dict[str, dict[str, float]]:
    """Compute the accuracy collections of ``metrics`` with the same collectives, in the same order, on every rank.

    Callbacks create a collection on a rank's first batch of its kind, so a rank that attacked or perturbed
    fewer batches (fewer evaluation batches than ``num_batches``, or none) holds fewer collections than its
    peers, and skipping their ``compute()`` (a collective) would leave the peers waiting forever. Here the
    ranks first exchange which keys they updated and the number of classes (one gather, on every rank); then
    every rank creates the missing collections empty and computes all keys in sorted order.

    Args:
        trainer: The running trainer (``None``: a single process).
        metrics: Collections from :func:`accuracy_metrics`, by key; completed in place.
        device: Where to create missing collections.

    Returns:
        ``{key: {"top1": ..., "top5": ...}}`` for every key some rank updated, the same on every rank
        (empty when no rank updated any).
    """
    local = (next((int(c["top1"].num_classes) for c in metrics.values()), 0),
             sorted(key for key, collection in metrics.items() if collection["top1"].update_called))
    gathered = [local]
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)  # on every rank, whatever it holds
    num_classes = max(classes for classes, _ in gathered)
    results = {}
    for key in sorted({key for _, keys in gathered for key in keys}):
        collection = metrics.setdefault(key, accuracy_metrics(num_classes, device))
        with warnings.catch_warnings():  # an empty collection of this rank: its zeros join the others' sums
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            results[key] = {name: float(value) for name, value in collection.compute().items()}
    return results


def add_figure(trainer: "pl.Trainer", tag: str, make_figure: Callable[[], "Figure"]) -> None:
    """Add ``make_figure()`` under ``tag`` to every logger that takes figures (TensorBoard), on rank 0 only.

    The figure is built only when such a logger exists; build it with ``matplotlib.figure.Figure`` (not pyplot),
    which leaves the user's backend and open figures alone and works headless.
    """
    if not trainer.is_global_zero:
        return
    writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_figure")]
    if not writers:
        return
    figure = make_figure()
    for writer in writers:
        writer.add_figure(tag, figure, global_step=trainer.global_step)


# -- pixel space -----------------------------------------------------------------------------------------------------
def check_channel_stats(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
    """Raise ``ValueError`` unless ``mean`` and ``std`` are both ``None`` or per-channel lists with ``std > 0``."""
    if (mean is None) != (std is None):
        raise ValueError(f"give both `mean` and `std` or neither, got mean={mean!r}, std={std!r}.")
    if mean is None:
        return
    if len(mean) != len(std) or len(mean) == 0:
        raise ValueError(f"`mean` and `std` need one value per channel each, got mean={mean!r}, std={std!r}.")
    if any(not s > 0 for s in std):
        raise ValueError(f"`std` entries must be > 0, got {std!r}.")


def normalization_of(
    trainer: Optional["pl.Trainer"], mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """The per-channel (mean, std) the inputs were standardized with, or ``None`` for raw [0, 1] pixels.

    Explicit ``mean``/``std`` win; otherwise ``trainer.datamodule.mean`` / ``.std`` are used when the
    datamodule has them (every datamodule of :mod:`lightning_pdenets.data` does).
    """
    if mean is not None and std is not None:
        return tuple(map(float, mean)), tuple(map(float, std))
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dm_mean, dm_std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if dm_mean is None or dm_std is None:
        return None
    return tuple(map(float, dm_mean)), tuple(map(float, dm_std))


class PixelSpace(nn.Module):
    """``model((x - mean) / std)``: a classifier on standardized inputs seen as one on [0, 1] pixels.

    The wrapped model is referenced, not registered as a submodule, so that wrapping never moves,
    copies or re-registers its parameters.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def for_batch(
        cls, model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
        stats: Optional[tuple[Sequence[float], Sequence[float]]],
    ) -> "PixelSpace":
        """The pixel-space view of ``model`` for ``inputs`` normalized with ``stats`` (``None``: raw pixels)."""
        channels = inputs.shape[1]
        mean, std = stats if stats is not None else ((0.0,) * channels, (1.0,) * channels)
        if len(mean) != channels:
            raise ValueError(f"normalization has {len(mean)} channels but the batch has {channels}; fix `mean`/`std`.")
        return cls(model, mean, std, device=inputs.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std.to(x) + self.mean.to(x)).clamp(0.0, 1.0)

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.from_pixels(pixels))


# -- ODE solvers ----------------------------------------------------------------------------------------------------
def require_ode_blocks(module: nn.Module, owner: str) -> list[nn.Module]:
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
        steps = math.ceil((settings["t1"] - settings["t0"]) / changes["step_size"] - 1e-9)
        changes["max_num_steps"] = max(int(settings["max_num_steps"]), steps)
    return changes


def configure_blocks(blocks: Sequence[nn.Module], method: str, step_size: Optional[float] = None,
                     tol: Optional[float] = None) -> None:
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
def restored_solvers(blocks: Sequence[nn.Module],
                     keys: Sequence[str] = ("method", "step_size", "rtol", "atol", "max_num_steps")) -> Iterator[None]:
    """Restore the settings ``keys`` of every block afterwards (by default method, step size, tolerances, step bound)."""
    saved = [{k: block.solver_settings()[k] for k in keys} for block in blocks]
    try:
        yield
    finally:
        for block, settings in zip(blocks, saved):
            block.configure_solver(**settings)


@contextlib.contextmanager
def configured_solvers(blocks: Sequence[nn.Module], **changes: Any) -> Iterator[None]:
    """Apply ``changes`` (:class:`~lightning_pdenets.solvers.SolverConfig` fields) to every block, then restore exactly.

    A fixed ``step_size`` raises ``max_num_steps`` where needed. Every setting changed is put back as
    ``solver_settings()`` reported it before, also when the block rejects the changes (``ValueError``).
    """
    originals = [block.solver_settings() for block in blocks]
    applied: list[tuple[nn.Module, dict[str, Any]]] = []
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
    trainer: "pl.Trainer", pl_module: nn.Module, blocks: Sequence[nn.Module], batches: Iterator[Any],
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
    stats = torch.tensor([correct, total, nfe, float(num_batches), float(failed)], dtype=torch.float64,
                         device=pl_module.device)
    stats = trainer.strategy.reduce(stats, reduce_op="sum")
    correct, total, nfe, num_batches, failures = (float(v) for v in stats)
    if failures > 0 or total == 0:
        return math.nan, nfe / max(num_batches, 1), True
    return correct / total, nfe / num_batches, False


def _solver_text(blocks: Sequence[nn.Module]) -> str:
    settings = blocks[0].solver_settings() if blocks else {}
    method = settings.get("method", "?")
    detail = f"step {settings['step_size']:g}" if settings.get("step_size") else f"tol {settings.get('rtol', float('nan')):g}"
    return f"{method}, {detail}"


# -- adaptation ----------------------------------------------------------------------------------------------------
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
