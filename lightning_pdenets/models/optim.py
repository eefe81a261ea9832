"""Optimizers and learning-rate schedules named by primitive hyperparameters.

Models store these names (not optimizer objects) with ``save_hyperparameters``, so a checkpoint
can be reloaded without pickled modules; every bad name lists the valid ones.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_pdenets.validation import check_positive

__all__ = ["OPTIMIZERS", "LR_SCHEDULERS", "build_optimizer", "build_scheduler", "check_optimization_settings"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
LR_SCHEDULERS = ("none", "cosine", "multistep")


def check_optimization_settings(
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    lr_scheduler: str,
    lr_milestones: Sequence[int],
    lr_gamma: float,
    prefix: str = "",
) -> None:
    """Raise ``ValueError`` naming the first invalid setting (``prefix`` is prepended to names)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`{prefix}optimizer` must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    check_positive(lr, f"{prefix}lr")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`{prefix}weight_decay` must be >= 0, got {weight_decay!r}.")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"`{prefix}momentum` must be in [0, 1), got {momentum!r}.")
    if lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`{prefix}lr_scheduler` must be one of {list(LR_SCHEDULERS)}, got {lr_scheduler!r}.")
    if lr_scheduler == "multistep" and (
        not lr_milestones or any(not isinstance(m, int) or m < 1 for m in lr_milestones)
    ):
        raise ValueError(
            f"`{prefix}lr_scheduler='multistep'` needs `{prefix}lr_milestones`, a list of epochs >= 1, got {lr_milestones!r}."
        )
    check_positive(lr_gamma, f"{prefix}lr_gamma")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], optimizer: str, lr: float, weight_decay: float, momentum: float
) -> Optimizer:
    """Instantiate the optimizer named ``optimizer`` (momentum applies to SGD and RMSprop only)."""
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if optimizer in ("sgd", "rmsprop"):
        kwargs["momentum"] = momentum
    return OPTIMIZERS[optimizer](params, **kwargs)


def build_scheduler(
    optimizer: Optimizer, lr_scheduler: str, lr_milestones: Sequence[int], lr_gamma: float, max_epochs: Optional[int]
) -> Optional[LRScheduler]:
    """Per-epoch scheduler named ``lr_scheduler``, or ``None`` for ``'none'``."""
    if lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs or 1))
    if lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_milestones), gamma=lr_gamma)
    return None
