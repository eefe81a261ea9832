"""Callbacks and models that produce a curve or a table log it to TensorBoard as a figure (or text).

Each test runs one briefly with a ``TensorBoardLogger`` in a temporary directory, then reads the
event file back with TensorBoard's ``EventAccumulator`` and looks for the image (or text) tag.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.callbacks import AdversarialEvaluation, NFEMonitor, OODEvaluation, SolverSwapCheck
from lightning_pdenets.data import ConcentricSpheresDataModule, DigitsDataModule
from lightning_pdenets.models import LMResNetModule, PRNetModule, ResNetModule, VectorODEClassifierModule
from tests.trainers import quiet_trainer


def _trainer(tmp_path: Path, callbacks: list = (), **kwargs) -> pl.Trainer:
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    return quiet_trainer(
        logger=logger, callbacks=list(callbacks), default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs
    )


def _events(trainer: pl.Trainer) -> EventAccumulator:
    trainer.logger.experiment.flush()
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def _assert_figure(events: EventAccumulator, tag: str) -> None:
    images = events.Tags()["images"]
    assert tag in images, f"no figure {tag!r} in the event file; image tags: {images}"
    image = events.Images(tag)[-1]
    assert image.width >= 100 and image.height >= 100 and image.encoded_image_string.startswith(b"\x89PNG")


def _tiny_digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


def test_solver_swap_check_logs_accuracy_against_step_size_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VectorODEClassifierModule(
        solver=dict(method="euler", step_size=0.5), input_dim=2, network=dict(hidden_width=8)
    )
    data = ConcentricSpheresDataModule(dim=2, num_train=64, num_test=32, batch_size=32)
    swap = SolverSwapCheck(solvers=["euler", "rk4", "dopri5"], step_factors=[0.5, 1.0], tolerance_factors=[1.0])
    trainer = _trainer(tmp_path, [swap], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    events = _events(trainer)
    _assert_figure(events, "solver_swap/val")
    assert "solver_swap/val/euler_x0.5" in events.Tags()["scalars"]


def test_adversarial_evaluation_logs_accuracy_against_epsilon_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ResNetModule(in_channels=1, network=dict(width=4, num_downsamples=1, num_blocks=1))
    attack = AdversarialEvaluation(epsilons=["1/255", "8/255"], pgd_steps=2, num_batches=1)
    trainer = _trainer(tmp_path, [attack], limit_test_batches=1)
    trainer.test(model, datamodule=_tiny_digits(), verbose=False)
    events = _events(trainer)
    _assert_figure(events, "adv/accuracy_vs_eps")
    assert "adv/pgd_eps8/top1" in events.Tags()["scalars"]


def test_ood_evaluation_logs_accuracy_per_perturbation_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ResNetModule(in_channels=1, network=dict(width=4, num_downsamples=1, num_blocks=1))
    ood = OODEvaluation(crop_size=7, reference_size=8, num_batches=1)
    trainer = _trainer(tmp_path, [ood], limit_test_batches=1)
    trainer.test(model, datamodule=_tiny_digits(), verbose=False)
    events = _events(trainer)
    assert "ood/gaussian_noise/top1" in events.Tags()["scalars"]
    _assert_figure(events, "ood/accuracy_per_perturbation")


def test_prnet_logs_learned_equation_as_text_and_coefficient_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PRNetModule(
        in_channels=1,
        image_size=8,
        network=dict(width=4, num_downsamples=1),
        max_power=1,
        max_derivative_order=1,
        governing_samples=4,
    )
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=_tiny_digits())
    events = _events(trainer)
    _assert_figure(events, "governing/coefficients")
    text_tags = [tag for tag in events.Tags()["tensors"] if tag.startswith("governing/equation")]
    assert text_tags, f"no governing/equation text; tensor tags: {events.Tags()['tensors']}"
    logged = events.Tensors(text_tags[0])[-1].tensor_proto.string_val[0].decode()
    assert logged == model.governing.equation() and logged.startswith("h_t =")


def test_lm_resnet_logs_k_n_profile_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LMResNetModule(
        num_classes=10, network=dict(depth=14, base_width=4)
    )  # two blocks per stage: the second is LM
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, loader)
    events = _events(trainer)
    _assert_figure(events, "lm_k/profile")
    assert len(events.Images("lm_k/profile")) == 2  # the initialization and the end of epoch 0
    k_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("lm_k/")}
    assert k_tags == {f"lm_k/{name}" for name in model.network.lm_coefficients()} and k_tags


def test_nfe_monitor_draws_the_step_size_distribution_over_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VectorODEClassifierModule(
        solver=dict(method="dopri5", rtol=1e-5, atol=1e-5), input_dim=2, network=dict(hidden_width=8)
    )
    data = ConcentricSpheresDataModule(dim=2, num_train=64, num_test=32, batch_size=16)
    trainer = _trainer(tmp_path, [NFEMonitor(histogram_every_n_steps=2)], max_epochs=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    trainer.logger.experiment.flush()
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "train/log10_step_size" in events.Tags()["histograms"]
    histograms = events.Histograms("train/log10_step_size")
    # 4 steps per epoch: every 2 steps, and at each epoch's end (nothing left to draw there)
    assert [h.step for h in histograms] == [2, 4, 6, 8]
    assert histograms[-1].histogram_value.num >= 2  # two batches' accepted steps, at least one each
    assert histograms[-1].histogram_value.min < 0.0  # log10: steps shorter than the interval [0, 1]
