"""Optimizers and learning-rate schedules named by primitive hyperparameters.

Models store these names (not optimizer objects) with ``save_hyperparameters``, so a checkpoint
can be reloaded without pickled modules; every bad name lists the valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from lightning_pdenets.blocks.lasso import soft_threshold
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.validation import check_non_negative, check_positive, check_setting_names

__all__ = [
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "SCHEDULER_INTERVALS",
    "OptimizerOptions",
    "ProximalSGD",
    "base_learning_rates",
    "build_optimizer",
    "build_schedule",
    "build_scheduler",
    "check_optimization_settings",
    "rescale_learning_rates",
    "resolve_optimizer_options",
]

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
LR_SCHEDULERS = ("none", "cosine", "multistep", "onecycle")
# When Lightning steps each schedule: per epoch, or per optimizer step (one-cycle spans the whole run).
SCHEDULER_INTERVALS = {"none": "epoch", "cosine": "epoch", "multistep": "epoch", "onecycle": "step"}


class OptimizerOptions(TypedDict, total=False):
    """One optimizer with its learning-rate schedule, as a dict of some of these settings (YAML and command line).

    Written ``theta: {optimizer: sgd, lr: 0.01}`` in YAML and ``--model.init_args.theta.lr 0.01`` on the
    command line; :func:`resolve_optimizer_options` merges it over a model's defaults and checks it.
    The settings mean what the same-named arguments of :class:`~lightning_pdenets.models.ClassifierModule` do.
    """

    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    lr_scheduler: str
    lr_milestones: list[int]
    lr_gamma: float


OPTIMIZATION_SETTINGS = tuple(OptimizerOptions.__annotations__)
"""The names of one optimizer's settings, in the order :func:`check_optimization_settings` takes them."""


