"""Evaluation toolkit for models and callbacks that run or report on a model outside its training step.

It sits below both: it imports torch, torchmetrics, Lightning (for types, and one sampler class) and the package's
low-level modules (:mod:`~lightning_pdenets.protocols`, :mod:`~lightning_pdenets.solvers`,
:mod:`~lightning_pdenets.errors`, :mod:`~lightning_pdenets.interruption`), never a model or a callback. One module
per topic; every name is re-exported here:

* **passes** (:mod:`~lightning_pdenets.evaluation.passes`): :func:`evaluation_pass` runs the model in eval mode,
  marked as a callback's own pass (:func:`callback_pass`, never counted as the model's NFE), with autograd off or,
  for attacks, on for input gradients only, and restores all it changed; :func:`split_batch` reads
  ``(inputs, targets, ...)``, ``{"inputs": ..., "targets": ...}`` or bare inputs.
* **metrics** (:mod:`~lightning_pdenets.evaluation.metrics`): :func:`accuracy_metrics`, the top-1 (and top-5)
  collection that models and callbacks log, and :func:`compute_on_every_rank` for collections created on demand
  under DDP.
* **figures** (:mod:`~lightning_pdenets.evaluation.figures`): :func:`add_figure` and :func:`add_text` write to the
  loggers that show figures and text (TensorBoard), on rank 0 only.
* **pixels** (:mod:`~lightning_pdenets.evaluation.pixels`): :class:`PixelSpace`, :func:`normalization_of` and
  :func:`check_channel_stats` let attacks and perturbations work on [0, 1] pixels whatever normalization the
  inputs carry.
* **samples** (:mod:`~lightning_pdenets.evaluation.samples`): :func:`batch_positions` places the rows of an
  evaluation batch in the whole evaluation set (their global index, from the running loader of
  :func:`running_loader`), so that sample limits and random draws (:func:`derive_seed`) do not depend on the
  number of processes; it reads Lightning's distributed sampler, the one runtime use of Lightning here.
* **solver checks** (:mod:`~lightning_pdenets.evaluation.solver_checks`): :func:`require_ode_blocks`,
  :func:`configure_blocks`, :func:`configured_solvers`, :func:`restored_solvers` and :func:`evaluate_batches`
  act on blocks found through :class:`lightning_pdenets.protocols.ODESolverBlock` only; :func:`shrink_grow_keep`
  is the decision rule of the step-size and tolerance adaptation callbacks.
"""

from lightning_pdenets.evaluation.figures import add_figure, add_text
from lightning_pdenets.evaluation.metrics import accuracy_metrics, compute_on_every_rank
from lightning_pdenets.evaluation.passes import (
    callback_pass,
    eval_mode,
    evaluation_pass,
    frozen_parameters,
    in_callback_pass,
    split_batch,
)
from lightning_pdenets.evaluation.pixels import (
    PixelSpace,
    check_channel_stats,
    normalization_of,
)
from lightning_pdenets.evaluation.samples import (
    BatchPositions,
    batch_positions,
    derive_seed,
    running_loader,
    unknown_order_message,
)
from lightning_pdenets.evaluation.solver_checks import (
    SOLVER_FAILURES,
    configure_blocks,
    configured_solvers,
    evaluate_batches,
    require_ode_blocks,
    restored_solvers,
    shrink_grow_keep,
)

__all__ = [
    "SOLVER_FAILURES",
    "BatchPositions",
    "PixelSpace",
    "accuracy_metrics",
    "add_figure",
    "add_text",
    "batch_positions",
    "callback_pass",
    "check_channel_stats",
    "compute_on_every_rank",
    "configure_blocks",
    "configured_solvers",
    "derive_seed",
    "eval_mode",
    "evaluate_batches",
    "evaluation_pass",
    "frozen_parameters",
    "in_callback_pass",
    "normalization_of",
    "require_ode_blocks",
    "restored_solvers",
    "running_loader",
    "shrink_grow_keep",
    "split_batch",
    "unknown_order_message",
]
