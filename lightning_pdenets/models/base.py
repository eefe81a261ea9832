"""Shared LightningModule of every image classifier: network from the registry, loss, metrics, optimizers."""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchmetrics import Metric, MetricCollection

if TYPE_CHECKING:
    from lightning.pytorch.utilities.parsing import AttributeDict
from typing_extensions import override

import lightning_pdenets
from lightning_pdenets._compat.torchmetrics import mark_updated
from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import (
    DATA_FACTS,
    NetworkOptions,
    architecture_parameters,
    check_data_facts,
    create_architecture,
    resolve_network_arguments,
)
from lightning_pdenets.blocks.ode import explain_solver_failure
from lightning_pdenets.checkpoints import archive_damage, check_checkpoint, check_map_location, checkpoint_class_path
from lightning_pdenets.errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    ModelFailure,
    NonFiniteLossError,
    PeerFailedError,
    SolverFailedError,
    is_peer_crash,
    is_solver_failure,
)
from lightning_pdenets.evaluation import accuracy_metrics
from lightning_pdenets.interruption import leave_process_group
from lightning_pdenets.metric_logging import log_replicated, step_values_are_read
from lightning_pdenets.migration import VERSION_KEY, check_layout
from lightning_pdenets.models.optim import (
    base_learning_rates,
    build_optimizer,
    build_schedule,
    check_optimization_settings,
    rescale_learning_rates,
)
from lightning_pdenets.protocols import find_regularized_modules, pop_regularization

__all__ = ["ClassifierModule"]

ACCURACY_KEY = "acc_top{k}"
"""The models' accuracy metrics: ``train/acc_top1``, ``val/acc_top5``, ...

(:func:`~lightning_pdenets.evaluation.accuracy_metrics`)."""


TRAIN_EPOCH_STATE_KEY = "train_epoch_metrics"
START_LOSS_KEY = "train_start_loss"
"""Checkpoint key of the run's first training loss, so that a resumed run measures divergence from the same start."""

EXPLODED_FACTOR = 100.0
"""A training loss this many times its start (two orders of magnitude) has diverged."""

CHANCE_MARGIN = 0.05
"""Validation accuracy at most this far above chance (1 / classes) counts as chance."""

CHANCE_AFTER_EPOCHS, CHANCE_AFTER_STEPS = 3, 50
"""Accuracy at chance counts as divergence only after this many epochs and optimizer steps (short test runs
and the first epochs of a slow start are left alone)."""

SAFE_LEARNING_RATE = 1e-3
"""The learning rate the advice after a divergence proposes (the models' default, which trains every shipped config)."""


def lower_learning_rate(rate: float) -> float:
    """The learning rate the advice after a non-finite loss proposes: a tenth, or :data:`SAFE_LEARNING_RATE` from
    rates so high that a tenth would fail the same way."""
    return rate / 10 if rate <= 10 * SAFE_LEARNING_RATE else SAFE_LEARNING_RATE


DEFAULT_NUM_CLASSES = 10
"""Classes of a model whose architecture does not say (no registered architecture, no ``num_classes`` given)."""


class WeightedMean(Metric):
    """Weighted mean of a stream of scalars, synced over DDP ranks; a NaN value makes the mean NaN.

    Written here because torchmetrics' ``MeanMetric`` (1.9) either drops NaN values (hiding a diverged
    evaluation) or, with ``nan_strategy='disable'``, ignores the weights.
    """

    full_state_update = False
    weighted_sum: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("weighted_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | float, weight: float = 1.0) -> None:
        self.weighted_sum += torch.as_tensor(value, dtype=torch.float64, device=self.device).sum() * weight
        self.total_weight += weight

    def compute(self) -> torch.Tensor:
        return (self.weighted_sum / self.total_weight).float()


_CHUNK_WORKERS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_CHUNK_WORKERS.clear)  # a forked child has none of the parent's threads


