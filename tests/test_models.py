"""LightningModules: metrics namespaces, checkpoint round trip, optimizers, NaN handling."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_pdenets.callbacks import NFEMonitor
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.errors import NonFiniteLossError
from lightning_pdenets.models import ODENetModule, ResNetModule, RKNetModule
from lightning_pdenets.models.base import WeightedMean
from tests.trainers import quiet_trainer

TINY = dict(width=8, num_downsamples=1)


def tiny(**network) -> dict:
    """The ``network`` argument of a tiny Chen-style model: the given settings over :data:`TINY`."""
    return dict(network={**TINY, **network})


def tiny_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
    )
    return quiet_trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "module_class, kwargs",
    [
        (ResNetModule, tiny(num_blocks=2)),
        (RKNetModule, dict(tiny(), solver=dict(step_size=0.5))),
        (ODENetModule, dict(tiny(), solver=dict(rtol=1e-2, atol=1e-2))),
    ],
)
def test_fit_logs_namespaced_metrics_and_reloads_from_checkpoint(module_class, kwargs, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = module_class(**kwargs, lr=3e-3)
    trainer = tiny_trainer(tmp_path, callbacks=[NFEMonitor()])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    logged = set(trainer.logged_metrics)
    assert {"train/loss_epoch", "val/loss", "val/acc_top1", "val/acc_top5", "train/acc_top1"} <= logged
    is_ode = module_class is not ResNetModule
    assert ("train/nfe_forward_epoch" in logged) == is_ode and ("train/nfe_backward_epoch" in logged) == is_ode

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert all(
        isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))
        for v in checkpoint["hyper_parameters"].values()
    )
    restored = module_class.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(model.hparams)
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), restored(x))


def test_rknet_defaults_are_rk4_with_direct_backprop() -> None:
    settings = RKNetModule(**tiny()).network.feature.solver_settings()
    assert (settings["method"], settings["step_size"], settings["adjoint"]) == ("rk4", 0.25, False)
    odenet = ODENetModule(**tiny()).network.feature.solver_settings()
    assert (odenet["method"], odenet["adjoint"]) == ("dopri5", True)


def test_adapted_solver_settings_travel_with_the_checkpoint(tmp_path: Path) -> None:
    model = ODENetModule(**tiny())
    model.network.feature.configure_solver(rtol=1e-5, atol=1e-5)
    tiny_trainer(tmp_path, max_epochs=0).fit(model, datamodule=DigitsDataModule())  # attaches a trainer only
    path = tmp_path / "adapted.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    assert ODENetModule.load_from_checkpoint(path).network.feature.solver_settings()["rtol"] == 1e-5


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(optimizer="adagrad"), "`optimizer` must be one of"),
        (dict(lr=-1.0), "`lr` must be a finite number > 0"),
        (dict(lr_scheduler="plateau"), "`lr_scheduler` must be one of"),
        (dict(lr_scheduler="multistep"), "needs `lr_milestones`"),
        (dict(momentum=1.0), r"`momentum` must be in \[0, 1\)"),
    ],
)
def test_bad_optimization_settings(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ResNetModule(**tiny(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, optimizer_class, scheduler_class",
    [
        (dict(optimizer="sgd", momentum=0.5), torch.optim.SGD, None),
        (dict(optimizer="adamw", lr_scheduler="cosine"), torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR),
        (dict(lr_scheduler="multistep", lr_milestones=[2, 4]), torch.optim.Adam, torch.optim.lr_scheduler.MultiStepLR),
    ],
)
def test_optimizer_and_scheduler_selection(kwargs, optimizer_class, scheduler_class) -> None:
    configured = ResNetModule(**tiny(), **kwargs).configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    assert type(optimizer) is optimizer_class
    if scheduler_class is not None:
        assert isinstance(configured["lr_scheduler"]["scheduler"], scheduler_class)  # a run-length-aware subclass
    if "momentum" in kwargs:
        assert optimizer.param_groups[0]["momentum"] == 0.5


def test_nan_loss_stops_with_a_message_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    class ExplodesInSecondEpoch(ResNetModule):
        def forward(self, x):
            logits = super().forward(x)
            return logits * float("nan") if self.training and self.current_epoch == 1 else logits

    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[checkpoint], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(ExplodesInSecondEpoch(**tiny(num_blocks=1)), datamodule=DigitsDataModule(batch_size=16))
    message = str(info.value)
    assert "['loss']" in message and f"checkpoint is kept: {tmp_path / 'ckpt' / 'last.ckpt'}" in message
    assert "run the same command with --ckpt_path last --model.init_args.lr 0.0001" in message
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


class RecordLearningRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append([group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups])


def one_cycle_rates(peak: float, total_steps: int) -> list[float]:
    """Learning rates torch's OneCycleLR gives step by step (the independent reference)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_one_cycle_schedule_steps_every_batch_over_the_whole_run(tmp_path: Path) -> None:
    recorder = RecordLearningRates()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(
        ResNetModule(**tiny(num_blocks=1), lr=0.02, lr_scheduler="onecycle"), datamodule=DigitsDataModule(batch_size=16)
    )
    assert [rates[0] for rates in recorder.rates] == pytest.approx(one_cycle_rates(0.02, 8))


