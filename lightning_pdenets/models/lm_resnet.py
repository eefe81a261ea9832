"""LightningModules of Lu et al.'s CIFAR comparison: pre-activation ResNets and LM-ResNets.

Lu, Zhong, Li & Dong, "Beyond Finite Layer Neural Networks: Bridging Deep Architectures and
Numerical Differential Equations", ICML 2018. Defaults are the standard CIFAR recipe of He et al.:
SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4, ×0.1 at epochs 80 and 120 (of 160).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from typing_extensions import override

from lightning_pdenets.architectures.lm_resnet import PreActResNet
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.models.base import ClassifierModule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LMResNetModule", "ResNetCIFARModule", "check_stochastic_depth_strategy", "plot_lm_coefficients"]


class ResNetCIFARModule(ClassifierModule):
    """Pre-activation CIFAR ResNet-``depth`` (He et al. 2016), optionally with stochastic depth.

    ``network``: the arguments of :func:`lightning_pdenets.architectures.lm_resnet.preact_resnet_cifar` —
    ``depth`` (20, 32, 44, 56, 110 with basic blocks, 6n + 2, or 164 with bottlenecks, 9n + 2), ``block``,
    ``base_width`` (16 in the papers), ``stochastic_depth`` (Huang et al. 2016), ``survival_prob_last`` and
    ``stochastic_depth_mode`` (``batch``, one draw per mini-batch as in Huang et al., or ``sample``).

    Args:
        optimizer, lr, weight_decay, momentum, lr_scheduler, lr_milestones, lr_gamma: see
            :class:`ClassifierModule`; the defaults are the CIFAR recipe.
        **kwargs: Further settings of :class:`ClassifierModule` (``network``, ...).
    """

    network: PreActResNet
    architecture = "preact_resnet_cifar"

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        lr_scheduler: str = "multistep",
        lr_milestones: Sequence[int] = (80, 120),
        lr_gamma: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            lr_scheduler=lr_scheduler,
            lr_milestones=lr_milestones,
            lr_gamma=lr_gamma,
            **kwargs,
        )

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            network = self.hparams.network
            check_stochastic_depth_strategy(
                network["stochastic_depth"], network["stochastic_depth_mode"], self.trainer.strategy
            )


class LMResNetModule(ResNetCIFARModule):
    """LM-ResNet-``depth`` of Lu et al. 2018, logging the learned ``k_n`` to TensorBoard.

    At the end of every training epoch each LM block's ``k_n`` (channel mean for ``k_mode='channel'``)
    is logged as ``lm_k/stage{s}.block{b}``, and a figure of ``k_n`` against depth as
    ``lm_k/profile`` (also at the start of training, showing the initialization). In Lu et al.'s
    modified-equation view, ``(1 + k_n) u' + (1 - k_n) (Δt / 2) u'' ≈ f(u)``, so ``k_n`` sets a
    learned momentum (inertia) term of the underlying dynamics.

    ``network``: as :class:`ResNetCIFARModule`'s, and ``k_mode`` (``'scalar'``, one ``k_n`` per block, the
    paper's, or ``'channel'``) and ``k_init_range`` (``k_n`` uniform in ``[low, high]``, ``[-0.1, 0]`` in the paper).
    """

    architecture = "lm_resnet_cifar"

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self.log_lm_profile()

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        log_replicated(self, {f"lm_k/{name}": k.detach().mean() for name, k in self.network.lm_coefficients().items()})
        self.log_lm_profile()

    def log_lm_profile(self) -> None:
        """Add the figure of ``k_n`` against depth to every TensorBoard logger (no-op otherwise)."""
        loggers = [logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers or self.global_rank != 0:
            return
        figure = plot_lm_coefficients(
            self.network.lm_coefficients(),
            title=f"LM-ResNet-{self.hparams.network['depth']}, epoch {self.current_epoch}",
        )
        for logger in loggers:
            logger.experiment.add_figure("lm_k/profile", figure, global_step=self.global_step, close=False)


def check_stochastic_depth_strategy(stochastic_depth: bool, mode: str, strategy: Strategy) -> None:
    """Refuse batch-mode stochastic depth under DDP unless DDP looks for unused parameters.

    A dropped block's branch is not computed (Huang et al.'s speed-up), so its parameters get no
    gradient in that step, which DDP only accepts with ``find_unused_parameters=True``; without it
    Lightning fails at the second training step. Checked before training starts instead.
    """
    if not stochastic_depth or mode != "batch" or not isinstance(strategy, DDPStrategy):
        return
    # DDPStrategy keeps the DistributedDataParallel arguments only in this private attribute
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
    if ddp_kwargs is None or ddp_kwargs.get("find_unused_parameters", False):
        return
    raise ValueError(
        "stochastic_depth=True with stochastic_depth_mode='batch' skips dropped residual branches, so their "
        "parameters get no gradient in that step, which DDP refuses unless it looks for unused parameters. Use "
        "`--trainer.strategy ddp_find_unused_parameters_true` (or DDPStrategy(find_unused_parameters=True)), or "
        "`--model.init_args.stochastic_depth_mode sample` (computes every branch and drops it per sample)."
    )


def plot_lm_coefficients(coefficients: dict[str, torch.Tensor], title: str = "") -> Figure:
    """``k_n`` against block depth (with the channel range for channel-wise ``k``), stages shaded.

    Args:
        coefficients: ``{'stage{s}.block{b}': k}`` as returned by ``PreActResNet.lm_coefficients``.
        title: Figure title.
    """
    from matplotlib.figure import Figure  # only needed when a figure is drawn

    names = list(coefficients)
    values = [coefficients[name].detach().float().cpu().flatten() for name in names]
    means = [v.mean().item() for v in values]
    figure = Figure(figsize=(7, 3.2))
    axes = figure.add_subplot()
    positions = list(range(1, len(names) + 1))
    if any(v.numel() > 1 for v in values):  # channel-wise k: shade the range over channels
        lows, highs = [v.min().item() for v in values], [v.max().item() for v in values]
        axes.fill_between(positions, lows, highs, alpha=0.3, label="channel range")
    channelwise = any(v.numel() > 1 for v in values)
    axes.plot(positions, means, marker="o", markersize=3, label="channel mean of k_n" if channelwise else "k_n")
    stages = [name.split(".")[0] for name in names]
    for index in range(1, len(stages)):
        if stages[index] != stages[index - 1]:
            axes.axvline(index + 0.5, color="gray", linestyle=":", linewidth=1)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("LM block (depth order; dotted lines: stage transitions)")
    axes.set_ylabel("k_n")
    axes.set_title(title)
    if values:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure
