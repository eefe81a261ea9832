"""Log the number of function evaluations (NFE) of every ODE block, per step and per epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.protocols import find_ode_blocks

__all__ = ["NFEMonitor"]

_STAGES = ("train", "val", "test")


class NFEMonitor(Callback):
    """Forward and backward NFE summed over the ODE blocks, per training step and per epoch, averaged over ranks.

    Forward NFE are counted with forward pre-/post-hooks on each block (``nn.Module`` API), only
    while a training, validation or test batch is being computed; so the extra forward passes of
    the solver callbacks (checks, solver swaps) and counter resets by the LightningModule do not
    affect them. Backward NFE are counted between ``on_before_backward`` and ``on_after_backward``.

    Logged: ``nfe/train_forward_step``, ``nfe/train_backward_step`` (every step, mean over ranks), and
    ``nfe/{train,val,test}_forward_epoch`` and ``nfe/train_backward_epoch`` (mean per batch; in
    evaluation over all ranks' batches, which may differ in number under DDP).
    Blocks are found through :class:`lightning_pdenets.protocols.ODESolverBlock`.

    Args:
        log_steps: Log the per-step values (the epoch means are always logged).
    """

    def __init__(self, log_steps: bool = True) -> None:
        super().__init__()
        if not isinstance(log_steps, bool):
            raise ValueError(f"`log_steps` must be True or False, got {log_steps!r}.")
        self.log_steps = log_steps
        self.epoch_history: list[dict[str, float]] = []
        self.last_step: dict[str, float] = {}
        self._counting = False
        self._forward = 0.0
        self._backward = 0.0
        self._backward_start = 0
        self._before: dict[nn.Module, int] = {}
        self._handles: list[Any] = []
        self._sums = {stage: [0.0, 0.0, 0] for stage in _STAGES}

    # -- hooks on the blocks ----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._before[module] = module.nfe_forward

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._counting and module in self._before:
            self._forward += module.nfe_forward - self._before.pop(module)

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        for block in find_ode_blocks(pl_module):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook))
            self._handles.append(block.register_forward_hook(self._post_hook))

    def teardown(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _blocks(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        return find_ode_blocks(pl_module)

    # -- per batch --------------------------------------------------------------------------------
    def _start(self) -> None:
        self._forward, self._backward, self._counting = 0.0, 0.0, True

    def _end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        self._counting = False
        forward, backward = self._forward, self._backward
        if stage == "train":
            # every rank runs every training step, so a per-step collective is safe here; in evaluation
            # ranks may hold different numbers of batches, so those sums are reduced once, at epoch end
            values = torch.tensor([forward, backward], dtype=torch.float64, device=pl_module.device)
            forward, backward = (float(v) for v in trainer.strategy.reduce(values, reduce_op="mean"))
        sums = self._sums[stage]
        sums[0] += forward
        sums[1] += backward
        sums[2] += 1
        if stage == "train":
            self.last_step = {"forward": forward, "backward": backward}
            if self.log_steps:
                pl_module.log_dict(
                    {"nfe/train_forward_step": forward, "nfe/train_backward_step": backward}, on_step=True, on_epoch=False
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._counting = False  # forward is over; what follows in this step is not the training forward
        self._backward_start = sum(b.nfe_backward for b in self._blocks(pl_module))

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backward += sum(b.nfe_backward for b in self._blocks(pl_module)) - self._backward_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end(trainer, pl_module, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(trainer, pl_module, "test")

    # -- per epoch --------------------------------------------------------------------------------
    def _epoch_end(self, pl_module: pl.LightningModule, stage: str, trainer: "pl.Trainer") -> None:
        forward, backward, count = self._sums[stage]
        self._sums[stage] = [0.0, 0.0, 0]
        if trainer.sanity_checking:
            return
        if stage != "train":  # the per-batch values of this rank only: sum over the ranks' batches
            totals = torch.tensor([forward, backward, count], dtype=torch.float64, device=pl_module.device)
            forward, backward, count = (float(v) for v in trainer.strategy.reduce(totals, reduce_op="sum"))
        if count == 0:
            return
        metrics = {f"nfe/{stage}_forward_epoch": forward / count}
        if stage == "train":
            metrics["nfe/train_backward_epoch"] = backward / count
        self.epoch_history.append({"stage": stage, "epoch": trainer.current_epoch, **metrics})
        log_replicated(pl_module, metrics)  # the same on every rank: reduced per step (train) or above

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "train", trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "val", trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "test", trainer)

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The NFE history and the running sums of the current training epoch (resumed mid-epoch alike)."""
        return {"epoch_history": list(self.epoch_history), "last_step": dict(self.last_step),
                "train_sums": list(self._sums["train"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_history = list(state_dict["epoch_history"])
        self.last_step = dict(state_dict["last_step"])
        self._sums["train"] = list(state_dict["train_sums"])
