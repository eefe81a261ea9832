"""Accuracy under adversarial attacks (advertorch), in pixel units: white-box FGSM and L∞ PGD, black-box SPSA.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM);
Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD);
Uesato, O'Donoghue, van den Oord & Kohli, "Adversarial Risk and the Dangers of Evaluating Against Weak
Attacks", ICML 2018 (SPSA, gradient-free);
Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020 (AutoAttack: APGD-CE, APGD-T, FAB-T, Square; through torchattacks, an optional extra);
Huang, Yu, Zhang & Chen (MSML 2022): adaptive-step neural ODEs can mask gradients, so that PGD fails where
black-box attacks succeed;
the evaluation protocol of Kim et al.'s PR-Net paper, Table 4 (ε = 0.5/255, 1/255, 3/255).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_pdenets.callbacks._setup_checks import check_stats_match_data, data_num_classes
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import (
    PixelSpace,
    accuracy_metrics,
    add_figure,
    batch_positions,
    check_channel_stats,
    compute_on_every_rank,
    configured_solvers,
    derive_seed,
    evaluation_pass,
    normalization_of,
    running_loader,
    split_batch,
    unknown_order_message,
)
from lightning_pdenets.interruption import raise_if_stop_requested
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.protocols import find_ode_blocks
from lightning_pdenets.solvers import SolverConfig, SolverOptions
from lightning_pdenets.validation import check_bool, check_positive, check_positive_int

__all__ = ["AdversarialEvaluation", "PixelSpace", "normalization_of", "parse_epsilon", "worst_case_logits"]

WHITE_BOX_ATTACKS = ("fgsm", "pgd")
BLACK_BOX_ATTACKS = ("spsa",)
ENSEMBLE_ATTACKS = ("autoattack",)
"""Croce & Hein's AutoAttack (standard): three gradient-based stages, then the gradient-free Square."""
ATTACKS = WHITE_BOX_ATTACKS + BLACK_BOX_ATTACKS + ENSEMBLE_ATTACKS
AUTOATTACK_GRADIENT_KEY = "autoattack-fab-t"
"""Metric key of AutoAttack's robust set after its gradient-based stages (APGD-CE, APGD-T, FAB-T)."""


def parse_epsilon(value: float | int | str) -> float:
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


