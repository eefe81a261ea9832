"""Total variation in time of time-dependent weights (the α₁ term of Ruthotto & Haber's Eq. 11).

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020, Eq. (11): α₁ ∫₀ᵀ φ_ε(∂_t θ(t)) dt with φ_ε(x) = √(x² + ε), applied entrywise.
On weights sampled every h in time (θ_0, …, θ_{P−1}) the integral is discretized as

    R(θ) = α₁ · Σ_{k=0}^{P−2} h · Σ_entries φ_ε((θ_{k+1} − θ_k) / h),

summed over every parameter exposed through the
:class:`lightning_pdenets.protocols.TimeDependentWeights` protocol. The callback works with any
Lightning project whose modules follow that protocol.

Reading the logged value: φ_ε(0) = √ε, so weights constant in time still give
α₁ · h · √ε per entry and time difference (on the STL-10 parabolic network, 1.55M entry differences:
α₁·TV = 14.7 with α₁ = 3e-4, ε = 1e-3). That floor is a constant with zero gradient; it raises the
logged objective but does not act on training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError, NonFiniteLossError
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.protocols import find_time_dependent_weights
from lightning_pdenets.validation import check_non_negative, check_positive

__all__ = ["TimeTVRegularization", "collect_time_dependent_parameters", "time_total_variation"]


def time_total_variation(weights: Iterable[tuple[torch.Tensor, float]], epsilon: float) -> torch.Tensor:
    """Σ over (θ, h) pairs of Σ_k h · Σ φ_ε((θ_{k+1} − θ_k) / h); zero without any time differences."""
    total: torch.Tensor | None = None
    for tensor, time_step in weights:
        if tensor.shape[0] < 2:
            continue
        slope = (tensor[1:] - tensor[:-1]) / time_step
        term = time_step * torch.sqrt(slope * slope + epsilon).sum()
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


def collect_time_dependent_parameters(module: torch.nn.Module) -> list[tuple[torch.Tensor, float]]:
    """(parameter, time step) of every module following ``TimeDependentWeights``, each parameter once."""
    seen: set[int] = set()
    pairs: list[tuple[torch.Tensor, float]] = []
    for owner in find_time_dependent_weights(module):
        time_step = float(owner.weight_time_step())
        for tensor in owner.time_dependent_parameters():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                pairs.append((tensor, time_step))
    return pairs


class TimeTVRegularization(Callback):
    """Add α₁ · TV-in-time of the module's time-dependent weights to the training objective.

    Ruthotto & Haber 2020, Eq. (11), first term. The term depends only on the weights, so instead
    of changing the loss returned by ``training_step`` the callback adds its gradient to the
    parameters' ``.grad`` in ``on_before_optimizer_step``. That hook runs after all backward
    passes of the step (so after gradient accumulation, after AMP unscaling and DDP all-reduce,
    before gradient clipping) under both automatic and manual optimization (manual: whenever the
    module calls ``optimizer.step()``), which makes the update exactly that of
    ``loss + α₁·R(θ)``. Only parameters of the optimizer being stepped are touched. The value is
    logged as ``train/tv_time`` every step and ``train/tv_time_epoch`` (epoch mean, resumable), both
    already multiplied by α₁.

    Modules expose their weights through :class:`lightning_pdenets.protocols.TimeDependentWeights`
    (``time_dependent_parameters()`` with time on the first axis, and ``weight_time_step()``).

    Args:
        alpha: α₁ ≥ 0 (3e-4 in the paper's STL-10 runs).
        epsilon: ε > 0 of φ_ε (1e-3 in the paper).
        log_name: Metric name of the logged value.
    """

    def __init__(self, alpha: float = 3e-4, epsilon: float = 1e-3, log_name: str = "train/tv_time") -> None:
        super().__init__()
        check_non_negative(alpha, "alpha")
        check_positive(epsilon, "epsilon")
        if not isinstance(log_name, str) or not log_name:
            raise ValueError(f"`log_name` must be a non-empty string, got {log_name!r}.")
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.log_name = log_name
        self._epoch_sum: Any = 0.0  # running sum (a tensor once stepped) and count: the resumable epoch mean
        self._epoch_count = 0

    def penalty(self, module: torch.nn.Module) -> torch.Tensor:
        """α₁ · R(θ) of ``module``, differentiable with respect to its time-dependent parameters."""
        return self.alpha * time_total_variation(collect_time_dependent_parameters(module), self.epsilon)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not collect_time_dependent_parameters(pl_module):  # alike on every DDP rank
            raise ConfigurationError(
                f"TimeTVRegularization found no module following the TimeDependentWeights protocol in "
                f"{type(pl_module).__name__}; expose `time_dependent_parameters()` and `weight_time_step()` "
                f"(see lightning_pdenets.protocols) or remove the callback."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        pairs = [
            (t, h) for t, h in collect_time_dependent_parameters(pl_module) if id(t) in stepped and t.requires_grad
        ]
        if not pairs:
            return
        with torch.enable_grad():
            value = self.alpha * time_total_variation(pairs, self.epsilon)
            # weights with a single control point have no time difference and no gradient
            grads = torch.autograd.grad(value, [t for t, _ in pairs], allow_unused=True) if value.requires_grad else []
        if not torch.isfinite(value.detach()):
            raise NonFiniteLossError(
                f"the TV-in-time term is {value.item()} at global step {trainer.global_step}; the time-dependent "
                f"weights are no longer finite. Lower the learning rate or clip gradients, then resume."
            )
        with torch.no_grad():
            for (tensor, _), grad in zip(pairs, grads):
                if grad is None:
                    continue
                if tensor.grad is None:
                    tensor.grad = grad.detach().clone()
                else:
                    tensor.grad.add_(grad)
        pl_module.log(self.log_name, value.detach(), on_step=True, on_epoch=False, prog_bar=False)
        self._epoch_sum = self._epoch_sum + value.detach()  # a device tensor: no host sync per step
        self._epoch_count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Kept here rather than by Lightning's on_epoch aggregation, which a mid-epoch resume restarts from zero.
        # the term is a function of the (replicated) weights only, so every rank holds the same mean: no sync
        if self._epoch_count:
            mean = torch.as_tensor(self._epoch_sum, device=pl_module.device) / self._epoch_count
            log_replicated(pl_module, {f"{self.log_name}_epoch": mean})
        self._epoch_sum, self._epoch_count = 0.0, 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"epoch_sum": float(self._epoch_sum), "epoch_count": self._epoch_count}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch_sum = float(state_dict.get("epoch_sum", 0.0))
        self._epoch_count = int(state_dict.get("epoch_count", 0))
