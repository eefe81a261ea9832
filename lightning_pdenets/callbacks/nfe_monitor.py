"""Log the number of function evaluations (NFE) of every ODE block, and its solver steps, per step and per epoch.

The one NFE logger; beside the NFE it logs the accepted and rejected solver steps and the distribution of
the step sizes taken, so that a solver getting stiffer during training (and a regularizer undoing it) shows.
"""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import in_callback_pass
from lightning_pdenets.metric_logging import log_replicated, step_values_are_read
from lightning_pdenets.protocols import ODEModule, find_ode_blocks
from lightning_pdenets.validation import check_bool, check_positive_int

__all__ = ["NFEMonitor"]

_STAGES = ("train", "val", "test")
_NFE = {"forward": "nfe_forward", "backward": "nfe_backward"}
_STEP_COUNTERS = {
    "forward": ("steps_accepted_forward", "steps_rejected_forward"),
    "backward": ("steps_accepted_backward", "steps_rejected_backward"),
}
"""Optional solver-step counters of an ODE block (see :mod:`lightning_pdenets.protocols`), by pass."""


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

    Solver statistics, when every block counts its steps (as :class:`~lightning_pdenets.blocks.ODEBlock` does;
    see :mod:`lightning_pdenets.protocols`): accepted and rejected steps per batch, named and reduced like
    the NFE, ``train/steps_{accepted,rejected}_{forward,backward}_{step,epoch}`` and
    ``{val,test}/steps_{accepted,rejected}_forward``. For an adaptive solver, NFE = 1 (or 2 without
    ``first_step``) + (stages - 1) × (accepted + rejected), plus one per accepted step for the native backend's
    ``adaptive_heun`` and ``fehlberg2`` (not first-same-as-last; see :mod:`lightning_pdenets.solvers.runge_kutta`);
    a fixed-step solver accepts every step; backpropagating
    through the solver takes no backward steps. With a logger that has ``add_histogram`` (TensorBoard), the
    log10 of the accepted forward step sizes of the training batches (of rank 0) is drawn as the histogram
    ``train/log10_step_size`` every ``histogram_every_n_steps`` steps and at the end of each training epoch:
    TensorBoard's histogram and distribution tabs then show the steps shrinking as the dynamics stiffen.

    Args:
        log_steps: Log the per-step values (the epoch means are always logged).
        histogram_every_n_steps: Also draw the step-size histogram every this many training steps (``None``: at
            the end of each training epoch only).
    """

    def __init__(self, log_steps: bool = True, histogram_every_n_steps: int | None = None) -> None:
        super().__init__()
        check_bool(log_steps, "log_steps")
        if histogram_every_n_steps is not None:
            check_positive_int(histogram_every_n_steps, "histogram_every_n_steps")
        self.log_steps = log_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.epoch_history: list[dict[str, Any]] = []
        self.last_step: dict[str, float] = {}
        self._counting = False
        self._batch: dict[str, float] = {}
        self._backward_start: dict[str, int] = {}
        self._blocks: list[ODEModule] = []
        self._counters = {"forward": ("nfe_forward",), "backward": ("nfe_backward",)}
        self._before: dict[nn.Module, tuple[int, ...]] = {}
        self._handles: list[Any] = []
        self._sums: dict[str, dict[str, float]] = {stage: {} for stage in _STAGES}
        self._step_sizes: list[torch.Tensor] = []
        self._histogram = False  # whether the blocks report step sizes (decided in setup)
        self._collect_step_sizes = False  # whether this batch's step sizes go into the histogram

    # -- hooks on the blocks ----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._before[module] = tuple(getattr(module, name) for name in self._counters["forward"])

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        before = self._before.pop(module, None)
        if not self._counting or before is None or in_callback_pass():
            return
        for name, start in zip(self._counters["forward"], before):
            self._batch[name] += getattr(module, name) - start
        if self._collect_step_sizes:
            self._step_sizes.append(cast(torch.Tensor, module.last_step_sizes).detach().flatten())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        monitors = [c for c in callbacks if isinstance(c, NFEMonitor)]
        if len(monitors) > 1:  # the same callbacks on every DDP rank: all raise alike
            raise ConfigurationError(
                f"{len(monitors)} NFEMonitor callbacks are attached, so every NFE would be logged twice; keep one "
                f"(`pdenets` adds one by default, so drop it from your config's trainer.callbacks)."
            )
        self.teardown(trainer, pl_module, stage)
        self._blocks = find_ode_blocks(pl_module)
        counts_steps = bool(self._blocks) and all(
            hasattr(block, name) for block in self._blocks for names in _STEP_COUNTERS.values() for name in names
        )
        self._counters = {
            passage: (_NFE[passage], *(_STEP_COUNTERS[passage] if counts_steps else ())) for passage in _NFE
        }
        self._histogram = counts_steps and all(hasattr(block, "last_step_sizes") for block in self._blocks)
        self._collect_step_sizes = False
        for block in self._blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre_hook))
            self._handles.append(block.register_forward_hook(self._post_hook))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._blocks = []

    # -- per batch --------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        self._batch = {name: 0.0 for names in self._counters.values() for name in names}
        self._counting = bool(self._blocks)
        self._collect_step_sizes = self._histogram and stage == "train" and trainer.is_global_zero

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._counting = False
        if not self._blocks:
            return
        values = self._batch
        if stage == "train":
            if trainer.world_size > 1:
                # every rank runs every training step, so a per-step collective is safe here; in evaluation
                # ranks may hold different numbers of batches, so those sums are reduced once, at epoch end
                tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=pl_module.device)
                values = dict(zip(values, (float(v) for v in trainer.strategy.reduce(tensor, reduce_op="mean"))))
        else:
            values = {name: value for name, value in values.items() if name in self._counters["forward"]}
        sums = self._sums[stage]
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        sums["count"] = sums.get("count", 0) + 1
        if stage != "train":
            return
        self.last_step = {
            "forward": values["nfe_forward"],
            "backward": values["nfe_backward"],
            **{name: value for name, value in values.items() if name.startswith("steps_")},
        }
        if self.log_steps and step_values_are_read(trainer):
            pl_module.log_dict(
                {f"train/{name}_step": value for name, value in values.items()}, on_step=True, on_epoch=False
            )
        if self.histogram_every_n_steps and trainer.global_step % self.histogram_every_n_steps == 0:
            self._draw_histogram(trainer)

    def _draw_histogram(self, trainer: pl.Trainer) -> None:
        """Add the log10 step sizes collected since the last histogram to every logger that draws histograms."""
        sizes, self._step_sizes = self._step_sizes, []
        if not sizes or not trainer.is_global_zero:
            return
        values = torch.cat(sizes).double().clamp_min(1e-300).log10().cpu()
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_histogram"):
                experiment.add_histogram("train/log10_step_size", values, global_step=trainer.global_step)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(trainer, "train")

    @override
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._counting = False  # forward is over; what follows in this step is not the training forward
        self._backward_start = self._totals("backward")

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        if not self._blocks:
            return
        for name, total in self._totals("backward").items():
            self._batch[name] += total - self._backward_start[name]

    def _totals(self, passage: str) -> dict[str, int]:
        return {name: sum(getattr(b, name) for b in self._blocks) for name in self._counters[passage]}

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end(trainer, pl_module, "train")

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "val")

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(trainer, pl_module, "val")

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "test")

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(trainer, pl_module, "test")

    # -- per epoch --------------------------------------------------------------------------------
    def _epoch_end(self, pl_module: pl.LightningModule, stage: str, trainer: pl.Trainer) -> None:
        sums, self._sums[stage] = self._sums[stage], {}
        if trainer.sanity_checking:
            return
        names = [name for names in self._counters.values() for name in names]
        if stage != "train":  # the per-batch values of this rank only: sum over the ranks' batches
            names = list(self._counters["forward"])
            totals = torch.tensor(
                [sums.get(name, 0.0) for name in names] + [sums.get("count", 0)],
                dtype=torch.float64,
                device=pl_module.device,
            )
            *values, count = (float(v) for v in trainer.strategy.reduce(totals, reduce_op="sum"))
            sums = {**dict(zip(names, values)), "count": count}
        count = sums.get("count", 0)
        if count == 0:
            return
        if stage == "train":
            metrics = {f"train/{name}_epoch": sums.get(name, 0.0) / count for name in names}
        else:
            metrics = {f"{stage}/{name}": sums[name] / count for name in names}
        self.epoch_history.append({"stage": stage, "epoch": trainer.current_epoch, **metrics})
        log_replicated(pl_module, metrics)  # the same on every rank: reduced per step (train) or above

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "train", trainer)
        if self._histogram:
            self._draw_histogram(trainer)

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "val", trainer)

    @override
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(pl_module, "test", trainer)

    # -- resume -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The NFE history and the running sums of the current training epoch (resumed mid-epoch alike)."""
        return {
            "epoch_history": list(self.epoch_history),
            "last_step": dict(self.last_step),
            "train_sums": dict(self._sums["train"]),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_history = list(state_dict["epoch_history"])
        self.last_step = dict(state_dict["last_step"])
        sums = state_dict["train_sums"]
        if isinstance(sums, (list, tuple)):  # written before solver statistics: [nfe_forward, nfe_backward, count]
            sums = dict(zip(("nfe_forward", "nfe_backward", "count"), sums))
        self._sums["train"] = dict(sums)