def worst_case_logits(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits (of one of several attacks) that rank the true class lowest.

    The true class is in the top k of the result exactly when it is in the top k under every attack, so the
    top-k accuracy of the result is the robust top-k accuracy against all of them together (a sample counts
    only if no attack fools it), never above the lowest single-attack accuracy.
    """
    stacked = torch.stack(list(logits))  # (attacks, batch, classes)
    true_logit = stacked.gather(2, targets.view(1, -1, 1).expand(stacked.shape[0], -1, 1))
    rank_of_true_class = (stacked > true_logit).sum(dim=2)
    worst = rank_of_true_class.argmax(dim=0)
    return stacked[worst, torch.arange(stacked.shape[1], device=stacked.device)]


def _autoattack_classes_message(found: str) -> str:
    return (
        f"AutoAttack's APGD-T and FAB-T need at least 3 classes (the DLR loss compares the top three logits), "
        f"but {found}; drop 'autoattack' from `attacks` for this model."
    )


class _StopChecked(nn.Module):
    """``model``, checking for SIGTERM before every query and naming the attack when it stops.

    One PGD, SPSA or AutoAttack run makes hundreds of queries and may take minutes.
    """

    def __init__(self, model: nn.Module, trainer: pl.Trainer | None, attack: str, epsilon: float, seed: int) -> None:
        super().__init__()
        self.model = model
        self._trainer, self._attack, self._epsilon, self._seed = trainer, attack, epsilon, seed

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        raise_if_stop_requested(
            self._trainer,
            lambda: (
                f"AdversarialEvaluation's {self._attack.upper()} attack at ε={self._epsilon:.4g} "
                f"(batch seed {self._seed})"
            ),
        )
        return self.model(inputs)


_PGD_STARTS, _BATCH_DRAWS = 0, 1
"""Streams of :func:`~lightning_pdenets.evaluation.derive_seed`: PGD's start per image, the other draws per batch."""


def _unit_starts(pixels: torch.Tensor, seed: int, sample_indices: torch.Tensor) -> torch.Tensor:
    """Uniform points of [-1, 1]^(C, H, W), one per image, each drawn from ``seed`` and the image's index only."""
    starts = []
    for index in sample_indices.tolist():
        generator = torch.Generator().manual_seed(derive_seed(seed, _PGD_STARTS, index))
        starts.append(torch.empty(pixels.shape[1:]).uniform_(-1.0, 1.0, generator=generator))
    return torch.stack(starts).to(pixels)


def _pgd_from(attack: Any, pixels: torch.Tensor, labels: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """advertorch's PGD ``attack`` on ``pixels`` from the offset ``start`` in place of its own (whole-batch) draw.

    What ``PGDAttack.perturb`` does with ``rand_init``, but for the draw: clip the start into the pixel range, then
    iterate.
    """
    from lightning_pdenets._compat.advertorch import import_advertorch_attacks

    iterate = import_advertorch_attacks().iterative_projected_gradient.perturb_iterative
    pixels = pixels.detach().clone()
    delta = nn.Parameter(torch.clamp(pixels + start, attack.clip_min, attack.clip_max) - pixels)
    return iterate(
        pixels,
        labels,
        attack.predict,
        nb_iter=attack.nb_iter,
        eps=attack.eps,
        eps_iter=attack.eps_iter,
        loss_fn=attack.loss_fn,
        minimize=attack.targeted,
        ord=attack.ord,
        clip_min=attack.clip_min,
        clip_max=attack.clip_max,
        delta_init=delta,
        l1_sparsity=attack.l1_sparsity,
    ).data


def _label(epsilon: float) -> str:
    return f"eps{round(epsilon * 255, 4):g}"


class AdversarialEvaluation(Callback):
    """Top-1/top-5 accuracy under white-box (FGSM, L∞ PGD) and black-box (L∞ SPSA) attacks for several ε.

    Works on any ``LightningModule`` whose ``forward`` returns logits. ε is in [0, 1] pixel units
    whatever normalization the inputs carry: the batch is mapped back to pixels with the
    datamodule's ``mean``/``std`` (or the ``mean``/``std`` given here), attacked there, and the model
    is called through :class:`PixelSpace`. During attacks the model is in eval mode and its
    parameters' ``requires_grad`` and ``.grad`` are restored afterwards untouched.

    **Gradient masking.** Adaptive-step neural ODEs can mask gradients (Huang et al., MSML 2022): PGD then
    fails while gradient-free attacks succeed, so a white-box number alone can overstate robustness. Hence:

    * ``"spsa"`` in ``attacks`` runs advertorch's ``LinfSPSAAttack`` (Uesato et al., ICML 2018), which only
      queries the model's outputs, on the first ``spsa_num_batches`` × (batch size) attacked images (it costs
      2·``spsa_samples``·``spsa_steps`` forward passes per image).
    * ``gradient_solver`` (e.g. ``{method: rk4, step_size: 0.1}``) crafts the white-box attacks with the ODE
      blocks (found through :class:`lightning_pdenets.protocols.ODESolverBlock`) switched to that stand-in
      solver; the blocks' own settings are restored exactly before the perturbed inputs are evaluated, so the
      attacked model keeps its own solver.
    * ``adv/robust_eps<ε·255>/top1`` is the robust accuracy against every attack run: a sample counts only
      if no attack at that ε fools it (on batches without SPSA, the white-box attacks), so it never exceeds
      the accuracy under any attack that ran on every attacked batch.
    * When a black-box attack's top-1 accuracy is lower than every white-box attack's at the same ε, on the
      same batches, by more than ``masking_margin``, ``adv/gradient_masking_eps<ε·255>`` is logged as 1 (else
      0) and a warning is given once per run.

    **AutoAttack.** ``"autoattack"`` in ``attacks`` runs the standard L∞ AutoAttack of Croce & Hein (ICML 2020)
    through torchattacks 3.5.1 (the optional extra ``pip install "lightning_pdenets[autoattack]"``; without it
    the constructor raises ``ImportError`` naming that command): APGD-CE, APGD-T and FAB-T (``autoattack_steps``
    iterations each, the paper's 100 by default; torchattacks' own ``AutoAttack`` would use 10), then the
    gradient-free Square (``autoattack_queries``), each stage on the images the earlier ones left correctly
    classified. It logs ``adv/autoattack_eps<ε·255>/top1`` (AutoAttack's robust accuracy) and the accuracy
    after each gradient-based stage, ``adv/autoattack-apgd-ce_…``, ``adv/autoattack-apgd-t_…`` and
    ``adv/autoattack-fab-t_…``. Its gradient-based stages differentiate through ``gradient_solver`` like FGSM
    and PGD; Square queries the model's own solver. When Square fools more than ``masking_margin`` of the
    images that every gradient-based stage left robust (AutoAttack's own sign of masked gradients), the
    masking flag is raised too; the accuracy after the gradient-based stages also counts as a white-box
    accuracy in the SPSA comparison.

    Logs ``adv/clean/top1``, ``adv/<attack>_eps<ε·255>/top1`` (and ``top5`` with more than 5 classes),
    e.g. ``adv/fgsm_eps1/top1`` (SPSA: on its batches only), the robust accuracy and masking flag above, and
    with a TensorBoard logger a figure of accuracy against ε. With ``every_n_val_epochs`` the same runs on
    validation batches under ``val_adv/``.

    **Processes.** ``num_batches`` and ``spsa_num_batches`` select images by their index in the evaluation set,
    and PGD's random start is drawn per image from ``seed`` and that index, so one process and N DDP processes
    attack the same images from the same starts (the index is read from the unshuffled evaluation loader:
    sequential, or Lightning's and torch's distributed samplers, which deal samples out to the ranks in turn; for
    another loader, batches are counted per process and seeded ``seed + batch_idx``, with a warning). SPSA's and
    AutoAttack's random draws are made per attacked batch (seeded from ``seed`` and the batch's first index), so
    their accuracies can differ slightly between process counts, as can everything of a model whose output for
    an image depends on the rest of its batch (e.g. an adaptive solver controlling its error over the batch).

    Args:
        epsilons: Attack budgets in [0, 1] pixel units; numbers or strings like ``"1/255"``.
        attacks: Subset of ``("fgsm", "pgd", "spsa", "autoattack")``.
        pgd_steps: Iterations of PGD.
        pgd_step_size: PGD step in pixel units; ``None`` uses 2.5·ε / ``pgd_steps`` (Madry et al.).
        pgd_random_init: Start PGD from a uniform random point of the ε-ball.
        num_batches: Attack the first ``num_batches`` × (per-process batch size) images of the test (or
            validation) set, whatever the number of processes; ``None`` attacks all of them.
        every_n_val_epochs: Also attack during validation every N epochs; ``None`` only at test time.
        mean: Per-channel mean the inputs were standardized with (default: ``trainer.datamodule.mean``,
            else raw [0, 1] inputs).
        std: Per-channel standard deviation, as ``mean``.
        seed: Seed of PGD's random start (per image), SPSA's samples and AutoAttack's draws (per batch); the global
            RNG is left untouched.
        log_figure: Add an accuracy-vs-ε figure to TensorBoard.
        spsa_num_batches: SPSA also attacks the first ``spsa_num_batches`` × (per-process batch size) of the
            attacked images; ``None``: all.
        spsa_steps: Adam iterations of SPSA.
        spsa_samples: Random directions of SPSA's gradient estimate per iteration.
        spsa_delta: Finite-difference step of SPSA, in pixel units (Uesato et al.: 0.01).
        spsa_lr: Adam learning rate of SPSA in pixel units; ``None`` uses 2.5·ε / ``spsa_steps``, as PGD's step.
        gradient_solver: Solver settings (:class:`~lightning_pdenets.solvers.SolverConfig` fields) of a stand-in
            through which the white-box attacks take their gradients; ``None``: the model's own solver.
        masking_margin: How much lower than every white-box accuracy a black-box accuracy must be to flag
            gradient masking, in [0, 1).
        autoattack_steps: Iterations of AutoAttack's APGD-CE, APGD-T and FAB-T (Croce & Hein: 100).
        autoattack_queries: Queries of AutoAttack's Square attack (Croce & Hein: 5,000).

    Raises:
        ValueError: on an argument outside its allowed values (the message names it).
        ImportError: when ``attacks`` holds ``"autoattack"`` and torchattacks is not installed.
    """

    def __init__(
        self,
        epsilons: Sequence[float | str] = ("0.5/255", "1/255", "3/255"),
        attacks: Sequence[str] = WHITE_BOX_ATTACKS,
        pgd_steps: int = 10,
        pgd_step_size: float | None = None,
        pgd_random_init: bool = True,
        num_batches: int | None = 10,
        every_n_val_epochs: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        log_figure: bool = True,
        spsa_num_batches: int | None = 1,
        spsa_steps: int = 20,
        spsa_samples: int = 64,
        spsa_delta: float = 0.01,
        spsa_lr: float | None = None,
        gradient_solver: SolverOptions | None = None,
        masking_margin: float = 0.0,
        autoattack_steps: int = 100,
        autoattack_queries: int = 5000,
    ) -> None:
        super().__init__()
        if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, Sequence) or not epsilons:
            raise ValueError(f"`epsilons` must be a non-empty list such as ['1/255', '3/255'], got {epsilons!r}.")
        self.epsilons = sorted({parse_epsilon(e) for e in epsilons})
        if isinstance(attacks, str) or not attacks or any(a not in ATTACKS for a in attacks):
            raise ValueError(f"`attacks` must be a non-empty subset of {list(ATTACKS)}, got {attacks!r}.")
        self.attacks = list(dict.fromkeys(attacks))
        check_positive_int(pgd_steps, "pgd_steps")
        check_bool(pgd_random_init, "pgd_random_init")
        check_bool(log_figure, "log_figure")
        check_positive_int(seed, "seed", minimum=0)
        check_positive_int(num_batches, "num_batches", allow_none=True)
        check_positive_int(every_n_val_epochs, "every_n_val_epochs", allow_none=True)
        if pgd_step_size is not None:
            check_positive(pgd_step_size, "pgd_step_size")
        check_channel_stats(mean, std)
        if spsa_num_batches is not None:
            check_positive_int(spsa_num_batches, "spsa_num_batches")
        for name, value in (("spsa_steps", spsa_steps), ("spsa_samples", spsa_samples)):
            check_positive_int(value, name)
        check_positive(spsa_delta, "spsa_delta")
        check_positive(spsa_lr, "spsa_lr", allow_none=True)
        if gradient_solver is not None:
            SolverConfig.from_options(gradient_solver, argument="gradient_solver")  # raises naming the bad setting
            if not any(a in WHITE_BOX_ATTACKS + ENSEMBLE_ATTACKS for a in self.attacks):
                raise ValueError(
                    f"`gradient_solver` sets the solver that white-box attacks differentiate through, but `attacks` "
                    f"{self.attacks} has none; add 'fgsm', 'pgd' or 'autoattack', or drop `gradient_solver`."
                )
        check_positive_int(autoattack_steps, "autoattack_steps")
        check_positive_int(autoattack_queries, "autoattack_queries")
        if "autoattack" in self.attacks:
            from lightning_pdenets._compat.torchattacks import import_torchattacks

            import_torchattacks()  # fails now, with the install command, rather than at the first test batch
        if (
            isinstance(masking_margin, bool)
            or not isinstance(masking_margin, (int, float))
            or not 0 <= masking_margin < 1
        ):
            raise ValueError(f"`masking_margin` must be an accuracy difference in [0, 1), got {masking_margin!r}.")
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.pgd_random_init = pgd_random_init
        self.num_batches = num_batches
        self.every_n_val_epochs = every_n_val_epochs
        self.mean, self.std = mean, std
        self.seed = seed
        self.log_figure = log_figure
        self.spsa_num_batches = spsa_num_batches
        self.spsa_steps = spsa_steps
        self.spsa_samples = spsa_samples
        self.spsa_delta = float(spsa_delta)
        self.spsa_lr = spsa_lr
        self.gradient_solver = dict(gradient_solver) if gradient_solver is not None else None
        self.masking_margin = float(masking_margin)
        self.autoattack_steps = autoattack_steps
        self.autoattack_queries = autoattack_queries
        self._metrics: dict[str, MetricCollection] = {}
        self._black_box_batch_metrics: dict[str, MetricCollection] = {}
        self._warned_raw_pixels = False
        self._warned_no_ode_blocks = False
        self._warned_masking = False
        self._warned_order = False

    # -- attacks --------------------------------------------------------------------------------
    def build_attack(self, name: str, predict: Callable[[torch.Tensor], torch.Tensor], epsilon: float) -> Any:
        """The advertorch attack ``name`` on ``predict`` (a pixel-space classifier) with budget ε."""
        from lightning_pdenets._compat.advertorch import import_advertorch_attacks

        attacks = import_advertorch_attacks()
        loss = nn.CrossEntropyLoss(reduction="sum")
        if name == "fgsm":
            return attacks.GradientSignAttack(predict, loss, eps=epsilon, clip_min=0.0, clip_max=1.0)
        if name == "spsa":
            lr = self.spsa_lr if self.spsa_lr is not None else 2.5 * epsilon / self.spsa_steps
            return attacks.LinfSPSAAttack(
                predict,
                eps=epsilon,
                delta=self.spsa_delta,
                lr=lr,
                nb_iter=self.spsa_steps,
                nb_sample=self.spsa_samples,
                max_batch_size=min(self.spsa_samples, 32),
                clip_min=0.0,
                clip_max=1.0,
            )
        step = self.pgd_step_size if self.pgd_step_size is not None else 2.5 * epsilon / self.pgd_steps
        return attacks.LinfPGDAttack(
            predict,
            loss,
            eps=epsilon,
            nb_iter=self.pgd_steps,
            eps_iter=step,
            rand_init=self.pgd_random_init,
            clip_min=0.0,
            clip_max=1.0,
        )

    def _gradient_solver(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The stand-in solver of the white-box attacks on ``model``'s ODE blocks, restored on exit."""
        if self.gradient_solver is None:
            return contextlib.nullcontext()
        blocks = find_ode_blocks(model)
        if not blocks and not self._warned_no_ode_blocks:
            self._warned_no_ode_blocks = True
            rank_zero_warn(
                f"AdversarialEvaluation: `gradient_solver` is set but {type(model).__name__} has no ODE block "
                f"(lightning_pdenets.protocols.ODESolverBlock); the attacks differentiate the model as it is."
            )
        return configured_solvers(blocks, **self.gradient_solver)

    def autoattack(
        self,
        model: nn.Module,
        pixel_model: nn.Module,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        epsilon: float,
        seed: int = 0,
    ) -> dict[tuple[str, float], torch.Tensor]:
        """Standard AutoAttack (Croce & Hein, ICML 2020) on ``pixel_model`` at ε; adversarial pixels per stage.

        Keys ``("autoattack-apgd-ce", ε)``, ``("autoattack-apgd-t", ε)``, ``("autoattack-fab-t", ε)`` (the images
        after that stage and the earlier ones) and ``("autoattack", ε)`` (after Square: AutoAttack's result).
        The gradient-based stages differentiate ``model``'s ODE blocks through ``gradient_solver`` when it is set.
        Call it inside the evaluation pass of :meth:`attack_batch` (autograd on, parameters frozen).
        """
        from lightning_pdenets._compat.torchattacks import run_autoattack

        with torch.no_grad():
            num_classes = pixel_model(pixels[:1]).shape[-1]
        if num_classes < 3:
            raise ConfigurationError(_autoattack_classes_message(f"the model returns {num_classes}"))
        stages = run_autoattack(
            pixel_model,
            pixels,
            labels,
            epsilon,
            num_classes,
            seed=seed,
            steps=self.autoattack_steps,
            queries=self.autoattack_queries,
            gradient_context=lambda: self._gradient_solver(model),
        )
        return {
            ("autoattack" if stage == "square" else f"autoattack-{stage}", epsilon): images
            for stage, images in stages.items()
        }

    def attack_batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        trainer: pl.Trainer | None = None,
        seed: int = 0,
        black_box: bool = True,
        sample_indices: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits on the clean batch, under every attack and in the worst case over the attacks, per ε.

        Keys: ``clean``, ``<attack>_eps<ε·255>`` and ``robust_eps<ε·255>`` (:func:`worst_case_logits`), and with
        AutoAttack also ``autoattack-<stage>_eps<ε·255>`` after its gradient-based stages (:meth:`autoattack`).
        ``x`` carries the model's input normalization; the model is restored as described above.
        ``black_box=False`` skips the black-box attacks. With ``sample_indices`` (one per image, e.g. its index in
        the evaluation set) PGD starts each image from a point drawn from ``seed`` and its index only, and SPSA and
        AutoAttack draw from a seed derived from ``seed`` and the first index; without, every attack draws under
        ``seed`` for the whole batch.
        """
        if sample_indices is not None and len(sample_indices) != x.shape[0]:
            raise ValueError(f"{len(sample_indices)} `sample_indices` for a batch of {x.shape[0]}; give one per image.")
        batch_seed = seed if sample_indices is None else derive_seed(seed, _BATCH_DRAWS, int(sample_indices[0]))
        stats = normalization_of(trainer, self.mean, self.std)
        if stats is None and not self._warned_raw_pixels:
            self._warned_raw_pixels = True
            rank_zero_info(
                "AdversarialEvaluation: no `mean`/`std` given and the datamodule exposes none; "
                "treating the inputs as [0, 1] pixels."
            )
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        attacks = [a for a in self.attacks if black_box or a not in BLACK_BOX_ATTACKS]
        adversarial: dict[tuple[str, float], torch.Tensor] = {}
        # one line per batch under the trainer's own bar (rank 0, when the trainer shows bars), or on its own outside
        # a trainer (a bench script): an attack grid of a batch can take minutes
        show = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)
        crafts = len(self.epsilons) * len(attacks)  # every attack, AutoAttack too, once per ε
        progress = tqdm(
            total=crafts, desc="AdversarialEvaluation", unit="attack", leave=False, disable=not show, dynamic_ncols=True
        )
        with progress, evaluation_pass(model, input_gradients=True):  # tensors made here are usable by autograd
            pixel_model = PixelSpace.for_batch(model, x, stats, type(self).__name__)
            pixels = pixel_model.to_pixels(x.detach().clone())
            labels = y.detach().clone()

            def craft(name: str, epsilon: float) -> None:
                checked = _StopChecked(pixel_model, trainer, name, epsilon, batch_seed)
                attack = self.build_attack(name, checked, epsilon)
                progress.set_postfix_str(f"{name.upper()} ε={epsilon:.4g}")
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(batch_seed)
                    if name == "pgd" and self.pgd_random_init and sample_indices is not None:
                        start = _unit_starts(pixels, seed, sample_indices)
                        adversarial[name, epsilon] = _pgd_from(attack, pixels, labels, epsilon * start).detach()
                    else:
                        adversarial[name, epsilon] = attack.perturb(pixels, labels).detach()
                progress.update()

            with self._gradient_solver(model):
                for name in (a for a in attacks if a in WHITE_BOX_ATTACKS):
                    for epsilon in self.epsilons:
                        craft(name, epsilon)
            for name in (a for a in attacks if a in BLACK_BOX_ATTACKS):  # they query the model's own solver
                for epsilon in self.epsilons:
                    craft(name, epsilon)
            for epsilon in self.epsilons if "autoattack" in attacks else ():
                progress.set_postfix_str(f"AutoAttack ε={epsilon:.4g}")
                checked = _StopChecked(pixel_model, trainer, "autoattack", epsilon, batch_seed)
                with torch.random.fork_rng(devices=devices):
                    adversarial.update(self.autoattack(model, checked, pixels, labels, epsilon, batch_seed))
                progress.update()
            with torch.no_grad():
                outputs = {"clean": pixel_model(pixels)}
                outputs.update(
                    {f"{name}_{_label(eps)}": pixel_model(inputs) for (name, eps), inputs in adversarial.items()}
                )
        for epsilon in self.epsilons if attacks else ():
            per_attack = [outputs[f"{name}_{_label(epsilon)}"] for name in attacks]
            outputs[f"robust_{_label(epsilon)}"] = worst_case_logits(per_attack, labels)
        return outputs

    # -- Lightning hooks ------------------------------------------------------------------------
    def _update(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        stage: Literal["test", "validate"],
        dataloader_idx: int,
    ) -> None:
        x, y = split_batch(batch, type(self).__name__)
        loader = running_loader(trainer, stage, dataloader_idx)
        positions = batch_positions(loader, batch_idx, len(y))
        if positions.indices is None and not self._warned_order:
            self._warned_order = True
            rank_zero_warn(unknown_order_message(type(self).__name__, loader, self.num_batches))
        attacked = positions.among_first(self.num_batches)
        if any(a in BLACK_BOX_ATTACKS for a in self.attacks):
            black_box = attacked & positions.among_first(self.spsa_num_batches)
        else:
            black_box = torch.zeros_like(attacked)
        # the images SPSA attacks and the others (a batch may straddle the limit): one attack_batch each
        for rows, with_black_box in ((black_box, True), (attacked & ~black_box, False)):
            if not rows.any():
                continue
            xs, ys = (x, y) if rows.all() else (x[rows.to(x.device)], y[rows.to(y.device)])
            if positions.indices is None:
                outputs = self.attack_batch(pl_module, xs, ys, trainer, self.seed + batch_idx, with_black_box)
            else:
                outputs = self.attack_batch(
                    pl_module, xs, ys, trainer, self.seed, with_black_box, sample_indices=positions.indices[rows]
                )
            for key, logits in outputs.items():
                self._accumulate(self._metrics, key, logits, ys)
                # every attack (and AutoAttack's stages, "autoattack-<stage>") on the samples SPSA also attacked
                if with_black_box and key.split("_")[0].partition("-")[0] in ATTACKS:
                    self._accumulate(self._black_box_batch_metrics, key, logits, ys)

    @staticmethod
    def _accumulate(
        metrics: dict[str, MetricCollection], key: str, logits: torch.Tensor, targets: torch.Tensor
    ) -> None:
        if key not in metrics:
            metrics[key] = accuracy_metrics(logits.shape[-1], device=logits.device)
        metrics[key].update(logits, targets)

    def _val_epoch_selected(self, trainer: pl.Trainer) -> bool:
        if self.every_n_val_epochs is None or trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_val_epochs == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # settings that contradict the data end the run before it starts, not at the end of a fit's first validation
        check_stats_match_data(type(self).__name__, self.mean, trainer)
        num_classes = data_num_classes(trainer)
        if "autoattack" in self.attacks and num_classes is not None and num_classes < 3:
            datamodule = type(trainer.datamodule).__name__  # type: ignore[attr-defined]  # Lightning sets it
            raise ConfigurationError(_autoattack_classes_message(f"{datamodule} has {num_classes} classes"))

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.clear()
        self._black_box_batch_metrics.clear()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.clear()
        self._black_box_batch_metrics.clear()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, batch, batch_idx, "test", dataloader_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._val_epoch_selected(trainer):
            self._update(trainer, pl_module, batch, batch_idx, "validate", dataloader_idx)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "adv")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_epoch_selected(trainer):
            self._log(trainer, pl_module, "val_adv")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        # every rank computes, even one that attacked no batch: compute() is a collective
        results = compute_on_every_rank(trainer, self._metrics, pl_module.device)
        black_box = compute_on_every_rank(trainer, self._black_box_batch_metrics, pl_module.device)
        self._metrics.clear()
        self._black_box_batch_metrics.clear()
        if not results:
            return
        metrics = {
            f"{prefix}/{key}/{k}": value for key, accuracies in results.items() for k, value in accuracies.items()
        }
        metrics.update(
            {
                f"{prefix}/gradient_masking_{_label(eps)}": float(flag)
                for eps, flag in self.gradient_masking(results, black_box).items()
            }
        )
        log_replicated(pl_module, metrics)
        if self.log_figure:
            add_figure(trainer, f"{prefix}/accuracy_vs_eps", lambda: self.figure(results))

    def gradient_masking(
        self,
        results: dict[str, dict[str, float]] | None = None,
        black_box_results: dict[str, dict[str, float]] | None = None,
    ) -> dict[float, bool]:
        """Per ε, whether a gradient-free attack fooled images that the gradient-based attacks could not.

        Two signs, either raises the flag (Huang et al., MSML 2022; Croce & Hein, ICML 2020, section 5):

        * SPSA's top-1 accuracy is lower than every white-box attack's (FGSM, PGD, and AutoAttack after its
          gradient-based stages), on the batches SPSA attacked, by more than ``masking_margin``;
        * AutoAttack's Square lowers the accuracy that APGD-CE, APGD-T and FAB-T left by more than
          ``masking_margin``, on all attacked batches.

        Reads ``results`` and ``black_box_results`` (all ranks together, from the epoch's end), or without them the
        accuracies this process accumulated since the epoch started; warns once per run;
        empty when neither check could run (no black-box attack beside a white-box one, and no AutoAttack).
        """
        if results is None or black_box_results is None:  # accumulated so far, on this process
            results = compute_on_every_rank(None, self._metrics, torch.device("cpu"))
            black_box_results = compute_on_every_rank(None, self._black_box_batch_metrics, torch.device("cpu"))
        top1 = {key: values["top1"] for key, values in black_box_results.items()}
        ensemble = {key: values["top1"] for key, values in results.items() if key.startswith("autoattack")}
        flags: dict[float, bool] = {}
        for epsilon in self.epsilons:
            label = _label(epsilon)
            causes: list[str] = []
            white = [top1[k] for a in (*WHITE_BOX_ATTACKS, AUTOATTACK_GRADIENT_KEY) if (k := f"{a}_{label}") in top1]
            black = {a: top1[k] for a in BLACK_BOX_ATTACKS if (k := f"{a}_{label}") in top1}
            gradient, final = ensemble.get(f"{AUTOATTACK_GRADIENT_KEY}_{label}"), ensemble.get(f"autoattack_{label}")
            if not (white and black) and (gradient is None or final is None):
                continue
            if white and black:
                name, accuracy = min(black.items(), key=lambda item: item[1])
                if accuracy < min(white) - self.masking_margin:
                    causes.append(
                        f"the black-box attack {name.upper()} brings top-1 accuracy down to {accuracy:.3f} "
                        f"at ε={epsilon:.4g}, below every white-box attack ({min(white):.3f})"
                    )
            if gradient is not None and final is not None and final < gradient - self.masking_margin:
                causes.append(
                    f"AutoAttack's gradient-free Square attack brings top-1 accuracy from {gradient:.3f} "
                    f"(after APGD-CE, APGD-T and FAB-T) down to {final:.3f} at ε={epsilon:.4g}"
                )
            flags[epsilon] = bool(causes)
            if causes and not self._warned_masking:
                self._warned_masking = True
                rank_zero_warn(
                    f"AdversarialEvaluation: {'; '.join(causes)}: the model's gradients may be masked (Huang et al., "
                    f"MSML 2022), so white-box accuracy overstates its robustness. Report the robust accuracy "
                    f"(adv/robust_*), and for ODE models try `gradient_solver` (e.g. {{method: rk4, step_size: 0.1}})."
                )
        return flags

    def figure(self, results: dict[str, dict[str, float]]) -> Any:
        """Matplotlib figure of top-1 accuracy against ε per attack (and robust), from ``{key: {"top1": ...}}``."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5, 3.5))
        axes = figure.add_subplot()
        clean = results["clean"]["top1"]
        for name in self.attacks + (["robust"] if len(self.attacks) > 1 else []):
            points = [
                (e * 255, results[key]["top1"]) for e in self.epsilons if (key := f"{name}_{_label(e)}") in results
            ]
            if points:
                epsilons, accuracy = zip(*[(0.0, clean), *points])
                axes.plot(epsilons, accuracy, marker="o", label=name.upper() if name != "robust" else "robust (all)")
        axes.set_xlabel("ε (× 1/255)")
        axes.set_ylabel("top-1 accuracy")
        axes.set_ylim(0, 1)
        axes.legend()
        axes.grid(alpha=0.3)
        return figure