def resolve_optimizer_options(
    options: Mapping[str, Any] | None,
    defaults: Mapping[str, Any],
    argument: str,
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
) -> dict[str, Any]:
    """The complete, checked settings of one optimizer: ``options`` (some :class:`OptimizerOptions`) over ``defaults``.

    Args:
        options: The given settings (``None``: the defaults alone).
        defaults: Every setting of :data:`OPTIMIZATION_SETTINGS`.
        argument: The hyperparameter's name, prefixed to each setting in error messages (``theta.lr``).
        optimizers: Allowed optimizer names.

    Raises:
        TypeError: when ``options`` is not a mapping.
        ValueError: on an unknown setting (with the closest valid names) or an invalid value.
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"`{argument}` must be a mapping of optimizer settings such as {{'optimizer': 'adam', 'lr': 0.001}}, "
            f"got {type(options).__name__}."
        )
    check_setting_names(options or {}, OPTIMIZATION_SETTINGS, argument)
    settings = {**defaults, **(options or {})}
    settings = {name: settings[name] for name in OPTIMIZATION_SETTINGS}
    if isinstance(settings["lr_milestones"], (list, tuple)):
        settings["lr_milestones"] = list(settings["lr_milestones"])  # a primitive list in checkpoints
    check_optimization_settings(**settings, prefix=f"{argument}.", optimizers=optimizers)
    return settings


def check_optimization_settings(
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    lr_scheduler: str,
    lr_milestones: Sequence[int],
    lr_gamma: float,
    prefix: str = "",
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
) -> None:
    """Raise ``ValueError`` naming the first invalid setting (``prefix`` prepended to names, ``optimizers`` allowed)."""
    if optimizer not in optimizers:
        raise ValueError(f"`{prefix}optimizer` must be one of {sorted(optimizers)}, got {optimizer!r}.")
    check_positive(lr, f"{prefix}lr")
    check_non_negative(weight_decay, f"{prefix}weight_decay")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"`{prefix}momentum` must be in [0, 1), got {momentum!r}.")
    if lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`{prefix}lr_scheduler` must be one of {list(LR_SCHEDULERS)}, got {lr_scheduler!r}.")
    if lr_scheduler == "multistep" and (
        not lr_milestones or any(not isinstance(m, int) or m < 1 for m in lr_milestones)
    ):
        raise ValueError(
            f"`{prefix}lr_scheduler='multistep'` needs `{prefix}lr_milestones`, a list of epochs >= 1, "
            f"got {lr_milestones!r}."
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


class ProximalSGD(torch.optim.Optimizer):
    """Proximal gradient (ISTA) step for an L1-penalized loss: gradient step, then soft threshold.

    ``p <- soft_threshold(p - lr * grad, lr * l1_weight)``, the standard update for
    ``smooth_loss(p) + l1_weight * |p|_1`` (Beck & Teboulle 2009). Unlike a subgradient step it
    lands exactly on zero for coefficients whose gradient cannot outweigh the penalty. Pass only
    the smooth loss's gradient: the penalty is applied by the step itself.

    ISTA converges only for ``lr <= 1 / L`` (L: Lipschitz constant of the smooth gradient). When L
    changes between steps, as for PR-Net's library of a network in training, set each group's
    ``"lipschitz_lr"`` to ``1 / L`` before :meth:`step`: the step then uses ``min(lr, lipschitz_lr)``. (Not
    ``"max_lr"``: torch's one-cycle schedule keeps its peak under that key.)

    Args:
        params: Parameters (typically ``GoverningEquation.alpha``).
        lr: Step size; converges for lr <= 1 / Lipschitz constant of the smooth gradient.
        l1_weight: Weight w of the L1 penalty.
        momentum: Heavy-ball momentum on the gradient step (0 gives plain ISTA).
    """

    def __init__(self, params, lr: float = 1e-2, l1_weight: float = 1e-4, momentum: float = 0.0) -> None:
        check_positive(lr, "lr")
        check_non_negative(l1_weight, "l1_weight")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        super().__init__(params, dict(lr=lr, l1_weight=l1_weight, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = min(group["lr"], group.get("lipschitz_lr", math.inf))
            weight, momentum = group["l1_weight"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if momentum > 0:
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    buffer = update.clone() if buffer is None else buffer.mul_(momentum).add_(update)
                    state["momentum_buffer"] = buffer
                    update = buffer
                param.copy_(soft_threshold(param - lr * update, lr * weight))
        return loss


def build_scheduler(
    optimizer: Optimizer,
    lr_scheduler: str,
    lr_milestones: Sequence[int],
    lr_gamma: float,
    max_epochs: int | None,
    total_steps: int | None = None,
) -> LRScheduler | None:
    """Scheduler named ``lr_scheduler`` (stepped as ``SCHEDULER_INTERVALS`` says), or ``None`` for ``'none'``.

    ``'onecycle'`` is Smith & Topin's one-cycle schedule ("Super-convergence", 2019) peaking at the
    optimizer's ``lr``; it needs ``total_steps``, the optimizer steps of the whole run. It cycles the momentum
    (SGD's and RMSprop's ``momentum``, Adam's beta1) inversely between 0.95 and 0.85, as the paper does, for
    optimizers that have one: an optimizer configured with ``momentum`` 0 (plain SGD, the ISTA step) keeps none.

    Raises:
        ConfigurationError: when ``'cosine'`` or ``'onecycle'`` gets a run without an end (``max_epochs=-1``).
    """
    if lr_scheduler == "onecycle":
        if total_steps is not None and not math.isfinite(total_steps):
            raise ConfigurationError(
                "`lr_scheduler='onecycle'` spans the whole run, but it has no end (trainer.max_epochs -1 and no "
                "trainer.max_steps). Set --trainer.max_epochs N or --trainer.max_steps N, or choose another "
                "lr_scheduler ('multistep' or 'none' run open-ended)."
            )
        if not total_steps or total_steps < 2:
            raise ValueError(
                f"`lr_scheduler='onecycle'` needs the run's number of optimizer steps (>= 2), got {total_steps!r}; "
                "set trainer.max_epochs or trainer.max_steps."
            )
        peak = [group["lr"] for group in optimizer.param_groups]
        with_momentum = all("betas" in group or group.get("momentum", 0) > 0 for group in optimizer.param_groups)
        return RunLengthOneCycleLR(optimizer, max_lr=peak, total_steps=int(total_steps), cycle_momentum=with_momentum)
    if lr_scheduler == "cosine":
        if max_epochs is not None and max_epochs < 1:
            meaning = "no limit" if max_epochs == -1 else "no epoch to train"
            raise ConfigurationError(
                f"`lr_scheduler='cosine'` anneals over trainer.max_epochs, but it is {max_epochs} ({meaning}). Set "
                f"--trainer.max_epochs N (N >= 1), or choose another lr_scheduler ('multistep' or 'none' run "
                f"open-ended)."
            )
        return RunLengthCosineAnnealingLR(optimizer, T_max=max(1, max_epochs or 1))
    if lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_milestones), gamma=lr_gamma)
    return None


class RunLengthCosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's cosine schedule over this run's ``max_epochs``, kept when a checkpoint's state is restored.

    A run resumed with another ``--trainer.max_epochs`` would otherwise keep the checkpoint's horizon: longer,
    its extra epochs would train at learning rate 0 and then rise again. The schedule continues as if it had
    been planned over the new horizon from the start, and says so.
    """

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        horizon = self.T_max
        super().load_state_dict(state_dict)
        restored, self.T_max = self.T_max, horizon
        if restored == horizon:
            return
        epoch = min(self.last_epoch, horizon)
        was = [group["lr"] for group in self.optimizer.param_groups]
        # the closed form: torch's recursive step would stay at 0 from a finished schedule
        rates = [
            self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * epoch / horizon)) / 2
            for base in self.base_lrs
        ]
        _set_rates(self, rates)
        rank_zero_info(
            f"lr_scheduler 'cosine': the checkpoint's schedule annealed over {restored} epochs, this run has "
            f"max_epochs {horizon}, so it now anneals over {horizon}: learning rate {_rates(rates)} at epoch {epoch} "
            f"(was {_rates(was)})."
        )


class RunLengthOneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's one-cycle schedule over this run's optimizer steps, kept when a checkpoint's state is restored.

    A run resumed with more epochs would otherwise fail after the checkpoint's last step (torch: "Tried to step
    N times"); the cycle is stretched over the new number of steps from the restored step on, and says so.
    """

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        total_steps, phases = self.total_steps, self._schedule_phases
        super().load_state_dict(state_dict)
        restored = self.total_steps
        self.total_steps, self._schedule_phases = total_steps, phases
        if restored == total_steps or self.last_epoch > total_steps:
            return  # nothing to stretch; a run already past its end trains no step
        was = [group["lr"] for group in self.optimizer.param_groups]
        with torch.optim.lr_scheduler._enable_get_lr_call(self):
            rates = self.get_lr()
        _set_rates(self, rates)
        rank_zero_info(
            f"lr_scheduler 'onecycle': the checkpoint's cycle spanned {restored} optimizer steps, this run has "
            f"{total_steps}, so the cycle is stretched over {total_steps}: learning rate {_rates(rates)} at step "
            f"{self.last_epoch} (was {_rates(was)})."
        )


def _set_rates(scheduler: LRScheduler, rates: list[Any]) -> None:  # floats (torch types base_lrs float | Tensor)
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = list(rates)


def _rates(rates: Sequence[Any]) -> str:
    return ", ".join(f"{float(rate):.3g}" for rate in rates)


def build_schedule(optimizer: Optimizer, settings: dict[str, Any], trainer: Any | None) -> dict[str, Any] | None:
    """Lightning's scheduler configuration (``scheduler``, ``interval``) of one optimizer's settings (``None``: none).

    Args:
        optimizer: The optimizer to schedule.
        settings: Its :data:`OPTIMIZATION_SETTINGS`.
        trainer: The attached trainer, whose run sets the horizons of ``cosine`` and ``onecycle`` (``None``: not
            attached).
    """
    max_epochs = trainer.max_epochs if trainer is not None else None
    per_step = settings["lr_scheduler"] == "onecycle" and trainer is not None
    total_steps = run_optimizer_steps(trainer) if per_step else None
    scheduler = build_scheduler(
        optimizer, settings["lr_scheduler"], settings["lr_milestones"], settings["lr_gamma"], max_epochs, total_steps
    )
    if scheduler is None:
        return None
    return {"scheduler": scheduler, "interval": SCHEDULER_INTERVALS[settings["lr_scheduler"]]}


def run_optimizer_steps(trainer: Any) -> int:
    """Optimizer steps of the whole run, the horizon of ``onecycle``; a ``fast_dev_run`` (one step) counts as two
    so that the schedule can be built and the smoke run goes through."""
    steps = trainer.estimated_stepping_batches
    return max(2, steps) if trainer.fast_dev_run else steps


# Per-group values a schedule derives its learning rate from; one factor scales a whole schedule.
_GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")


def base_learning_rates(optimizers: Sequence[Optimizer]) -> list[list[float]]:
    """Per optimizer and parameter group, the rate its schedule starts from (``initial_lr`` if a scheduler set one)."""
    return [[group.get("initial_lr", group["lr"]) for group in optimizer.param_groups] for optimizer in optimizers]


def rescale_learning_rates(
    optimizers: Sequence[Optimizer], schedulers: Sequence[LRScheduler], wanted: list[list[float]]
) -> list[str]:
    """Scale restored optimizers and schedulers so that each group's schedule starts from ``wanted``.

    A resumed run restores the learning rates of the checkpoint; a rate given for the resumed run
    (e.g. a lower one after a NaN) would otherwise be ignored. Each group's rates and its
    scheduler's base rates are multiplied by wanted / restored, which keeps the schedule's position
    (a cosine or one-cycle phase, the multistep decays so far).

    Returns:
        One line per changed group, for the log.
    """
    changes = []
    for index, (optimizer, rates) in enumerate(zip(optimizers, wanted)):
        for group_index, (group, rate) in enumerate(zip(optimizer.param_groups, rates)):
            restored = group.get("initial_lr", group["lr"])
            if restored == rate or not restored:
                continue
            factor = rate / restored
            for key in _GROUP_RATES:
                if key in group:
                    group[key] *= factor
            for scheduler in schedulers:
                if scheduler.optimizer is optimizer:
                    for rates_of_groups in (getattr(scheduler, "base_lrs", None), getattr(scheduler, "_last_lr", None)):
                        if rates_of_groups and group_index < len(rates_of_groups):
                            rates_of_groups[group_index] *= factor
            changes.append(f"optimizer {index}, group {group_index}: {restored:g} -> {rate:g}")
    return changes
