"""PR-Net's LightningModule: manual, alternating optimization of theta, the query set H and alpha.

Kim, Choi, Ham, Kim & Park, "PDE-regularized neural networks for image classification",
Algorithm 1. Every training batch runs the configured sub-steps in order (default: all four):

* ``task``   (line 5): theta, stem and head with the task loss L_T;
* ``theta``  (line 6): theta with L_T + L_I + L_G (initial-condition and governing losses);
* ``query``  (line 7): the query set H with L_T;
* ``alpha``  (line 8): the coefficients alpha with L_G + R_G (proximal L1 step by default).

Validation and best-model selection (line 9) are Lightning's validation loop and the CLI's
``ModelCheckpoint`` on ``val/acc_top1``. Inference uses ``self.network`` alone: it holds no alpha
and computes no derivatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # earlier releases have no weight-averaging callback of this kind to refuse
    WeightAveraging = None  # type: ignore[assignment,misc]

from typing_extensions import override

from lightning_pdenets.blocks.governing import GoverningEquation
from lightning_pdenets.blocks.pde import PDEBlock
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import add_figure, add_text
from lightning_pdenets.metric_logging import log_replicated, step_values_are_read
from lightning_pdenets.models.base import ClassifierModule, lower_learning_rate
from lightning_pdenets.models.optim import (
    OPTIMIZERS,
    OptimizerOptions,
    ProximalSGD,
    build_optimizer,
    build_schedule,
    resolve_optimizer_options,
)
from lightning_pdenets.validation import check_non_negative, check_positive, check_positive_int

__all__ = ["PRNET_OPTIMIZERS", "PRNET_STEPS", "PRNetAlgorithmModule", "PRNetModule"]

PRNET_STEPS = ("task", "theta", "query", "alpha")
"""Names of the sub-steps of Algorithm 1, in the paper's order (lines 5-8)."""

_NONFINITE_POLICIES = ("raise", "skip")

# The learning rates (command-line names) of the parameters each loss term depends on.
_TERM_LEARNING_RATES = {
    "loss_task": ("lr", "theta.lr", "query.lr"),
    "loss_initial": ("theta.lr",),
    "loss_governing": ("theta.lr", "alpha.lr"),
    "penalty_l1": ("alpha.lr",),
}


PRNET_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "theta": dict(
        optimizer="adam", lr=1e-3, weight_decay=0.0, momentum=0.9, lr_scheduler="none", lr_milestones=[], lr_gamma=0.1
    ),
    "query": dict(
        optimizer="adam", lr=1e-3, weight_decay=0.0, momentum=0.9, lr_scheduler="none", lr_milestones=[], lr_gamma=0.1
    ),
    "alpha": dict(
        optimizer="proximal",
        lr=1e-2,
        weight_decay=0.0,
        momentum=0.0,
        lr_scheduler="none",
        lr_milestones=[],
        lr_gamma=0.1,
    ),
}
"""Defaults of the optimizers of Algorithm 1's theta, query and alpha steps (overridden by ``theta``, ...)."""

_PROXIMAL = "proximal"  # the ISTA step of alpha (ProximalSGD); the other groups take the optimizers of OPTIMIZERS


class PRNetAlgorithmModule(ClassifierModule):
    """PR-Net's Algorithm 1 (``automatic_optimization = False``) over a network with a PDE block.

    Subclasses name a registered :attr:`architecture` whose network has a ``stem`` producing h(0), a
    :class:`PDEBlock` ``feature`` and a ``head`` (:class:`PRNetModule`, Chen et al.'s; and
    ``PRNetMobileNetModule``, the isometric MobileNetV3's), whose arguments are given as ``network``.

    Optimizers, in this order (``self.optimizers()``): task (theta + stem + head; the settings of
    :class:`ClassifierModule`: ``optimizer``, ``lr``, ``lr_scheduler``, ...), theta, query set H and alpha,
    each set by one dict of :class:`~lightning_pdenets.models.optim.OptimizerOptions` over
    :data:`PRNET_OPTIMIZERS` and stored complete in ``hparams``. ``alpha: {optimizer: proximal}`` (the
    default) is the ISTA step :class:`ProximalSGD`, which produces exact zeros. Every optimizer has its own
    scheduler. Gradients of all four groups are all-reduced under DDP.

    Args:
        max_power: Highest power of h in the governing equation (int or one per axis x, y).
        max_derivative_order: Highest derivative order in d (int or one per axis x, y).
        l1_weight: Weight w of R_G = w * sum |alpha|.
        print_threshold: Fraction of the largest |alpha| below which terms are left out of the printed
            equation, in [0, 1].
        initial_weight: Weight of L_I in the theta step.
        governing_weight: Weight of L_G in the theta step.
        governing_samples: Evaluate the derivatives and L_G on only this many samples of each batch
            (an unbiased estimate of the mean over samples, since batches are shuffled); None: all.
            The cost of the theta step's derivative part scales with it.
        step_order: Sub-steps per batch, a subset of ``task``, ``theta``, ``query``, ``alpha`` in any order.
        theta: Optimizer of the theta step, e.g. ``{optimizer: adam, lr: 0.001, lr_scheduler: onecycle}``
            (settings not given keep :data:`PRNET_OPTIMIZERS`' ``theta``).
        query: Optimizer of the query step (the set H), likewise.
        alpha: Optimizer of the alpha step, likewise; its ``optimizer`` may also be ``proximal``.
        gradient_clip_val: Clip each sub-step's gradient norm to this value (None: no clipping).
        on_nonfinite: ``'raise'`` stops with an error naming the NaN/Inf loss term; ``'skip'``
            skips that sub-step (on all ranks) and counts it in ``train/skipped_steps``.
        **kwargs: ``network``, the data facts and the task optimizer's settings (:class:`ClassifierModule`).
    """

    optimizer_defaults: ClassVar[dict[str, dict[str, Any]]] = PRNET_OPTIMIZERS
    network: Any  # Chen et al.'s classifier or the isometric MobileNet: each has a stem, a feature and a head
    inference_chunk_size = 16  # samples are independent in eval mode (GroupNorm per sample, no solver)

    def __init__(
        self,
        max_power: int | Sequence[int] = 3,
        max_derivative_order: int | Sequence[int] = 3,
        l1_weight: float = 1e-4,
        print_threshold: float = 1e-3,
        initial_weight: float = 1.0,
        governing_weight: float = 1.0,
        governing_samples: int | None = None,
        step_order: Sequence[str] = PRNET_STEPS,
        theta: OptimizerOptions | None = None,
        query: OptimizerOptions | None = None,
        alpha: OptimizerOptions | None = None,
        gradient_clip_val: float | None = None,
        on_nonfinite: str = "raise",
        **kwargs: Any,
    ) -> None:
        if self.architecture is None:  # Algorithm 1 needs a network with a stem, a PDE block and a head
            raise TypeError(
                f"{type(self).__name__} sets no `architecture` (a name registered with @register_architecture); "
                f"use PRNetModule or PRNetMobileNetModule, or a subclass naming such a network."
            )
        super().__init__(**kwargs)  # saves every argument and builds the network
        self.automatic_optimization = False
        if (
            isinstance(step_order, str)
            or not step_order
            or len(set(step_order)) != len(step_order)
            or any(s not in PRNET_STEPS for s in step_order)
        ):
            raise ValueError(
                f"`step_order` must be a non-empty list of distinct names from {list(PRNET_STEPS)}, got {step_order!r}."
            )
        for group, defaults in self.optimizer_defaults.items():
            allowed = (*OPTIMIZERS, _PROXIMAL) if group == "alpha" else tuple(OPTIMIZERS)
            self.hparams[group] = resolve_optimizer_options(self.hparams.get(group), defaults, group, allowed)
        if self.hparams["alpha"]["optimizer"] == _PROXIMAL and self.hparams["alpha"]["weight_decay"] != 0:
            raise ValueError(
                f"`alpha.weight_decay` does not apply to `alpha: {{optimizer: {_PROXIMAL}}}`, got "
                f"{self.hparams['alpha']['weight_decay']!r}: the ISTA step's only penalty is the L1 term (set its "
                f"weight with `l1_weight`). Set alpha.weight_decay 0, or choose another alpha.optimizer."
            )
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"`on_nonfinite` must be one of {list(_NONFINITE_POLICIES)}, got {on_nonfinite!r}.")
        check_positive(gradient_clip_val, "gradient_clip_val", allow_none=True)
        if governing_samples is not None:
            check_positive_int(governing_samples, "governing_samples")
        check_non_negative(initial_weight, "initial_weight")
        check_non_negative(governing_weight, "governing_weight")
        self.step_order = tuple(step_order)
        self.governing = GoverningEquation(
            PDEBlock.axes, max_power, max_derivative_order, l1_weight, print_threshold, variable="h"
        )
        self.skipped_steps = 0
        self._active_step = self.step_order[0]

    # -- parts ------------------------------------------------------------------------------
    @property
    def block(self) -> PDEBlock:
        return self.network.feature

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters of each optimizer: task (theta + stem + head), theta, query (H), alpha."""
        theta = list(self.block.field.parameters())
        return {
            "task": list(self.network.stem.parameters()) + theta + list(self.network.head.parameters()),
            "theta": theta,
            "query": [self.block.query],
            "alpha": [self.governing.alpha],
        }

    def _derivative_orders(self) -> dict[str, int]:
        return dict(self.governing.max_derivative_order)

    # -- optimization -----------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        settings = {"task": self.optimization, "theta": hp.theta, "query": hp.query, "alpha": hp.alpha}
        optimizers, schedulers = [], []
        for name in PRNET_STEPS:
            s = settings[name]
            optimizer: torch.optim.Optimizer
            if s["optimizer"] == _PROXIMAL:
                optimizer = ProximalSGD(groups[name], s["lr"], self.governing.l1_weight, s["momentum"])
            else:
                optimizer = build_optimizer(groups[name], s["optimizer"], s["lr"], s["weight_decay"], s["momentum"])
            # a constant schedule where none is set keeps the four schedulers aligned with the optimizers
            schedule = build_schedule(optimizer, s, self._trainer) or {
                "scheduler": torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
                "interval": "epoch",
            }
            optimizers.append(optimizer)
            schedulers.append({**schedule, "name": f"lr-{name}"})
        return optimizers, schedulers

    def _step_schedulers(self, interval: str) -> None:
        """Manual optimization steps the schedules itself: per batch or per epoch, as each one's ``interval``."""
        for name, config in zip(PRNET_STEPS, self.trainer.lr_scheduler_configs):
            if name in self.step_order and config.interval == interval:  # optimizers outside step_order never step
                config.scheduler.step()  # type: ignore[call-arg]  # build_schedule makes no ReduceLROnPlateau

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._refuse_weight_averaging()

    def _refuse_weight_averaging(self) -> None:
        """Refuse Lightning's ``WeightAveraging`` callbacks (e.g. ``callbacks/ema.yaml``), which Algorithm 1 breaks."""
        averaging = [
            type(c).__name__
            for c in self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
            if WeightAveraging is not None and isinstance(c, WeightAveraging)
        ]
        if not averaging:
            return
        raise ConfigurationError(
            f"{type(self).__name__} cannot train with {averaging[0]}: PR-Net's Algorithm 1 (manual optimization) "
            f"takes {len(self.step_order)} optimizer steps per batch ({', '.join(self.step_order)}), and Lightning's "
            f"weight averaging counts each of them in trainer.global_step, so update_every_n_steps and "
            f"update_starting_at_step would count sub-steps (with 4 sub-steps an even update_every_n_steps never "
            f"updates); and it would average alpha, whose proximal step makes exact zeros, into small non-zero "
            f"coefficients, so the learned governing equation would lose its sparsity. Remove the weight-averaging "
            f"callback (callbacks/ema.yaml) from PR-Net runs; the other models take it."
        )

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_schedulers("step")

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._step_schedulers("epoch")

    # -- Algorithm 1 ---------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]  # manual optimization
        x, y = batch
        optimizers = dict(zip(PRNET_STEPS, self.optimizers()))
        cache: dict[str, Any] = {}
        for name in self.step_order:
            self._active_step = name  # named by the advice after a non-finite loss
            getattr(self, f"_{name}_step")(x, y, optimizers[name], cache)
        logged = dict(cache.get("terms", {}))
        if logged:
            logged["total"] = sum(logged.values())
            for name, value in logged.items():
                self.log_train_term(f"train/{name}", value)
            self.log_train_term(
                "train/loss", logged["loss_task"] if "loss_task" in logged else logged["total"], prog_bar=True
            )
        if step_values_are_read(self.trainer):
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _initial_features(self, x: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """h(0) = stem(x) without gradient, shared by the steps after the last task step."""
        if cache.get("h0") is None:
            with torch.no_grad():
                cache["h0"] = self.network.stem(x)
        return cache["h0"]

    def _record(self, cache: dict[str, Any], **terms: torch.Tensor) -> None:
        recorded = cache.setdefault("terms", {})
        for name, value in terms.items():
            recorded.setdefault(name, value.detach())

    def _task_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: Any, cache: dict[str, Any]) -> None:
        logits = self.network(x)
        loss_task = F.cross_entropy(logits, y)
        self.train_metrics.update(logits.detach(), y)
        self._record(cache, loss_task=loss_task)
        self._optimize(optimizer, loss_task, {"loss_task": loss_task})
        cache["h0"] = None  # the stem changed
        cache["library"] = None

    def _theta_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: Any, cache: dict[str, Any]) -> None:
        hp = self.hparams
        h0 = self._initial_features(x, cache)
        sampled = h0.shape[0] if hp.governing_samples is None else min(hp.governing_samples, h0.shape[0])
        derivatives = self.block.derivatives(h0[:sampled], self._derivative_orders())
        u = derivatives.u  # the primal of the derivative pass: f is evaluated once per sample
        if sampled < h0.shape[0]:
            u = torch.cat([u, self.block(h0[sampled:])])
        logits = self.network.head(u)
        loss_task = F.cross_entropy(logits, y)
        loss_initial = self.block.initial_condition_loss(h0)
        library = self.governing.library(derivatives)
        u_t = cast(torch.Tensor, derivatives.u_t)  # derivatives() always returns the time derivative
        loss_governing = self.governing.governing_loss(u_t, library)
        if "loss_task" not in cache.get("terms", {}):
            self.train_metrics.update(logits.detach(), y)
        self._record(cache, loss_task=loss_task, loss_initial=loss_initial, loss_governing=loss_governing)
        cache["library"] = (library.detach(), u_t.detach())  # reused by the alpha step
        total = loss_task + hp.initial_weight * loss_initial + hp.governing_weight * loss_governing
        terms = {"loss_task": loss_task, "loss_initial": loss_initial, "loss_governing": loss_governing}
        self._optimize(optimizer, total, terms)

    def _query_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: Any, cache: dict[str, Any]) -> None:
        logits = self.network.head(self.block(self._initial_features(x, cache)))
        loss_task = F.cross_entropy(logits, y)
        self._record(cache, loss_task=loss_task)
        self._optimize(optimizer, loss_task, {"loss_task (query step)": loss_task})

    def _alpha_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: Any, cache: dict[str, Any]) -> None:
        if cache.get("library") is None:  # no theta step before this one in the current order
            with torch.no_grad():
                h0 = self._initial_features(x, cache)
                derivatives = self.block.derivatives(h0[: self.hparams.governing_samples], self._derivative_orders())
                cache["library"] = (self.governing.library(derivatives), derivatives.u_t)
        library, u_t = cache["library"]
        loss_governing = self.governing.governing_loss(u_t, library)
        penalty = self.governing.l1_penalty()
        self._record(cache, loss_governing=loss_governing, penalty_l1=penalty)
        proximal = isinstance(optimizer.optimizer, ProximalSGD)
        if proximal:
            # The library changes with the network: cap the ISTA step at 1/L of this batch's library,
            # or alpha diverges as soon as the derivative terms grow (measured on MNIST at alpha_lr=0.01).
            lipschitz_lr = 1.0 / max(self.governing.lipschitz_constant(library), 1e-12)
            for group in optimizer.optimizer.param_groups:
                group["lipschitz_lr"] = lipschitz_lr
        loss = loss_governing if proximal else loss_governing + penalty  # the proximal step applies R_G itself
        self._optimize(optimizer, loss, {"loss_governing": loss_governing, "penalty_l1": penalty})

    def _optimize(self, optimizer: Any, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """zero_grad, backward, optional clipping, step; all-reduced under DDP; NaN policy applied first."""
        if not self._all_finite(terms):
            return
        self.zero_grad(set_to_none=True)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every parameter takes part in every backward (with zero weight where unused), so that DDP
            # all-reduces each sub-step's gradients without "unused parameter" errors.
            loss = loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
            self.manual_backward(loss)
        else:
            # Only the gradients this sub-step's optimizer reads: autograd then skips the rest (the field's weight
            # gradients in the query step, the head's in the theta step); the ones it computes are the same numbers.
            stepped = [p for group in getattr(optimizer, "optimizer", optimizer).param_groups for p in group["params"]]
            self.manual_backward(loss, inputs=stepped)
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()

    def _all_finite(self, terms: dict[str, torch.Tensor]) -> bool:
        if self.hparams.on_nonfinite == "raise":
            self.check_finite(None, **terms)
            return True
        bad, all_finite = self.finite_on_every_rank(terms)
        if not all_finite:
            self.skipped_steps += 1
            rank_zero_warn(
                f"skipping a PR-Net sub-step at global step {self.global_step}: non-finite loss term(s) "
                f"{bad or ['on another rank']} (on_nonfinite='skip')."
            )
        return all_finite

    # -- logging ------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self) -> None:
        log_replicated(
            self, {f"governing/alpha[{name}]": value for name, value in self.governing.coefficients().items()}
        )
        add_text(self.trainer, "governing/equation", self.governing.equation())
        add_figure(self.trainer, "governing/coefficients", self._coefficient_figure)

    def _coefficient_figure(self) -> Any:
        """Bar chart of alpha per library term: the sparsity pattern at a glance."""
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

        coefficients = self.governing.coefficients()
        figure = Figure(figsize=(max(6, 0.3 * len(coefficients)), 3))
        axis = figure.add_subplot()
        axis.bar(range(len(coefficients)), list(coefficients.values()))
        axis.set_xticks(range(len(coefficients)), list(coefficients), rotation=90, fontsize=7)
        axis.axhline(0.0, color="black", linewidth=0.5)
        axis.set_ylabel("alpha")
        axis.set_title(self.governing.equation(), fontsize=8)
        figure.tight_layout()
        return figure

    def learning_rate_options(self) -> dict[str, float]:
        groups = {f"{group}.lr": self.hparams[group]["lr"] for group in self.optimizer_defaults}
        return {**super().learning_rate_options(), **groups}  # "lr": the task step's

    @override
    def _non_finite_advice(self, bad: Sequence[str]) -> str:
        rates = self.learning_rate_options()
        options = dict.fromkeys(
            option for term in bad for option in _TERM_LEARNING_RATES.get(term.split(" (")[0], ("lr",))
        )
        lower_lr = " ".join(f"--model.init_args.{option} {lower_learning_rate(rates[option]):g}" for option in options)
        fresh = (
            "--model.init_args.gradient_clip_val 1.0 (PR-Net clips in its own sub-steps; --trainer.gradient_clip_val "
            "does not apply to manual optimization), or --model.init_args.on_nonfinite skip (skips such sub-steps "
            "and counts them in train/skipped_steps)"
        )
        cause = (
            f"Likely cause: learning rates too high for the parameters behind {', '.join(bad)} (in the "
            f"{self._active_step} sub-step)."
        )
        if self._kept_checkpoint() is None:
            return (
                f"{cause} No checkpoint was written yet, so start afresh: run the same command with lower learning "
                f"rates ({lower_lr}), or with {fresh}."
            )
        return (
            f"{cause} {self._kept_checkpoint_note()} Continue from it with lower learning rates: run the same command "
            f"with {self._resume_option()} {lower_lr} (learning rates given for the resumed run replace the "
            f"checkpoint's in its optimizers and schedules). A fresh run can also train with {fresh}."
        )

    # -- checkpoints --------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["prnet_skipped_steps"] = self.skipped_steps

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.skipped_steps = checkpoint.get("prnet_skipped_steps", 0)


class PRNetModule(PRNetAlgorithmModule):
    """PR-Net of Kim et al. (Table 2): Chen et al.'s stem and head around a PDE block, trained with Algorithm 1.

    ``network``: ``width``, ``num_downsamples``, ``activation``, ``t_end``, ``output_norm``
    (:func:`lightning_pdenets.architectures.prnet`); ``image_size``, taken from the datamodule, fixes the query
    set H. Algorithm 1's settings (``max_power``, ``theta``, ``alpha``, ...) are :class:`PRNetAlgorithmModule`'s.
    """

    architecture = "prnet"
