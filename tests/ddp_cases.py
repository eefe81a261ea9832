"""The DDP test matrix: one tiny training case per LightningModule and per callback.

``tests/ddp_runner.py`` runs every case once on 2 gloo processes (per-process batch ``b``) and
once on a single process (batch ``2b``); ``tests/test_ddp.py`` then checks that both ranks hold
identical parameters, buffers, solver settings and logged metrics, and that they match the
single process within the case's tolerance. Adding a LightningModule or a callback means adding
one case here (``test_every_module_and_callback_has_a_ddp_case`` enforces it).

Every case is deterministic and, but for the stochastic-depth case, random-free in training, and
models with BatchNorm train with frozen BatchNorm statistics (see ``DDPCase.freeze_batchnorm``), so
that one process with the whole batch is the exact reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning.pytorch as pl
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_pdenets import callbacks as cb
from lightning_pdenets import models
from lightning_pdenets.data import ConcentricSpheresDataModule, DigitsDataModule
from lightning_pdenets.protocols import find_ode_blocks


class RaiseAtStep(pl.Callback):
    """Raises the same ``RuntimeError`` on every rank once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated failure after {self.step} steps")


class FailSolverOnRank(pl.Callback):
    """From optimizer step ``step`` on, rank ``rank``'s ODE solvers may take only one step, so they fail there only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            for block in find_ode_blocks(pl_module):
                block.configure_solver(max_num_steps=1)


class FailSolverInValidationOnRank(pl.Callback):
    """In validation, rank ``rank``'s ODE solvers may take only one step, so they fail there only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_rank == self.rank:
            for block in find_ode_blocks(pl_module):
                block.configure_solver(max_num_steps=1)


class StiffInBackwardOnRank(pl.Callback):
    """From optimizer step ``step`` on, rank ``rank``'s vector fields blow up during the adjoint (backward) solve only,
    so that dopri5 fails inside ``loss.backward()`` on that rank, after the forward passes agreed."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        for block in find_ode_blocks(pl_module):
            if "forward" in vars(block.field):
                continue
            original = block.field.forward

            def stiff_in_backward(t, y, original=original, block=block):
                out = original(t, y)
                return out if block._solving_forward else out * 1e6  # stiff, finite: the steps shrink

            block.field.forward = stiff_in_backward


class FreezeBatchNorm(pl.Callback):
    """Puts every BatchNorm layer in eval mode before each training batch (Lightning re-enables train mode)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


@dataclass(frozen=True)
class DDPCase:
    """One run of the matrix.

    Attributes:
        covers: Names of the LightningModule and callback classes this case exercises.
        model: Builds the (tiny) LightningModule.
        data: Builds the datamodule for a per-process batch size.
        callbacks: Builds the callbacks under test.
        train_batches: Training batches per epoch.
        epochs: Training epochs.
        test: Also run ``trainer.test`` (evaluation callbacks).
        predict: Also run ``trainer.predict``.
        freeze_batchnorm: Keep BatchNorm layers in eval mode while training. torch's SyncBatchNorm
            runs on GPUs only, so on CPU each rank would normalize with its own half-batch
            statistics; frozen, everything else (affine weights included) compares exactly.
        atol: Tolerance of the single-process comparison of parameters, buffers and metrics.
        expect_error: The run is meant to stop with this exception message (fault cases).
        rank_errors: For faults on one rank only: the exception class each rank (0, 1) must stop
            with; the single-process comparison is then skipped.
        rank_only_metrics: Substrings of metric names compared across ranks only, because their value
            depends on the layout by nature (wall time; the NFE of an adaptive solver on half a batch).
        breaks_process_group: The case ends with the process group closed (a failure inside backward
            or evaluation); it runs in a 2-rank launch of its own.
        strategy: The Trainer's strategy on 2 ranks.
    """

    covers: tuple[str, ...]
    model: Callable[[], pl.LightningModule]
    data: Callable[[int], pl.LightningDataModule] = field(default=lambda batch: DigitsDataModule(batch_size=batch))
    callbacks: Callable[[], list[pl.Callback]] = field(default=list)
    train_batches: int = 3
    epochs: int = 1
    test: bool = False
    predict: bool = False
    freeze_batchnorm: bool = False
    atol: float = 1e-5
    expect_error: str = ""
    rank_errors: tuple[str, ...] = ()
    rank_only_metrics: tuple[str, ...] = ()
    breaks_process_group: bool = False
    strategy: str = "ddp"


