"""Log the number of function evaluations (NFE) of every ODE block, per step and per epoch: the one NFE logger."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_pdenets.callbacks._evaluation import in_callback_pass
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.protocols import find_ode_blocks

__all__ = ["NFEMonitor"]

_STAGES = ("train", "val", "test")


class NFEMonitor(Callback):
    """The one owner of NFE logging: forward and backward function evaluations of the ODE blocks, per step and epoch.

    Forward NFE are the differences of each block's (only increasing) ``nfe_forward`` counter over
    the block's forward calls (``nn.Module`` forward pre-/post-hooks) while a training, validation or
    test batch is being computed; passes that other callbacks run for their own purposes (attacks,
    out-of-distribution tests, solver checks and swaps, timing) are marked as such and never counted,
    whatever the order of the callbacks. Backward NFE are the difference of ``nfe_backward`` between
    ``on_before_backward`` and ``on_after_backward``. Blocks are found once per ``fit``/``test``
    through :class:`lightning_pdenets.protocols.ODESolverBlock`; without any, the callback does nothing.

    Logged: ``train/nfe_forward_step`` and ``train/nfe_backward_step`` (mean over ranks, at the
    trainer's ``log_every_n_steps``), and per epoch ``train/nfe_forward_epoch``,
    ``train/nfe_backward_epoch``, ``val/nfe_forward`` and ``test/nfe_forward`` (mean per batch; in
    evaluation over all ranks' batches, which may differ in number under DDP). ``pdenets`` adds
    this callback by default.

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
        self._blocks: list[nn.Module] = []
        self._before: dict[nn.Module, int] = {}
        self._handles: list[Any] = []
        self._sums = {stage: [0.0, 0.0, 0] for stage in _STAGES}

    # -- hooks on the blocks ----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._before[module] = module.nfe_forward

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        before = self._before.pop(module, None)
        if self._counting and before is not None and not in_callback_pass():
            self._forward += module.nfe_forward - before

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        monitors = [c for c in trainer.callbacks if isinstance(c, NFEMonitor)]
        if len(monitors) > 1:
            raise ValueError(
                f"{len(monitors)} NFEMonitor callbacks are attached, so every NFE would be logged twice; keep one "
                f"(`pdenets` adds one by default, so drop it from your config's trainer.callbacks)."
            )
        self.teardown(trainer, pl_module, stage)
        self._blocks = find_ode_blocks(pl_module)
        for block in self._blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre_hook))
            self._handles.append(block.register_forward_hook(self._post_hook))

    def teardown(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._blocks = []

    # -- per batch --------------------------------------------------------------------------------
    def _start(self) -> None:
        self._forward, self._backward, self._counting = 0.0, 0.0, bool(self._blocks)

    def _end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        self._counting = False
        if not self._blocks:
            return
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
            if self.log_steps and _logs_this_step(trainer):
                pl_module.log_dict(
                    {"train/nfe_forward_step": forward, "train/nfe_backward_step": backward}, on_step=True, on_epoch=False
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._counting = False  # forward is over; what follows in this step is not the training forward
        self._backward_start = sum(b.nfe_backward for b in self._blocks)

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backward += sum(b.nfe_backward for b in self._blocks) - self._backward_start

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
        if stage == "train":
            metrics = {"train/nfe_forward_epoch": forward / count, "train/nfe_backward_epoch": backward / count}
        else:
            metrics = {f"{stage}/nfe_forward": forward / count}
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


def _logs_this_step(trainer: "pl.Trainer") -> bool:
    """Whether Lightning writes step-level values to the logger in this step (``log_every_n_steps``).

    Logging a value Lightning would drop anyway costs about 0.5 ms per ``self.log`` call, which on a GPU
    is a noticeable share of a step; Lightning's own decision is read from its logger connector.
    """
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))  # noqa: SLF001