def test_one_cycle_needs_the_length_of_the_run() -> None:
    with pytest.raises(ValueError, match="`lr_scheduler='onecycle'` needs the run's number of optimizer steps"):
        ResNetModule(**tiny(), lr_scheduler="onecycle").configure_optimizers()


def test_evaluation_means_are_weighted_by_batch_size_and_keep_nan() -> None:
    mean = WeightedMean()
    mean.update(torch.tensor(0.9), 16)
    mean.update(torch.tensor(0.3), 1)
    assert mean.compute().item() == pytest.approx((0.9 * 16 + 0.3) / 17)  # an unweighted mean would be 0.6
    mean.update(torch.tensor(float("nan")), 8)
    assert torch.isnan(mean.compute())  # a diverged evaluation must show, not be dropped


def test_validation_loss_is_the_mean_over_samples_with_a_short_last_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RKNetModule(network=dict(width=8, num_downsamples=1))
    data = DigitsDataModule(batch_size=100)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    model.eval()
    images, labels = map(torch.cat, zip(*data.val_dataloader()))
    assert len(labels) % 100 != 0  # the last batch is shorter than the others
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(images), labels)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(expected.item(), rel=1e-5)


class _StepLogRecorder(pl.Callback):
    """Which per-step values were logged in each training step, and how many per-step collectives ran."""

    def __init__(self) -> None:
        self.logged: list[set[str]] = []
        self.reduces = 0
        self.in_step = False

    def setup(self, trainer, pl_module, stage) -> None:
        original_log, original_reduce = pl_module.log, trainer.strategy.reduce

        def log(name, *args, **kwargs):
            if kwargs.get("on_step"):
                self.logged[-1].add(name)
            return original_log(name, *args, **kwargs)

        def reduce(*args, **kwargs):
            self.reduces += self.in_step
            return original_reduce(*args, **kwargs)

        pl_module.log, trainer.strategy.reduce = log, reduce

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.logged.append(set())
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.in_step = False


@pytest.mark.parametrize("progress_bar", [False, True])
def test_per_step_values_are_logged_only_on_steps_that_someone_reads(progress_bar: bool, tmp_path: Path) -> None:
    """Each self.log costs ~0.5 ms: per-step values go out on the logger's steps, or every step for a progress bar."""
    from lightning.pytorch.loggers import CSVLogger

    recorder = _StepLogRecorder()
    trainer = tiny_trainer(
        tmp_path,
        limit_train_batches=6,
        limit_val_batches=0,
        log_every_n_steps=3,
        enable_progress_bar=progress_bar,
        logger=CSVLogger(tmp_path),
        callbacks=[NFEMonitor(), recorder],
    )
    trainer.fit(RKNetModule(**tiny(), solver=dict(step_size=0.5)), datamodule=DigitsDataModule(batch_size=16))
    nfe_steps = [i for i, names in enumerate(recorder.logged) if "train/nfe_forward_step" in names]
    loss_steps = [i for i, names in enumerate(recorder.logged) if "train/loss_step" in names]
    assert nfe_steps == [2, 5]  # Lightning writes steps 3 and 6 (global_step + 1 divisible by 3)
    assert loss_steps == (list(range(6)) if progress_bar else [2, 5])
    assert recorder.reduces == 0  # one process: the step's NFE need no collective
    written = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert written.count("\n") >= 2 and "train/loss_step" in written.splitlines()[0]


@pytest.mark.parametrize(
    "model, remedy",
    [
        (ResNetModule(num_classes=10, in_channels=1, image_size=8, network=dict(width=8, num_downsamples=1)), None),
        (
            RKNetModule(num_classes=10, in_channels=1, image_size=8, network=dict(width=8, num_downsamples=1)),
            "a smaller --model.init_args.solver.step_size (now 0.25)",
        ),
        (
            ODENetModule(num_classes=10, in_channels=1, image_size=8, network=dict(width=8, num_downsamples=1)),
            "tighter --model.init_args.solver.rtol/atol (now 0.001/0.001)",
        ),
    ],
)
def test_the_nan_advice_offers_a_solver_remedy_only_to_models_with_a_solver(model, remedy) -> None:
    advice = model._non_finite_advice(["loss"])
    assert "--model.init_args.lr 0.0001" in advice and "--trainer.gradient_clip_val 1.0" in advice
    if remedy is None:
        assert "solver" not in advice and "step_size" not in advice and "rtol" not in advice
    else:
        assert remedy in advice
