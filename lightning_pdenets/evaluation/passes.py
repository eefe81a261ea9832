"""A callback's own passes over the model, and the batches they read.

:func:`evaluation_pass` puts the model in eval mode, marks the pass as a callback's own (:func:`callback_pass`, so
:class:`~lightning_pdenets.callbacks.NFEMonitor` never counts its function evaluations, whatever the order of the
callbacks) and either turns autograd off or, for attacks, leaves it on for input gradients only; everything it
changes is restored. The blocks' NFE counters only ever increase; nothing is reset or restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal, overload

import torch
from torch import nn

__all__ = ["callback_pass", "eval_mode", "evaluation_pass", "frozen_parameters", "in_callback_pass", "split_batch"]

_depth = 0


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


@overload
def split_batch(batch: Any, owner: str = ..., need_targets: Literal[True] = ...) -> tuple[Any, torch.Tensor]: ...


@overload
def split_batch(batch: Any, owner: str = ..., *, need_targets: bool) -> tuple[Any, torch.Tensor | None]: ...


def split_batch(batch: Any, owner: str = "this callback", need_targets: bool = True) -> tuple[Any, torch.Tensor | None]:
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