# Plain SGD throughout: Adam divides by sqrt(v), which turns float-noise gradients (e.g. of a conv bias
# in front of a GroupNorm, mathematically zero) into lr-sized steps that differ between layouts.
SGD = dict(optimizer="sgd", momentum=0.0)
CHEN_TINY = dict(network=dict(width=8, num_downsamples=1), **SGD)
PDE_CNN_TINY = dict(in_channels=1, network=dict(widths=[4, 8], num_steps=2), lr=0.05, **SGD)
MOBILENET_TINY = dict(
    in_channels=1,
    num_classes=10,
    network=dict(channels=16, expanded_channels=32, num_blocks=2, patch_size=4, dropout=0.0),
    **SGD,
)
CIFAR_TINY = dict(in_channels=1, network=dict(base_width=4), lr=0.05, **SGD)


def with_network(settings: dict, **network) -> dict:
    """Model arguments ``settings`` with the given architecture arguments added to their ``network``."""
    return {**settings, "network": {**settings["network"], **network}}


def rknet() -> pl.LightningModule:
    return models.RKNetModule(solver=dict(step_size=0.5), **CHEN_TINY, lr=0.1)


def parabolic() -> pl.LightningModule:
    return models.ParabolicCNNModule(**PDE_CNN_TINY)


CASES: dict[str, DDPCase] = {
    # -- one per LightningModule ----------------------------------------------------------------
    "resnet": DDPCase(("ResNetModule",), lambda: models.ResNetModule(**with_network(CHEN_TINY, num_blocks=2), lr=0.1)),
    "rknet": DDPCase(("RKNetModule",), rknet),
    # dopri5 controls its error over the whole batch, so each rank's half-batch takes other steps
    # than the full batch: at rtol=atol=1e-6 the logits differ by ~1e-4 and the gradients by a few
    # percent (measured), hence the small lr and the wider tolerance of the adaptive cases
    "odenet": DDPCase(
        ("ODENetModule",),
        lambda: models.ODENetModule(solver=dict(rtol=1e-6, atol=1e-6), **CHEN_TINY, lr=0.01),
        atol=1e-3,
        rank_only_metrics=("nfe",),
    ),
    "prnet": DDPCase(
        ("PRNetModule",),
        lambda: models.PRNetModule(
            **CHEN_TINY, image_size=8, theta=dict(optimizer="sgd", lr=0.05), query=dict(optimizer="sgd", lr=0.05)
        ),
    ),
    "parabolic": DDPCase(("ParabolicCNNModule",), parabolic, freeze_batchnorm=True),
    "hamiltonian": DDPCase(
        ("HamiltonianCNNModule",), lambda: models.HamiltonianCNNModule(**PDE_CNN_TINY), freeze_batchnorm=True
    ),
    "second_order_reversible": DDPCase(
        ("SecondOrderCNNModule",),
        lambda: models.SecondOrderCNNModule(**with_network(PDE_CNN_TINY, reversible=True)),
        freeze_batchnorm=True,
    ),
    "resnet_cifar": DDPCase(
        ("ResNetCIFARModule",),
        lambda: models.ResNetCIFARModule(**with_network(CIFAR_TINY, depth=20)),
        freeze_batchnorm=True,
    ),
    "lm_resnet": DDPCase(
        ("LMResNetModule",), lambda: models.LMResNetModule(**with_network(CIFAR_TINY, depth=20)), freeze_batchnorm=True
    ),
    # the one random case: every rank and the single process draw the same blocks to drop (same seed,
    # same draws); a dropped branch leaves its parameters without gradient, hence find_unused_parameters
    "lm_resnet_stochastic_depth": DDPCase(
        ("LMResNetModule",),
        lambda: models.LMResNetModule(**with_network(CIFAR_TINY, depth=20, stochastic_depth=True)),
        freeze_batchnorm=True,
        strategy="ddp_find_unused_parameters_true",
    ),
    "vector_ode": DDPCase(
        ("VectorODEClassifierModule",),
        lambda: models.VectorODEClassifierModule(
            solver=dict(method="rk4", step_size=0.25), input_dim=2, network=dict(hidden_width=16), lr=0.1, **SGD
        ),
        data=lambda batch: ConcentricSpheresDataModule(dim=2, num_train=96, num_val=32, num_test=32, batch_size=batch),
    ),
    "image_ode": DDPCase(
        ("ImageODEClassifierModule",),
        lambda: models.ImageODEClassifierModule(
            in_channels=1, image_size=8, network=dict(hidden_channels=4), solver=dict(step_size=0.5), lr=0.1, **SGD
        ),
    ),
    "mobilenet": DDPCase(
        ("IsometricMobileNetModule",), lambda: models.IsometricMobileNetModule(**MOBILENET_TINY), freeze_batchnorm=True
    ),
    "ode_mobilenet": DDPCase(
        ("ODEMobileNetModule",),
        lambda: models.ODEMobileNetModule(**MOBILENET_TINY, solver=dict(method="rk4", step_size=0.5, adjoint=False)),
        freeze_batchnorm=True,
    ),
    "prnet_mobilenet": DDPCase(
        ("PRNetMobileNetModule",),
        lambda: models.PRNetMobileNetModule(
            **MOBILENET_TINY,
            image_size=8,
            max_power=2,
            max_derivative_order=1,
            theta=dict(optimizer="sgd"),
            query=dict(optimizer="sgd"),
        ),
        freeze_batchnorm=True,
    ),
    # -- one per callback -------------------------------------------------------------------------
    "step_size_adaptation": DDPCase(
        ("StepSizeAdaptation",),
        rknet,
        # a fixed first step: Hairer's estimate reads the (per-rank) batch
        callbacks=lambda: [cb.StepSizeAdaptation(interval=1, threshold=0.5, initial_step_size=0.25)],
    ),
    "tolerance_adaptation": DDPCase(
        ("ToleranceAdaptation",),
        lambda: models.ODENetModule(solver=dict(rtol=1e-6, atol=1e-6, adjoint=False), **CHEN_TINY, lr=0.01),
        callbacks=lambda: [cb.ToleranceAdaptation(interval=1, initial_tol=1e-6, test_solver="dopri5")],
        atol=1e-3,
        rank_only_metrics=("nfe",),
    ),
    "solver_swap": DDPCase(
        ("SolverSwapCheck",),
        rknet,
        test=True,
        callbacks=lambda: [
            cb.SolverSwapCheck(solvers=["euler", "rk4"], step_factors=[0.5, 1.0], max_batches=2, log_figure=False)
        ],
    ),
    "nfe_monitor": DDPCase(("NFEMonitor",), rknet, test=True, callbacks=lambda: [cb.NFEMonitor()]),
    # 17 evaluation samples: rank 0 evaluates 2 batches (8 + 1), rank 1 one batch (8), one process 2 (16 + 1);
    # no per-batch collective may run in evaluation
    "nfe_monitor_uneven_evaluation": DDPCase(
        ("NFEMonitor",),
        lambda: models.VectorODEClassifierModule(
            solver=dict(method="rk4", step_size=0.25), input_dim=2, network=dict(hidden_width=16), lr=0.1, **SGD
        ),
        data=lambda batch: ConcentricSpheresDataModule(dim=2, num_train=96, num_val=17, num_test=17, batch_size=batch),
        test=True,
        callbacks=lambda: [cb.NFEMonitor()],
    ),
    # solver statistics of an adaptive solver with an adjoint: accepted/rejected steps reduced over the ranks like
    # the NFE (the ranks log the same values); they depend on the half-batch, like the NFE
    "nfe_monitor_solver_statistics": DDPCase(
        ("NFEMonitor",),
        lambda: models.ODENetModule(solver=dict(rtol=1e-6, atol=1e-6, first_step=0.5), **CHEN_TINY, lr=0.01),
        test=True,
        callbacks=lambda: [cb.NFEMonitor()],
        atol=1e-3,
        rank_only_metrics=("nfe", "steps_"),
    ),
    "time_tv": DDPCase(
        ("TimeTVRegularization",),
        parabolic,
        freeze_batchnorm=True,
        callbacks=lambda: [cb.TimeTVRegularization(alpha=0.1)],
    ),
    "box_projection": DDPCase(
        ("WeightBoxProjection",),
        parabolic,
        freeze_batchnorm=True,
        callbacks=lambda: [cb.WeightBoxProjection(lower=-0.05, upper=0.05)],
    ),
    "multilevel": DDPCase(
        ("MultilevelTraining",),
        parabolic,
        freeze_batchnorm=True,
        epochs=2,
        train_batches=2,
        callbacks=lambda: [cb.MultilevelTraining(refine_epochs=[1], refine_weights=False)],
    ),
    # num_batches counts per-process batches, and the matrix halves them on 2 ranks: limit_test_batches bounds the
    # evaluation callbacks instead (tests/test_evaluation_ddp_invariance.py runs them at equal per-process batches)
    "adversarial": DDPCase(
        ("AdversarialEvaluation",),
        rknet,
        test=True,
        callbacks=lambda: [
            cb.AdversarialEvaluation(
                epsilons=["8/255"],
                attacks=["fgsm", "pgd", "spsa"],
                pgd_steps=2,
                num_batches=None,
                spsa_num_batches=None,
                spsa_steps=2,
                spsa_samples=4,
                gradient_solver={"method": "euler", "step_size": 0.5},
                log_figure=False,
            )
        ],
    ),
    "ood": DDPCase(
        ("OODEvaluation",),
        rknet,
        test=True,
        callbacks=lambda: [cb.OODEvaluation(perturbations=["gaussian_noise", "rotation"], num_batches=None)],
    ),
    "inference_timer": DDPCase(
        ("InferenceTimer",),
        rknet,
        test=True,
        callbacks=lambda: [cb.InferenceTimer(batch_size=16, num_warmup=0, num_repeats=1)],
        rank_only_metrics=("inference/",),
    ),
    "sigterm_flag_only": DDPCase(("SigtermFlagOnly",), rknet, test=True, callbacks=lambda: [cb.SigtermFlagOnly()]),
    "ema": DDPCase(("EMAWeights",), rknet, test=True, callbacks=lambda: [cb.EMAWeights(decay=0.9)]),
    "progress_bar": DDPCase(
        ("ResumeAwareProgressBar",), rknet, test=True, callbacks=lambda: [cb.ResumeAwareProgressBar()]
    ),
    "prediction_writer": DDPCase(
        ("PredictionWriter",), rknet, predict=True, callbacks=lambda: [cb.PredictionWriter(output_dir="predictions")]
    ),
    "checkpoint_on_interrupt": DDPCase(
        ("CheckpointOnInterrupt",),
        rknet,
        train_batches=4,
        expect_error="simulated failure after 2 steps",
        callbacks=lambda: [RaiseAtStep(2), cb.CheckpointOnInterrupt(dirpath="interrupted")],
    ),
    # a solver failure on one rank stops both ranks (one collective decision per step), with the
    # last good checkpoint kept and no interrupt checkpoint, instead of leaving rank 0 hanging in
    # the gradient all-reduce
    "solver_failure_on_one_rank": DDPCase(
        ("ODENetModule", "CheckpointOnInterrupt"),
        lambda: models.ODENetModule(solver=dict(adjoint=False), **CHEN_TINY, lr=0.01),
        callbacks=lambda: [FailSolverOnRank(rank=1, step=2), cb.CheckpointOnInterrupt(dirpath="interrupted")],
        rank_errors=("PeerFailedError", "SolverFailedError"),
    ),
    # the same in validation, where the ranks meet only at the epoch-end metric sync (they may hold different
    # numbers of batches): the failing rank closes its connections, so the other's sync fails at once
    "solver_failure_in_validation_on_one_rank": DDPCase(
        ("ODENetModule", "CheckpointOnInterrupt"),
        lambda: models.ODENetModule(solver=dict(adjoint=False), **CHEN_TINY, lr=0.01),
        callbacks=lambda: [FailSolverInValidationOnRank(rank=1), cb.CheckpointOnInterrupt(dirpath="interrupted")],
        rank_errors=("RuntimeError", "SolverFailedError"),
        breaks_process_group=True,
    ),
    # the same inside backward (adaptive adjoint solve): the failing rank explains the failure and closes its
    # connections, so rank 0's gradient all-reduce fails at once instead of waiting for the collective timeout
    "adjoint_failure_in_backward_on_one_rank": DDPCase(
        ("ODENetModule", "CheckpointOnInterrupt"),
        lambda: models.ODENetModule(solver=dict(adjoint=True, max_num_steps=50), **CHEN_TINY, lr=0.01),
        callbacks=lambda: [StiffInBackwardOnRank(rank=1, step=2), cb.CheckpointOnInterrupt(dirpath="interrupted")],
        rank_errors=("PeerFailedError", "SolverFailedError"),
        breaks_process_group=True,
    ),
}