def evaluate_in_chunks(network: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``network(x)`` without autograd, chunk by chunk; with N > 1 intra-op threads, N worker threads at one intra-op
    thread each take a contiguous share of the chunks.

    Each chunk is computed exactly as at one thread, so the logits do not depend on the thread count. Written by
    hand because torch has no inter-op parallel map over a batch; grad mode is thread-local, so every worker
    enters the caller's mode, and the intra-op thread count (process-wide) is restored afterwards.
    """
    parts = x.split(chunk)
    threads = torch.get_num_threads()
    workers = min(threads, len(parts))
    if workers == 1:
        return torch.cat([network(part) for part in parts])
    inference = torch.is_inference_mode_enabled()

    def run(own: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # not inference_mode(False): that would switch grad mode back on in this thread
        with torch.inference_mode() if inference else torch.no_grad():
            return [network(part) for part in own]

    if workers not in _CHUNK_WORKERS:
        _CHUNK_WORKERS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="pdenets-chunks")
    pool = _CHUNK_WORKERS[workers]
    share = -(-len(parts) // workers)
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(run, parts[start : start + share]) for start in range(0, len(parts), share)]
        return torch.cat([logits for future in futures for logits in future.result()])
    finally:
        torch.set_num_threads(threads)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier over ``self.network``, built in ``__init__`` from the registered :attr:`architecture`.

    Logs ``train/``, ``val/`` and ``test/`` loss with torchmetrics top-1/top-5 accuracy. Subclasses
    name their registered :attr:`architecture`, which is built from the ``network`` dict (written in YAML as
    ``network: {width: 64}``) and the data facts that the CLI links from the datamodule. Function
    evaluations of ODE blocks are logged by :class:`lightning_pdenets.callbacks.NFEMonitor`. In training, the
    terms of submodules following :class:`lightning_pdenets.protocols.RegularizedModule` (e.g. RNODE's, turned on
    in the ``solver`` settings) are added to the loss and logged as ``train/<term>_step``/``_epoch``;
    ``train/loss`` stays the cross-entropy.

    Args:
        network: Arguments of the registered architecture (e.g. ``{width: 64, num_downsamples: 2}`` for
            ``odenet_chen``), over the factory's defaults; unknown names and wrong types are refused with the valid
            ones, and the complete dict is stored in ``hparams.network``.
        num_classes: Number of classes (None: the architecture's default).
        in_channels: Image channels, for architectures that take them (None: the architecture's default).
        image_size: Side of the square images, or their (height, width), for architectures that take it.
        input_dim: Dimension of vector inputs, for architectures that take it.
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
    architecture: ClassVar[str | None] = None
    if TYPE_CHECKING:  # Lightning types it as a MutableMapping; save_hyperparameters() makes an AttributeDict

        @property
        def hparams(self) -> AttributeDict: ...

    """Name of the network in the architecture registry, built from ``network`` by :meth:`build_network`."""
    inference_chunk_size: int | None = None
    """Evaluate ``forward`` on the CPU in chunks of this many samples in eval mode without autograd (None: whole
    batches). Only for networks whose samples do not interact in eval mode (not adaptive ODE solves, whose steps
    depend on the batch): large batches of large feature maps run out of cache. With several intra-op threads the
    chunks are shared out to as many worker threads at one intra-op thread each, because small chunks leave a
    parallel op too little work (BENCHMARKS.md, issue 27: PR-Net speed)."""

    def __init__(
        self,
        network: NetworkOptions | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        input_dim: int | None = None,
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
        facts = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, input_dim=input_dim)
        check_data_facts(facts, type(self).__name__)
        # Lightning collects the arguments of every __init__ up the subclass chain: subclasses need no call of their own
        self.save_hyperparameters()
        self.optimization: dict[str, Any] = dict(
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            lr_scheduler=lr_scheduler,
            lr_milestones=list(lr_milestones),
            lr_gamma=lr_gamma,
        )
        if self.architecture is not None:
            self.network = self.build_network()
        self.num_classes = self.hparams["num_classes"] = self.hparams.get("num_classes") or DEFAULT_NUM_CLASSES
        self.train_metrics = accuracy_metrics(self.num_classes, "train/", ACCURACY_KEY)
        self.train_means = nn.ModuleDict()  # epoch means of training terms (log_train_term), created on first use
        self.eval_means = nn.ModuleDict()  # epoch means of validation/test terms (log_eval_term), likewise
        self._pending_train_epoch_state: dict[str, Any] | None = None
        self._configured_learning_rates: list[list[float]] | None = None
        self.val_metrics = accuracy_metrics(self.num_classes, "val/", ACCURACY_KEY)
        self.test_metrics = accuracy_metrics(self.num_classes, "test/", ACCURACY_KEY)
        self._regularized_modules: list[nn.Module] | None = None  # found once per fit
        self._start_loss: float | None = None  # the first training loss of the run (kept in checkpoints)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dtype(x)
        chunk = self.inference_chunk_size
        if (
            chunk is not None
            and x.shape[0] > chunk
            and not self.training
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"  # a GPU would only lose by small batches, whatever the CPU thread count
        ):
            return evaluate_in_chunks(self.network, x, chunk)
        return self.network(x)

    def _check_input_dtype(self, x: torch.Tensor) -> None:
        """Refuse inputs of another dtype than the weights (else a bare "Input type (double) and bias type ...")."""
        weight = next(self.parameters(), None)
        if weight is None or x.dtype == weight.dtype:
            return
        fix = (
            "convert them to floats first, e.g. x.float() / 255 for uint8 pixels, then normalize them as the "
            "datamodule does"
            if not x.is_floating_point()
            else f"convert them with x.to({weight.dtype}), or the model with model.to({x.dtype})"
        )
        raise TypeError(f"{type(self).__name__} has {weight.dtype} weights but got {x.dtype} inputs; {fix}.")

    # -- steps ------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, stage: str, metrics: MetricCollection) -> torch.Tensor:
        x, y = batch
        try:
            logits = self(x)
        except SolverFailedError as failure:
            if stage == "train":
                self.check_finite(failure=failure)  # the other ranks learn of it in the same collective
            else:
                # evaluation has no per-step collective (ranks may hold different numbers of batches), so
                # the others learn of it only at the epoch-end metric sync: closing this rank's connections
                # makes that fail at once ("Connection closed by peer") even if this process lives on
                _release_peers()
            raise
        loss = F.cross_entropy(logits, y)
        terms = self._pop_regularization() if stage == "train" else {}
        if stage == "train":
            # before any logging: sync_dist logging is itself a collective, which a failed rank never reaches
            self.check_finite(None, inputs=x, loss=loss, **terms)  # NaN inputs need another remedy than NaN losses
        metrics.update(logits.detach(), y)
        if stage == "train":
            self.log_train_term("train/loss", loss, prog_bar=True)  # training accuracy: on_train_epoch_end
            for name, term in terms.items():
                self.log_train_term(f"train/{name}", term.detach())
                loss = loss + term
        else:
            self.log_eval_term(f"{stage}/loss", loss, weight=len(y), prog_bar=True)
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _pop_regularization(self) -> dict[str, torch.Tensor]:
        if self._regularized_modules is None:
            self._regularized_modules = find_regularized_modules(self)
        return pop_regularization(self._regularized_modules)

    # -- training metrics that survive a mid-epoch resume ---------------------------------------
    def log_train_term(self, name: str, value: torch.Tensor, prog_bar: bool = False) -> None:
        """Log a training term as ``<name>_step`` (synced over ranks); its epoch mean ``<name>_epoch`` follows.

        ``<name>_step`` is logged on the steps whose values reach the loggers (``log_every_n_steps``) or, with
        ``prog_bar``, a progress bar; on the others Lightning would drop it (see
        :func:`~lightning_pdenets.metric_logging.step_values_are_read`). The epoch mean is a
        :class:`WeightedMean` whose state is saved in checkpoints, so that an epoch interrupted and resumed
        reports the same mean as an uninterrupted one (Lightning's own epoch aggregation restarts from zero on
        resume). It is only updated here and logged once, in :meth:`on_train_epoch_end`.
        """
        if self._trainer is None or step_values_are_read(self._trainer, progress_bar=prog_bar):
            self.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=prog_bar, sync_dist=True)
        self._epoch_mean("train_means", name.replace(".", "_")).update(value.detach(), 1.0)
        if name == "train/loss" and self._start_loss is None:
            self._start_loss = float(value.detach())  # what divergence_symptom() compares the end with

    @override
    def on_train_epoch_end(self) -> None:
        """Log the epoch means of the training terms and the training accuracy, each computed once, then reset them.

        ``compute()`` syncs the states over DDP ranks, so every rank logs the same value.
        """
        means = self._means("train_means")
        values = {f"{key}_epoch": mean.compute() for key, mean in means.items() if mean.update_called}
        if any(metric.update_called for metric in self.train_metrics.values()):
            values.update(self.train_metrics.compute())
        if values:
            log_replicated(self, values)
        for mean in means.values():
            mean.reset()
        self.train_metrics.reset()

    def log_eval_term(
        self, name: str, value: torch.Tensor | float, weight: float = 1.0, prog_bar: bool = False
    ) -> None:
        """Log the epoch mean of a validation or test term, weighted by ``weight`` (e.g. the batch size).

        A torchmetrics metric syncs sums and weights over the ranks, so under DDP, where
        evaluation ranks may hold different numbers of samples (each sample is evaluated once), the
        value is the mean over all of them. Lightning's own ``sync_dist`` mean is not: it averages the
        ranks' summed batch sizes in an integer tensor (17 samples on 2 ranks: 8.5 truncated to 8),
        which turned a constant NFE of 16 into 17. A NaN is kept, not dropped.
        """
        self._log_epoch_mean("eval_means", name, name.replace(".", "_"), value, weight, prog_bar)

    def _means(self, store: str) -> dict[str, WeightedMean]:
        """The :class:`WeightedMean` metrics of the ModuleDict ``store`` by key."""
        return {key: cast(WeightedMean, mean) for key, mean in getattr(self, store).items()}

    def _epoch_mean(self, store: str, key: str) -> WeightedMean:
        """The :class:`WeightedMean` ``key`` of the ModuleDict ``store``, created on first use."""
        means: nn.ModuleDict = getattr(self, store)
        if key not in means:
            means[key] = WeightedMean().to(self.device)
        return cast(WeightedMean, means[key])

    def _log_epoch_mean(
        self, store: str, name: str, key: str, value: torch.Tensor | float, weight: float, prog_bar: bool
    ) -> None:
        mean = self._epoch_mean(store, key)
        mean.update(torch.as_tensor(value, device=self.device).detach(), weight)
        # metric_attribute: Lightning indexes the module's metrics once, before these are created
        self.log(name, mean, on_step=False, on_epoch=True, prog_bar=prog_bar, metric_attribute=f"{store}.{key}")

    def _train_epoch_metrics(self) -> dict[str, Metric]:
        means = {f"mean:{key}": metric for key, metric in self._means("train_means").items()}
        return {**means, **{f"accuracy:{key}": m for key, m in self.train_metrics.items(keep_base=True)}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the release and store the training-epoch metric states summed over the ranks (on every rank)."""
        checkpoint[VERSION_KEY] = lightning_pdenets.__version__
        checkpoint[START_LOSS_KEY] = self._start_loss
        if self._trainer is None:
            return
        states = {}
        for name, metric in self._train_epoch_metrics().items():
            with metric.sync_context(should_sync=self.trainer.world_size > 1):
                # every state of these metrics is one tensor (no list states)
                states[name] = {k: cast(torch.Tensor, v).detach().clone() for k, v in metric.metric_state.items()}
        checkpoint[TRAIN_EPOCH_STATE_KEY] = {"epoch": self.current_epoch, "states": states}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, after the file is checked.

        A file that is no Lightning checkpoint (or is damaged), one that needs unpickling without
        ``weights_only=False``, or one that holds a model class other than this one or a subclass is refused with a
        short message naming what it is (instead of a ``KeyError`` or ``EOFError``); a checkpoint of an earlier
        release, with the upgrade command.
        """
        check_map_location(kwargs.get("map_location"))
        if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isdir(checkpoint_path):
            check_checkpoint(os.fspath(checkpoint_path))  # names the folder and the checkpoints inside it
        if hasattr(checkpoint_path, "read"):  # a file object: the archive's CRCs are all that can be checked first
            damage = archive_damage(checkpoint_path)
            if damage is not None:
                raise CorruptCheckpointError(f"the checkpoint file object is damaged: {damage}; nothing was loaded.")
        if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path):
            model = f"{cls.__module__}.{cls.__qualname__}"
            checkpoint = check_checkpoint(os.fspath(checkpoint_path), trusted=kwargs.get("weights_only") is False)
            recorded_path = checkpoint_class_path(checkpoint)
            recorded = import_class(recorded_path) if recorded_path else None
            if recorded is not None and not issubclass(recorded, cls):
                raise CheckpointMismatchError(
                    f"checkpoint {str(checkpoint_path)!r} holds a {recorded_path}, not a {cls.__qualname__}: load it "
                    f"with {recorded.__qualname__}.load_from_checkpoint, or pass a checkpoint of a {cls.__qualname__}."
                )
            check_layout(checkpoint, checkpoint_path, model=model)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_train_epoch_state = checkpoint.get(TRAIN_EPOCH_STATE_KEY)
        self._start_loss = checkpoint.get(START_LOSS_KEY, self._start_loss)

    @override
    def on_fit_start(self) -> None:
        # Lightning has configured the optimizers before this hook and restores a checkpoint's state after it.
        self._configured_learning_rates = base_learning_rates(self.trainer.optimizers)

    def _apply_configured_learning_rates(self) -> None:
        """On resume, start the restored schedules from this run's learning rates, not the checkpoint's."""
        configured, self._configured_learning_rates = self._configured_learning_rates, None
        if configured is None or self.trainer.ckpt_path is None:
            return
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        changes = rescale_learning_rates(self.trainer.optimizers, schedulers, configured)
        if changes:
            rank_zero_info(
                f"Resumed with the learning rates of this run, not the checkpoint's ({'; '.join(changes)}); the "
                f"restored optimizers and schedules are scaled to match."
            )

    @override
    def on_train_start(self) -> None:
        self._regularized_modules = None  # found again: the network may have changed since the last fit
        self._apply_configured_learning_rates()
        # Lightning restores the loops before this hook and skips on_train_epoch_start when it resumes
        # inside an epoch; a checkpoint written at an epoch's end resumes at the next epoch instead.
        saved, self._pending_train_epoch_state = self._pending_train_epoch_state, None
        if not saved or saved["epoch"] != self.current_epoch:
            return  # not resuming in the middle of this epoch
        if self.trainer.global_rank != 0:
            return  # the saved totals cover every rank: one rank takes them, the others start from zero
        for name, values in saved["states"].items():
            kind, key = name.split(":", 1)
            metric: Metric
            if kind == "mean":
                metric = self._epoch_mean("train_means", key)
            else:
                metric = dict(self.train_metrics.items(keep_base=True))[key]
            for attribute, value in values.items():
                setattr(metric, attribute, value.to(self.device))
            mark_updated(metric)  # compute() would warn that update() was never called

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    # -- network ----------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """Build the registered :attr:`architecture` from ``network``, the data facts and :meth:`network_arguments`.

        The one path from a model to its network: the architecture registry
        (:data:`lightning_pdenets.architectures.ARCHITECTURES`) names the factory; ``hparams.network`` is
        validated against the factory's signature and stored complete (defaults filled in), and the data facts
        the factory takes (``num_classes``, ``in_channels``, ``image_size``, ``input_dim``) are stored resolved.
        """
        if self.architecture is None:
            raise TypeError(
                f"{type(self).__name__} sets no `architecture` (a name registered with @register_architecture)."
            )
        supplied = self.network_arguments()
        network, facts = resolve_network_arguments(
            self.architecture,
            self.hparams.get("network"),
            {name: self.hparams.get(name) for name in DATA_FACTS},
            supplied=tuple(supplied),
            model=type(self).__name__,
        )
        self.hparams["network"] = network
        self.hparams.update(facts)
        return create_architecture(self.architecture, **facts, **network, **supplied)

    def network_arguments(self) -> dict[str, Any]:
        """Arguments of the architecture that the model supplies itself, not ``network`` (e.g. a resolved solver)."""
        return {}

    def architecture_arguments(self) -> dict[str, Any]:
        """Every argument the registered :attr:`architecture` was built with (``network`` and the data facts)."""
        names = architecture_parameters(cast(str, self.architecture))  # called on built networks only
        facts = {name: self.hparams[name] for name in DATA_FACTS if name in names}
        return {**facts, **self.hparams["network"]}

    def solver_failure_context(self) -> list[dict[str, Any]]:
        """Solver settings named when a backward pass fails in an ODE solve (models with ODE blocks override this)."""
        return []

    # -- faults -----------------------------------------------------------------------------
    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()``, with a failure inside it turned into a model failure that says what to do.

        An adaptive adjoint solve runs inside backward and can fail there ("underflow in dt"): that
        becomes a :class:`SolverFailedError` with remedies. Under DDP the other processes then see the
        failed process vanish from the gradient all-reduce; that becomes a :class:`PeerFailedError`.
        Both are model failures, so no interrupt checkpoint replaces the last good one.
        """
        try:
            super().backward(loss, *args, **kwargs)
        except (AssertionError, RuntimeError) as error:
            if is_solver_failure(error):
                _release_peers()
                failure = explain_solver_failure(error, self.solver_failure_context(), "backward (adjoint)")
                if failure is error:
                    raise
                raise failure from error
            if is_peer_crash(error):
                raise PeerFailedError(
                    f"another DDP process crashed during the backward pass of global step {self.global_step} (its "
                    f"own error message names the cause, e.g. an ODE solver failure in the adjoint pass, and the "
                    f"remedies). The last good checkpoint is kept. Communication error: {error}"
                ) from error
            raise

    def check_finite(self, failure: ModelFailure | None = None, **terms: torch.Tensor) -> None:
        """Stop training on every rank when a term is NaN/Inf or ``failure`` happened on any rank.

        One collective decision per step (``reduce_boolean_decision``), so under DDP a failure on
        one process stops all of them instead of leaving the others waiting in the gradient
        all-reduce. The failing rank raises its own error; the others raise :class:`PeerFailedError`.
        """
        bad, all_ok = self.finite_on_every_rank(terms, ok_here=failure is None)
        if all_ok:
            return
        if failure is not None:
            raise failure
        if not bad:
            raise PeerFailedError(
                f"another DDP process stopped at global step {self.global_step} (a non-finite loss or an ODE solver "
                f"failure; its error message names the cause and the remedies). {self._kept_checkpoint_note()}"
            )
        raise NonFiniteLossError(
            f"non-finite loss term(s) {bad} at global step {self.global_step}. {self._non_finite_advice(bad)}"
        )

    def finite_on_every_rank(self, terms: dict[str, torch.Tensor], ok_here: bool = True) -> tuple[list[str], bool]:
        """The names of this rank's NaN/Inf ``terms``, and whether no rank has one (nor ``ok_here`` False).

        One collective (``reduce_boolean_decision``) whatever the outcome, so every rank takes the same decision.
        """
        bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        all_ok = not bad and ok_here
        if self._trainer is not None:
            all_ok = self.trainer.strategy.reduce_boolean_decision(all_ok, all=True)
        return bad, all_ok

    def _kept_checkpoint(self) -> str | None:
        """The newest checkpoint of this run on disk (written, or resumed from), or ``None``."""
        if self._trainer is None:
            return None
        paths = [
            getattr(c, "last_model_path", "") or getattr(c, "best_model_path", "")
            for c in self.trainer.checkpoint_callbacks
        ] + [self.trainer.ckpt_path or ""]
        existing = [path for path in map(str, paths) if path and os.path.isfile(path)]
        return max(existing, key=os.path.getmtime) if existing else None

    def _kept_checkpoint_note(self) -> str:
        kept = self._kept_checkpoint()
        return f"The last good checkpoint is kept: {kept}." if kept else "No checkpoint was written yet."

    def _non_finite_advice(self, bad: Sequence[str]) -> str:
        """The likely causes of the non-finite loss terms ``bad`` and the remedies that work from here."""
        if "inputs" in bad:
            return (
                "The training batch itself holds NaN/Inf values, so no learning rate or solver setting can help: "
                "check the data (a corrupt file, a normalization by a zero standard deviation). "
                f"{self._kept_checkpoint_note()}"
            )
        lower_lr = f"--model.init_args.lr {lower_learning_rate(self.optimization['lr']):g}"
        solver = self._solver_remedy()
        cause = "a learning rate too high for this model" + (", or an ODE solver too coarse for it" if solver else "")
        if self._kept_checkpoint() is None:
            return (
                f"Likely cause: {cause}. No checkpoint was written yet, so start afresh: run the same command with a "
                f"lower learning rate ({lower_lr}), or with --trainer.gradient_clip_val 1.0"
                + (f", or with {solver}." if solver else ".")
            )
        return (
            f"Likely cause: {cause}. {self._kept_checkpoint_note()} Continue from it with a lower learning rate: run "
            f"the same command with {self._resume_option()} {lower_lr} (a learning rate given for the resumed run "
            f"replaces the checkpoint's in its optimizers and schedules), optionally with "
            f"--trainer.gradient_clip_val 1.0."
            + (
                f" A fresh run can also train with {solver} (a resumed one keeps its checkpoint's solver)."
                if solver
                else ""
            )
        )

    def _resume_option(self) -> str:
        """``--ckpt_path`` for the kept checkpoint: ``last`` where that finds it (this run's folder), else its path."""
        kept = self._kept_checkpoint()
        folders = [getattr(callback, "dirpath", None) for callback in self.trainer.checkpoint_callbacks]
        own_folders = {os.path.abspath(str(folder)) for folder in folders if folder}
        if kept is None or os.path.dirname(os.path.abspath(kept)) in own_folders:
            return "--ckpt_path last"
        return f"--ckpt_path {shlex.quote(kept)}"

    def _solver_remedy(self) -> str:
        """The solver setting that makes the dynamics easier to integrate (``""``: the model has no ODE solver)."""
        return ""

    # -- divergence ---------------------------------------------------------------------------
    def divergence_symptom(self) -> str | None:
        """What shows that the finished fit diverged, measured; ``None`` when it did not.

        Read at the end of fit from the epoch values every rank holds alike (``train/loss_epoch``,
        ``val/loss``, ``val/acc_top1``) and rank 0's first training loss: a non-finite loss; a training loss
        :data:`EXPLODED_FACTOR` times its start; or, after :data:`CHANCE_AFTER_EPOCHS` epochs and
        :data:`CHANCE_AFTER_STEPS` steps, validation accuracy at chance with a training loss still at the level of
        guessing (ln of the number of classes).
        """
        if self._trainer is None:
            return None
        metrics = self.trainer.callback_metrics
        value = lambda name: float(metrics[name]) if name in metrics else None  # noqa: E731
        train_loss, val_loss, val_acc = value("train/loss_epoch"), value("val/loss"), value("val/acc_top1")
        start = self.trainer.strategy.broadcast(self._start_loss, src=0)
        for name, loss in (("training", train_loss), ("validation", val_loss)):
            if loss is not None and not math.isfinite(loss):
                return f"the {name} loss of the last epoch is {loss}"
        if train_loss is not None and start and train_loss > EXPLODED_FACTOR * start:
            return (
                f"the training loss rose from {start:.3g} at the first step to {train_loss:.3g} in the last epoch "
                f"({train_loss / start:.2g}x)"
            )
        chance = 1.0 / self.num_classes
        guessing = math.log(self.num_classes)
        if (
            val_acc is not None
            and train_loss is not None
            and self.trainer.current_epoch >= CHANCE_AFTER_EPOCHS
            and self.trainer.global_step >= CHANCE_AFTER_STEPS
            and val_acc <= chance + CHANCE_MARGIN
            and train_loss >= 0.9 * guessing
        ):
            return (
                f"after {self.trainer.current_epoch} epochs the validation accuracy is {val_acc:.3f}, chance for "
                f"{self.num_classes} classes ({chance:.3f}), and the training loss {train_loss:.3g} is still that "
                f"of guessing (ln {self.num_classes} = {guessing:.3g})"
            )
        return None

    def divergence_advice(self, symptom: str) -> str:
        """How to get a run that learns after ``symptom`` (of :meth:`divergence_symptom`): a fresh run at another rate.

        The rate is :data:`SAFE_LEARNING_RATE`; after a loss that exploded at or below it, a tenth of the rate; at
        chance with that very rate, a tenth of it too.
        """
        at_chance = "chance" in symptom
        rates = {}
        for name, rate in self.learning_rate_options().items():
            safe = rate != SAFE_LEARNING_RATE if at_chance else rate > SAFE_LEARNING_RATE
            rates[name] = SAFE_LEARNING_RATE if safe else rate / 10
        changed = " ".join(f"--model.init_args.{name} {rate:g}" for name, rate in rates.items())
        return (
            f"Its checkpoints hold the diverged weights, so do not resume from them: start a fresh run, i.e. the "
            f"same command without --ckpt_path, with {changed}. (--allow_divergence true accepts such a run.)"
        )

    def learning_rate_options(self) -> dict[str, float]:
        """The model's learning-rate arguments by command-line name (``lr``; PR-Net: ``theta.lr``, ...)."""
        return {"lr": self.optimization["lr"]}

    # -- optimization -----------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        o = self.optimization
        # Frozen parameters stay out, so that BackboneFinetuning can add them later as their own group.
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, o["optimizer"], o["lr"], o["weight_decay"], o["momentum"])
        schedule = build_schedule(optimizer, o, self._trainer)
        return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


def _release_peers() -> None:
    """Close this process's side of the process group after a failure the others cannot be told of in step.

    After a failure inside backward, or in an evaluation step, the other DDP processes wait in
    collectives (gradient all-reduce, epoch-end metric sync) this process will never join.
    Closing the connections fails those at once, even when this process lives on (a sweep loop, a
    test harness), instead of leaving them blocked until the collective timeout (30 minutes by
    default): after backward they raise :class:`PeerFailedError`, after evaluation torch's
    "Connection closed by peer" error. The DDP state of this step is unusable anyway.
    """
    leave_process_group()
