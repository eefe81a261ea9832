"""Accuracy under white-box adversarial attacks (FGSM and L∞ PGD from advertorch), in pixel units.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM);
Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD);
the evaluation protocol of Kim et al.'s PR-Net paper, Table 4 (ε = 0.5/255, 1/255, 3/255).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection

from lightning_pdenets.callbacks._evaluation import (
    PixelSpace,
    accuracy_metrics,
    check_channel_stats,
    evaluation_pass,
    normalization_of,
    split_batch,
)
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.solvers import check_positive

__all__ = ["AdversarialEvaluation", "PixelSpace", "normalization_of", "parse_epsilon"]

ATTACKS = ("fgsm", "pgd")


def parse_epsilon(value: Union[float, int, str]) -> float:
    """An ε in [0, 1] pixel units from a number or a fraction string such as ``"3/255"``."""
    try:
        if isinstance(value, str):
            numerator, _, denominator = value.replace(" ", "").partition("/")
            epsilon = float(numerator) / float(denominator or 1)
        else:
            epsilon = float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise ValueError(f"`epsilons` entries must be numbers or fractions like '1/255', got {value!r}.") from None
    if isinstance(value, bool) or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"`epsilons` entries must lie in [0, 1] (pixel units, e.g. 1/255), got {value!r}.")
    return epsilon


def _label(epsilon: float) -> str:
    return f"eps{round(epsilon * 255, 4):g}"


class AdversarialEvaluation(Callback):
    """Top-1/top-5 accuracy under FGSM and L∞ PGD (advertorch) for several ε, at test time.

    Works on any ``LightningModule`` whose ``forward`` returns logits. ε is in [0, 1] pixel units
    whatever normalization the inputs carry: the batch is mapped back to pixels with the
    datamodule's ``mean``/``std`` (or the ``mean``/``std`` given here), attacked there, and the model
    is called through :class:`PixelSpace`. During attacks the model is in eval mode and its
    parameters' ``requires_grad`` and ``.grad`` are restored afterwards untouched.

    Logs ``adv/clean/top1``, ``adv/<attack>_eps<ε·255>/top1`` (and ``top5`` with more than 5 classes),
    e.g. ``adv/fgsm_eps1/top1``, and with a TensorBoard logger a figure of accuracy against ε.
    With ``every_n_val_epochs`` the same runs on validation batches under ``val_adv/``.

    Args:
        epsilons: Attack budgets in [0, 1] pixel units; numbers or strings like ``"1/255"``.
        attacks: Subset of ``("fgsm", "pgd")``.
        pgd_steps: Iterations of PGD.
        pgd_step_size: PGD step in pixel units; ``None`` uses 2.5·ε / ``pgd_steps`` (Madry et al.).
        pgd_random_init: Start PGD from a uniform random point of the ε-ball.
        num_batches: Batches attacked per test (or validation) run; ``None`` attacks all of them.
        every_n_val_epochs: Also attack during validation every N epochs; ``None`` only at test time.
        mean: Per-channel mean the inputs were standardized with (default: ``trainer.datamodule.mean``,
            else raw [0, 1] inputs).
        std: Per-channel standard deviation, as ``mean``.
        seed: Seed of PGD's random start (the global RNG is left untouched).
        log_figure: Add an accuracy-vs-ε figure to TensorBoard.
    """

    def __init__(
        self,
        epsilons: Sequence[Union[float, str]] = ("0.5/255", "1/255", "3/255"),
        attacks: Sequence[str] = ATTACKS,
        pgd_steps: int = 10,
        pgd_step_size: Optional[float] = None,
        pgd_random_init: bool = True,
        num_batches: Optional[int] = 10,
        every_n_val_epochs: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        seed: int = 0,
        log_figure: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, Sequence) or not epsilons:
            raise ValueError(f"`epsilons` must be a non-empty list such as ['1/255', '3/255'], got {epsilons!r}.")
        self.epsilons = sorted({parse_epsilon(e) for e in epsilons})
        if isinstance(attacks, str) or not attacks or any(a not in ATTACKS for a in attacks):
            raise ValueError(f"`attacks` must be a non-empty subset of {list(ATTACKS)}, got {attacks!r}.")
        self.attacks = list(dict.fromkeys(attacks))
        for name, value in (("pgd_steps", pgd_steps), ("num_batches", num_batches), ("every_n_val_epochs", every_n_val_epochs)):
            if value is None and name != "pgd_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer{'' if name == 'pgd_steps' else ' or None'}, got {value!r}.")
        if pgd_step_size is not None:
            check_positive(pgd_step_size, "pgd_step_size")
        check_channel_stats(mean, std)
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.pgd_random_init = pgd_random_init
        self.num_batches = num_batches
        self.every_n_val_epochs = every_n_val_epochs
        self.mean, self.std = mean, std
        self.seed = seed
        self.log_figure = log_figure
        self._metrics: dict[str, MetricCollection] = {}
        self._warned_raw_pixels = False

    # -- attacks --------------------------------------------------------------------------------
    def build_attack(self, name: str, predict: Callable[[torch.Tensor], torch.Tensor], epsilon: float) -> Any:
        """The advertorch attack ``name`` on ``predict`` (a pixel-space classifier) with budget ε."""
        from lightning_pdenets._compat.advertorch import import_advertorch_attacks

        attacks = import_advertorch_attacks()
        loss = nn.CrossEntropyLoss(reduction="sum")
        if name == "fgsm":
            return attacks.GradientSignAttack(predict, loss, eps=epsilon, clip_min=0.0, clip_max=1.0)
        step = self.pgd_step_size if self.pgd_step_size is not None else 2.5 * epsilon / self.pgd_steps
        return attacks.LinfPGDAttack(
            predict, loss, eps=epsilon, nb_iter=self.pgd_steps, eps_iter=step,
            rand_init=self.pgd_random_init, clip_min=0.0, clip_max=1.0,
        )

    def attack_batch(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, trainer: Optional["pl.Trainer"] = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Logits on the clean batch and under every attack, keyed ``clean`` / ``<attack>_eps<ε·255>``.

        ``x`` carries the model's input normalization; the model is restored as described above.
        """
        stats = normalization_of(trainer, self.mean, self.std)
        if stats is None and not self._warned_raw_pixels:
            self._warned_raw_pixels = True
            rank_zero_info(
                "AdversarialEvaluation: no `mean`/`std` given and the datamodule exposes none; "
                "treating the inputs as [0, 1] pixels."
            )
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with evaluation_pass(model, input_gradients=True):  # tensors made here are usable by autograd
            pixel_model = PixelSpace.for_batch(model, x, stats)
            pixels = pixel_model.to_pixels(x.detach().clone())
            labels = y.detach().clone()
            outputs = {"clean": pixel_model(pixels).detach()}
            for name in self.attacks:
                for epsilon in self.epsilons:
                    attack = self.build_attack(name, pixel_model, epsilon)
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(seed)
                        adversarial = attack.perturb(pixels, labels)
                    with torch.no_grad():
                        outputs[f"{name}_{_label(epsilon)}"] = pixel_model(adversarial)
        return outputs

    # -- Lightning hooks ------------------------------------------------------------------------
    def _update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.num_batches is not None and batch_idx >= self.num_batches:
            return
        x, y = split_batch(batch, type(self).__name__)
        outputs = self.attack_batch(pl_module, x, y, trainer, seed=self.seed + batch_idx)
        for key, logits in outputs.items():
            if key not in self._metrics:
                self._metrics[key] = accuracy_metrics(logits.shape[-1], logits.device)
            self._metrics[key].update(logits, y)

    def _val_epoch_selected(self, trainer: "pl.Trainer") -> bool:
        if self.every_n_val_epochs is None or trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_val_epochs == 0

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._metrics.clear()

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._metrics.clear()

    def on_test_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._update(trainer, pl_module, batch, batch_idx)

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._val_epoch_selected(trainer):
            self._update(trainer, pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._log(trainer, pl_module, "adv")

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._val_epoch_selected(trainer):
            self._log(trainer, pl_module, "val_adv")

    def _log(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", prefix: str) -> None:
        if not self._metrics:
            return
        results = {key: {k: float(v) for k, v in metrics.compute().items()} for key, metrics in self._metrics.items()}
        log_replicated(pl_module, {f"{prefix}/{key}/{k}": value for key, accuracies in results.items()
                                   for k, value in accuracies.items()})
        self._metrics.clear()
        if self.log_figure and trainer.is_global_zero:
            self._add_figure(trainer, prefix, results)

    def _add_figure(self, trainer: "pl.Trainer", prefix: str, results: dict[str, dict[str, float]]) -> None:
        experiments = [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_figure")]
        if not experiments:
            return
        from matplotlib.figure import Figure  # backend-free, safe in headless runs

        figure = Figure(figsize=(5, 3.5))
        axes = figure.add_subplot()
        clean = results["clean"]["top1"]
        for name in self.attacks:
            epsilons = [0.0] + [e * 255 for e in self.epsilons]
            accuracy = [clean] + [results[f"{name}_{_label(e)}"]["top1"] for e in self.epsilons]
            axes.plot(epsilons, accuracy, marker="o", label=name.upper())
        axes.set_xlabel("ε (× 1/255)")
        axes.set_ylabel("top-1 accuracy")
        axes.set_ylim(0, 1)
        axes.legend()
        axes.grid(alpha=0.3)
        for experiment in experiments:
            experiment.add_figure(f"{prefix}/accuracy_vs_eps", figure, global_step=trainer.global_step)
