"""Shared LightningModule of every image classifier: loss, metrics, NFE logging, optimizers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_pdenets.errors import ModelFailure, NonFiniteLossError, PeerFailedError, SolverFailedError
from lightning_pdenets.models.optim import (
    SCHEDULER_INTERVALS,
    build_optimizer,
    build_scheduler,
    check_optimization_settings,
)
from lightning_pdenets.protocols import find_ode_blocks

__all__ = ["ClassifierModule", "accuracy_metrics"]


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 and top-5 accuracy (top-k capped at the number of classes), keys ``<prefix>acc_top{k}``."""
    metrics = {"acc_top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier over ``self.network``, which subclasses build in ``__init__``.

    Logs ``train/``, ``val/`` and ``test/`` loss with torchmetrics top-1/top-5 accuracy, and for
    networks containing ODE blocks the forward and backward number of function evaluations.

    Args:
        num_classes: Number of classes.
        optimizer: One of ``adam``, ``adamw``, ``sgd``, ``rmsprop``.
        lr: Learning rate.
        weight_decay: L2 weight decay.
        momentum: Momentum of SGD / RMSprop.
        lr_scheduler: ``none``, ``cosine`` (over ``trainer.max_epochs``), ``multistep`` or ``onecycle``
            (per optimizer step over the whole run, peaking at ``lr``; good for short runs).
        lr_milestones: Epochs at which ``multistep`` multiplies the learning rate by ``lr_gamma``.
        lr_gamma: Factor of ``multistep``.
    """

    network: nn.Module

    def __init__(
        self,
        num_classes: int = 10,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: str = "none",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        check_optimization_settings(optimizer, lr, weight_decay, momentum, lr_scheduler, lr_milestones, lr_gamma)
        self.optimization = dict(
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
            lr_scheduler=lr_scheduler, lr_milestones=list(lr_milestones), lr_gamma=lr_gamma,
        )
        self.num_classes = num_classes
        self.train_metrics = accuracy_metrics(num_classes, "train/")
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # -- steps ------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, stage: str, metrics: MetricCollection) -> torch.Tensor:
        x, y = batch
        try:
            logits = self(x)
        except SolverFailedError as failure:
            if stage == "train":
                self.check_finite(failure=failure)  # the other ranks learn of it in the same collective
            raise
        loss = F.cross_entropy(logits, y)
        if stage == "train":
            # before any logging: sync_dist logging is itself a collective, which a failed rank never reaches
            self.check_finite(loss=loss)
        metrics.update(logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)
        self.log_nfe("val", backward=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)
        self.log_nfe("test", backward=False)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_nfe("train", backward=True)

    # -- NFE --------------------------------------------------------------------------------
    def log_nfe(self, stage: str, backward: bool) -> None:
        """Log and reset the NFE summed over all ODE blocks (nothing when there are none)."""
        blocks = find_ode_blocks(self)
        if not blocks:
            return
        on_step = stage == "train"
        self.log(f"{stage}/nfe_forward", float(sum(b.nfe_forward for b in blocks)), on_step=on_step, on_epoch=True, sync_dist=True)
        if backward:
            self.log(f"{stage}/nfe_backward", float(sum(b.nfe_backward for b in blocks)), on_step=on_step, on_epoch=True, sync_dist=True)
        for block in blocks:
            block.reset_nfe()

    # -- faults -----------------------------------------------------------------------------
    def check_finite(self, failure: Optional[ModelFailure] = None, **terms: torch.Tensor) -> None:
        """Stop training on every rank when a term is NaN/Inf or ``failure`` happened on any rank.

        One collective decision per step (``reduce_boolean_decision``), so under DDP a failure on
        one process stops all of them instead of leaving the others waiting in the gradient
        all-reduce. The failing rank raises its own error; the others raise :class:`PeerFailedError`.
        """
        bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        all_ok = not bad and failure is None
        if self._trainer is not None:
            all_ok = self.trainer.strategy.reduce_boolean_decision(all_ok, all=True)
        if all_ok:
            return
        if failure is not None:
            raise failure
        if not bad:
            raise PeerFailedError(
                f"another DDP process stopped at global step {self.global_step} (a non-finite loss or an ODE solver "
                f"failure; its error message names the cause and the remedies). The last good checkpoint is kept."
            )
        raise NonFiniteLossError(
            f"non-finite loss term(s) {bad} at global step {self.global_step}. The last good "
            f"checkpoint is kept. Likely causes: a learning rate too high for these dynamics, or an ODE solver whose "
            f"step size is too large; try a lower `lr`, gradient clipping (trainer.gradient_clip_val), a smaller "
            f"step_size or tighter rtol/atol, then resume with --ckpt_path last."
        )

    # -- optimization -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.optimization
        # Frozen parameters stay out, so that BackboneFinetuning can add them later as their own group.
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, o["optimizer"], o["lr"], o["weight_decay"], o["momentum"])
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        per_step = o["lr_scheduler"] == "onecycle" and self._trainer is not None
        total_steps = self.trainer.estimated_stepping_batches if per_step else None
        scheduler = build_scheduler(
            optimizer, o["lr_scheduler"], o["lr_milestones"], o["lr_gamma"], max_epochs, total_steps
        )
        if scheduler is None:
            return optimizer
        interval = SCHEDULER_INTERVALS[o["lr_scheduler"]]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
