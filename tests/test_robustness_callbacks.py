"""AdversarialEvaluation, OODEvaluation and InferenceTimer on plain modules that are not ours."""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.callbacks import AdversarialEvaluation, InferenceTimer, OODEvaluation
from lightning_pdenets.callbacks.ood import perturb_pixels
from lightning_pdenets.errors import ConfigurationError
from tests.trainers import quiet_trainer

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# -- a user's own Lightning project: plain module + datamodule exposing mean/std ----------------------
class PlainClassifier(pl.LightningModule):
    """Someone else's LightningModule: a linear classifier with its own test step, forward -> logits."""

    def __init__(self, num_classes: int = 2, image_shape=(3, 8, 8), dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(int(torch.tensor(image_shape).prod()), num_classes)
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        return self.linear(self.dropout(x.flatten(1)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PlainData(pl.LightningDataModule):
    """Standardized random images; exposes the contract attributes ``mean`` and ``std``."""

    mean, std = MEAN, STD

    def __init__(self, num_classes: int = 2, n: int = 32, size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        pixels = 0.25 + 0.5 * torch.rand(n, 3, size, size, generator=generator)
        self.x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        self.y = torch.arange(n) % num_classes

    def _loader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    train_dataloader = val_dataloader = test_dataloader = _loader


def _normalized(pixels):
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# -- AdversarialEvaluation ---------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attack_matches_closed_form_worst_case_of_linear_classifier(attack):
    """For a 2-class linear classifier the worst L∞ perturbation is x + ε·sign(w_other − w_true) (in pixels)."""
    model = PlainClassifier(num_classes=2).eval()
    epsilon = 3 / 255
    callback = AdversarialEvaluation(epsilons=[epsilon], attacks=[attack], pgd_steps=20, mean=MEAN, std=STD)
    data = PlainData()
    x, y = data.x[:8], data.y[:8]
    outputs = callback.attack_batch(model, x, y)

    # closed form in pixel space: logits = W (p - m)/s + b, so the pixel-space weights are W / s
    pixels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    weights = (model.linear.weight.view(2, 3, 8, 8) / torch.tensor(STD).view(1, 3, 1, 1)).detach()
    direction = torch.stack([weights[1 - label] - weights[label] for label in y]).sign()
    worst = (pixels + epsilon * direction).clamp(0, 1)  # images lie in [0.25, 0.75]: no clipping
    expected_logits = model(_normalized(worst)).detach()
    got = outputs[f"{attack}_eps3"]
    torch.testing.assert_close(got, expected_logits, rtol=1e-4, atol=1e-4)
    # the margin of the true class drops by exactly ε·||w_true − w_other||_1
    clean_margin = (outputs["clean"].gather(1, y[:, None]) - outputs["clean"].gather(1, 1 - y[:, None])).squeeze(1)
    adv_margin = (got.gather(1, y[:, None]) - got.gather(1, 1 - y[:, None])).squeeze(1)
    drop = torch.stack([(weights[label] - weights[1 - label]).abs().sum() for label in y]) * epsilon
    torch.testing.assert_close(clean_margin - adv_margin, drop, rtol=1e-3, atol=1e-4)


def test_attack_runs_in_eval_mode_and_leaves_parameters_untouched():
    model = PlainClassifier(num_classes=2, dropout=0.5).train()
    model.linear.bias.requires_grad_(False)  # e.g. a frozen part during fine-tuning
    model.linear.weight.grad = torch.full_like(model.linear.weight, 7.0)  # accumulated by the user
    grad_before = model.linear.weight.grad
    weights_before = model.linear.weight.detach().clone()
    data = PlainData()
    callback = AdversarialEvaluation(epsilons=["1/255"], mean=MEAN, std=STD, pgd_steps=3)
    model.modes_seen.clear()
    callback.attack_batch(model, data.x[:8], data.y[:8])
    assert model.modes_seen and not any(model.modes_seen)  # every forward of the attacks ran in eval mode
    assert model.training and model.dropout.training  # modes restored
    assert model.linear.weight.grad is grad_before and torch.all(grad_before == 7.0)
    assert model.linear.bias.grad is None and not model.linear.bias.requires_grad
    assert model.linear.weight.requires_grad
    assert torch.equal(model.linear.weight, weights_before)


def test_attack_works_inside_inference_mode_and_is_seeded():
    model = PlainClassifier(num_classes=2).eval()
    data = PlainData()
    callback = AdversarialEvaluation(epsilons=["3/255"], attacks=["pgd"], mean=MEAN, std=STD, pgd_steps=2)
    state = torch.get_rng_state()
    with torch.inference_mode():  # what Lightning's test loop does
        first = callback.attack_batch(model, data.x[:8], data.y[:8], seed=5)["pgd_eps3"]
        second = callback.attack_batch(model, data.x[:8], data.y[:8], seed=5)["pgd_eps3"]
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_callback_logs_every_attack_and_eps_for_a_plain_module(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, data = PlainClassifier(num_classes=10), PlainData(num_classes=10)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="adv")
    callback = AdversarialEvaluation(num_batches=2, pgd_steps=2)  # mean/std read from the datamodule
    trainer = pl.Trainer(callbacks=[callback], logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.test(model, datamodule=data)
    metrics = trainer.callback_metrics
    for name in ("fgsm", "pgd"):
        for eps in ("0.5", "1", "3"):
            for k in ("top1", "top5"):
                assert 0.0 <= float(metrics[f"adv/{name}_eps{eps}/{k}"]) <= 1.0
    assert float(metrics["adv/clean/top5"]) >= float(metrics["adv/clean/top1"])
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert "adv/accuracy_vs_eps" in events.Tags()["images"]


def test_binary_linear_model_accuracy_cannot_rise_under_attack():
    model, data = PlainClassifier(num_classes=2), PlainData(num_classes=2)
    callback = AdversarialEvaluation(
        epsilons=["1/255", "3/255", "30/255"], attacks=["pgd"], num_batches=None, pgd_steps=5
    )
    trainer = pl.Trainer(callbacks=[callback], logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    m = trainer.callback_metrics
    accuracies = [
        float(m[key]) for key in ("adv/clean/top1", "adv/pgd_eps1/top1", "adv/pgd_eps3/top1", "adv/pgd_eps30/top1")
    ]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] < accuracies[0]
    assert "adv/pgd_eps1/top5" not in m  # top-5 is meaningless with two classes


def test_validation_attacks_every_n_epochs(tmp_path):
    model, data = PlainClassifier(num_classes=2), PlainData(num_classes=2)
    callback = AdversarialEvaluation(epsilons=["1/255"], attacks=["fgsm"], num_batches=1, every_n_val_epochs=2)
    seen = []

    class Spy(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append("val_adv/fgsm_eps1/top1" in trainer.callback_metrics)

    trainer = pl.Trainer(
        callbacks=[callback, Spy()],
        logger=False,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_train_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    assert seen == [False, True]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epsilons=[2.0]), "must lie in [0, 1]"),
        (dict(epsilons=["one/255"]), "fractions like '1/255'"),
        (dict(epsilons=[]), "non-empty list"),
        (dict(attacks=["cw"]), "subset of ['fgsm', 'pgd', 'spsa', 'autoattack']"),
        (dict(pgd_steps=0), "`pgd_steps` must be an integer >= 1"),
        (dict(pgd_step_size=-1.0), "pgd_step_size"),
        (dict(num_batches=0), "`num_batches` must be an integer >= 1 or None"),
        (dict(mean=[0.5]), "both `mean` and `std`"),
        (dict(mean=[0.5], std=[0.0]), "`std` entries must be > 0"),
        (dict(spsa_num_batches=0), "`spsa_num_batches` must be an integer >= 1, got 0"),
        (dict(spsa_steps=0), "`spsa_steps` must be an integer >= 1, got 0"),
        (dict(spsa_samples=2.5), "`spsa_samples` must be an integer >= 1, got 2.5"),
        (dict(spsa_delta=0), "`spsa_delta` must be a finite number > 0, got 0"),
        (dict(spsa_lr=-0.01), "`spsa_lr` must be a finite number > 0, got -0.01"),
        (dict(gradient_solver={"method": "rk4"}), "fixed-step solver 'rk4' needs `gradient_solver.step_size`"),
        (
            dict(gradient_solver={"methd": "rk4"}),
            "unknown `gradient_solver` setting(s) 'methd' (did you mean 'method'?)",
        ),
        (
            dict(gradient_solver={"method": "rk4", "step_size": 0.1}, attacks=["spsa"]),
            "`attacks` ['spsa'] has none; add 'fgsm', 'pgd' or 'autoattack', or drop `gradient_solver`",
        ),
        (dict(masking_margin=1.0), "`masking_margin` must be an accuracy difference in [0, 1), got 1.0"),
        (dict(gradient_solver="rk4"), "`gradient_solver` must be a mapping of solver settings"),
    ],
)
def test_adversarial_rejects_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as error:
        AdversarialEvaluation(**kwargs)
    assert message in str(error.value)


def test_epsilon_fractions_are_parsed():
    callback = AdversarialEvaluation(epsilons=["3/255", 0.5 / 255, "1/255"])
    assert callback.epsilons == pytest.approx([0.5 / 255, 1 / 255, 3 / 255])


# -- gradient masking: black-box SPSA, a stand-in solver for gradients, robust accuracy -------------------
class QuantizedClassifier(PlainClassifier):
    """Masks gradients by construction: the input is rounded first, and rounding has zero gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(x * 5) / 5)


class TinyCNN(PlainClassifier):
    """A plain differentiable CNN: white-box attacks work on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def masking_check(model: pl.LightningModule, **kwargs) -> tuple[dict[str, float], list[str]]:
    callback = AdversarialEvaluation(
        epsilons=[0.1],
        attacks=["fgsm", "pgd", "spsa"],
        pgd_steps=5,
        num_batches=None,
        spsa_num_batches=2,
        spsa_steps=10,
        spsa_samples=32,
        spsa_delta=0.05,
        **kwargs,
    )
    trainer = pl.Trainer(callbacks=[callback], logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, datamodule=PlainData(), verbose=False)
        first = {k: float(v) for k, v in trainer.callback_metrics.items()}
        trainer.test(model, datamodule=PlainData(), verbose=False)  # the same run again: warned only once
    return first, [str(w.message) for w in caught if "masked" in str(w.message)]


def test_black_box_attack_beating_every_white_box_attack_flags_gradient_masking():
    metrics, warned = masking_check(QuantizedClassifier())
    assert metrics["adv/fgsm_eps25.5/top1"] == metrics["adv/clean/top1"] > 0.4  # zero gradients: FGSM does nothing
    assert metrics["adv/spsa_eps25.5/top1"] < 0.1  # queries alone find the perturbations
    assert metrics["adv/gradient_masking_eps25.5"] == 1.0
    assert len(warned) == 1 and "black-box attack SPSA" in warned[0] and "Huang et al., MSML 2022" in warned[0]
    # a sample is robust only if no attack fools it: SPSA fooled the first two batches, PGD (all batches) did not
    assert metrics["adv/robust_eps25.5/top1"] < min(metrics["adv/fgsm_eps25.5/top1"], metrics["adv/pgd_eps25.5/top1"])


def test_gradient_masking_check_stays_silent_on_a_plain_cnn():
    metrics, warned = masking_check(TinyCNN())
    assert metrics["adv/pgd_eps25.5/top1"] < metrics["adv/clean/top1"]  # the white-box attack works
    assert metrics["adv/gradient_masking_eps25.5"] == 0.0
    assert warned == []


def test_robust_logits_count_a_sample_only_if_no_attack_fools_it():
    from lightning_pdenets.callbacks.adversarial import worst_case_logits

    targets = torch.tensor([0, 0, 0])
    fools_first = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # each attack alone keeps 2 of 3 correct
    fools_second = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    worst = worst_case_logits([fools_first, fools_second], targets)
    assert worst.argmax(dim=1).tolist() == [1, 1, 0]  # robust accuracy 1/3, below both 2/3


class ConvField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(y))


def ode_image_classifier() -> nn.Module:
    from lightning_pdenets.blocks import ODEBlock

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        ODEBlock(ConvField(), method="dopri5", rtol=1e-3, atol=1e-3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


@pytest.mark.parametrize("gradient_solver", [None, {"method": "rk4", "step_size": 0.25}], ids=["own", "stand-in"])
def test_white_box_gradients_go_through_the_stand_in_solver_and_the_model_keeps_its_own(gradient_solver):
    model = ode_image_classifier()
    block = model[1]
    before = block.solver_settings()
    seen: list[tuple[str, bool]] = []
    block.register_forward_pre_hook(
        lambda module, args: seen.append((module.solver_settings()["method"], torch.is_grad_enabled()))
    )
    callback = AdversarialEvaluation(
        epsilons=[0.1],
        attacks=["fgsm", "pgd", "spsa"],
        pgd_steps=2,
        spsa_steps=1,
        spsa_samples=2,
        gradient_solver=gradient_solver,
        mean=MEAN,
        std=STD,
    )
    data = PlainData()
    outputs = callback.attack_batch(model, data.x[:4], data.y[:4])
    crafting = {method for method, grad in seen if grad}  # FGSM and PGD differentiate
    evaluating = {method for method, grad in seen if not grad}  # clean, attacked inputs, SPSA's queries
    assert crafting == {"dopri5" if gradient_solver is None else "rk4"}
    assert evaluating == {"dopri5"}
    assert sum(grad for _, grad in seen) == 1 + 2  # one FGSM pass, two PGD steps
    assert block.solver_settings() == before  # restored exactly
    assert not torch.equal(outputs["clean"], outputs["pgd_eps25.5"])


def test_gradient_solver_on_a_model_without_ode_blocks_warns_and_attacks_as_is():
    callback = AdversarialEvaluation(
        epsilons=[0.1], attacks=["fgsm"], gradient_solver={"method": "rk4", "step_size": 0.25}, mean=MEAN, std=STD
    )
    data = PlainData()
    with pytest.warns(UserWarning, match=r"`gradient_solver` is set but PlainClassifier has no ODE block"):
        outputs = callback.attack_batch(PlainClassifier(), data.x[:4], data.y[:4])
    assert set(outputs) == {"clean", "fgsm_eps25.5", "robust_eps25.5"}


# -- OODEvaluation -------------------------------------------------------------------------------------
def test_gaussian_noise_has_the_requested_std_in_pixel_units():
    pixels = torch.full((16, 3, 32, 32), 0.5)
    noisy = perturb_pixels(pixels, "gaussian_noise", torch.Generator().manual_seed(0), noise_std=0.1)
    assert (noisy - pixels).std().item() == pytest.approx(0.1, rel=0.03)
    assert (noisy - pixels).mean().abs().item() < 0.005


@pytest.mark.parametrize("size, crop", [(64, 56), (32, 28)])
def test_center_crop_keeps_exactly_the_central_fraction(size, crop):
    """56/64 of the side is kept (scaled for other sizes): a frame just outside the crop disappears."""
    pixels = torch.ones(2, 3, size, size)
    margin = (size - crop) // 2
    pixels[..., margin : margin + crop, margin : margin + crop] = 0.25
    out = perturb_pixels(pixels, "center_crop", torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


@pytest.mark.parametrize("name", ["rotation", "color_jitter"])
def test_random_perturbations_are_per_image_seeded_and_leave_global_rng_alone(name):
    torch.manual_seed(3)
    pixels = torch.rand(1, 3, 16, 16).repeat(4, 1, 1, 1)
    state = torch.get_rng_state()
    first = perturb_pixels(pixels, name, torch.Generator().manual_seed(0))
    again = perturb_pixels(pixels, name, torch.Generator().manual_seed(0))
    other = perturb_pixels(pixels, name, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # independent draws per image
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_rotation_by_a_fixed_angle_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.rand(1, 3, 16, 16)
    out = perturb_pixels(pixels, "rotation", torch.Generator().manual_seed(0), rotation_degrees=1e-9)
    torch.testing.assert_close(out, TF.rotate(pixels, 0.0))


def test_ood_callback_logs_each_perturbation_reproducibly():
    results = []
    for _ in range(2):
        model, data = PlainClassifier(num_classes=10, image_shape=(3, 16, 16)), PlainData(num_classes=10, size=16)
        trainer = pl.Trainer(
            callbacks=[OODEvaluation()], logger=False, accelerator="cpu", devices=1, enable_progress_bar=False
        )
        trainer.test(model, datamodule=data, verbose=False)
        results.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("ood/")})
    expected = {
        f"ood/{p}/{k}" for p in ("gaussian_noise", "center_crop", "rotation", "color_jitter") for k in ("top1", "top5")
    }
    assert set(results[0]) == expected
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(perturbations=["blur"]), "subset of ['gaussian_noise'"),
        (dict(noise_std=0), "noise_std"),
        (dict(crop_size=70), "must not exceed `reference_size`"),
        (dict(num_batches=0), "`num_batches` must be an integer >= 1 or None"),
    ],
)
def test_ood_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        OODEvaluation(**kwargs)
    assert message in str(error.value)


# -- InferenceTimer -------------------------------------------------------------------------------------
class SleepyClassifier(PlainClassifier):
    """Forward takes 20 ms plus compute, and records the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__(num_classes=10)
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        time.sleep(0.02)
        return super().forward(x)


def test_inference_timer_times_a_1000_image_batch_after_warmup():
    model, data = SleepyClassifier(), PlainData(num_classes=10)  # 32 test images, cycled to 1,000
    timer = InferenceTimer(batch_size=1000, num_warmup=2, num_repeats=3)
    trainer = pl.Trainer(callbacks=[timer], logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    assert model.batch_sizes[-5:] == [1000] * 5  # 2 warm-up + 3 timed passes on 1,000 images
    assert len(timer.last_times) == 3 and min(timer.last_times) >= 0.02
    seconds = float(trainer.callback_metrics["inference/seconds_per_batch"])
    assert 0.02 <= seconds < 1.0
    assert float(trainer.callback_metrics["inference/images_per_second"]) == pytest.approx(1000 / seconds, rel=1e-5)


def test_inference_timer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1, got 0"):
        InferenceTimer(batch_size=0)
    with pytest.raises(ValueError, match="`num_repeats` must be an integer >= 1"):
        InferenceTimer(num_repeats=0)


# -- ODE networks: adjoint attacks and NFE counters ---------------------------------------------------------
def test_callbacks_on_an_adjoint_ode_network_leave_gradients_alone():
    from lightning_pdenets.architectures import odenet_mobilenet
    from lightning_pdenets.protocols import find_ode_blocks

    net = odenet_mobilenet(
        solver=dict(adjoint=True), channels=16, expanded_channels=32, num_blocks=2, patch_size=8, num_classes=10
    )
    (block,) = find_ode_blocks(net)
    x, y = torch.rand(4, 3, 64, 64), torch.arange(4)  # [0, 1] pixels
    outputs = AdversarialEvaluation(epsilons=["3/255"], pgd_steps=2).attack_batch(net, x, y)
    OODEvaluation().evaluate_batch(net.eval(), x)
    InferenceTimer(batch_size=4, num_warmup=1, num_repeats=1).time_model(net, x)
    assert block.nfe_backward > 0  # the attacks backpropagated through the adjoint solve
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.isfinite(v).all() for v in outputs.values())
    assert not torch.equal(outputs["clean"], outputs["fgsm_eps3"])  # the attack moved the logits


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-first", "monitor-last"])
def test_evaluation_passes_of_callbacks_never_reach_the_logged_nfe(monitor_first: bool):
    """Attacks, OOD tests and timing run the model many times per test batch; none of it is the model's NFE."""
    from lightning_pdenets.callbacks import NFEMonitor
    from lightning_pdenets.data import DigitsDataModule
    from lightning_pdenets.models import RKNetModule

    model = RKNetModule(network=dict(width=8, num_downsamples=1))  # rk4, 4 steps: 16 evaluations per forward pass
    evaluations = [
        AdversarialEvaluation(epsilons=[0.1], pgd_steps=2, num_batches=2),
        OODEvaluation(num_batches=2),
        InferenceTimer(batch_size=8, num_warmup=1, num_repeats=1),
    ]
    monitor = NFEMonitor()
    callbacks = [monitor, *evaluations] if monitor_first else [*evaluations, monitor]
    trainer = quiet_trainer(callbacks=callbacks, limit_test_batches=2)
    block = model.network.feature
    before = block.nfe_forward
    trainer.test(model, datamodule=DigitsDataModule(batch_size=16), verbose=False)
    assert trainer.callback_metrics["test/nfe_forward"].item() == 16.0
    assert block.nfe_forward - before > 2 * 16  # the callbacks did evaluate the model
    assert any(key.startswith("adv/pgd_") for key in trainer.callback_metrics)  # the attack ran and logged


def test_paper_evaluation_on_a_framework_model_and_datamodule(tmp_path):
    """The Tiny ImageNet configs' callbacks at test time: normalization comes from the datamodule."""
    from lightning_pdenets.data import TinyImageNetDataModule
    from lightning_pdenets.models import IsometricMobileNetModule
    from tests.fakedata.tinyimagenet import fake_tinyimagenet

    data = TinyImageNetDataModule(**fake_tinyimagenet(tmp_path))
    model = IsometricMobileNetModule(network=dict(channels=16, expanded_channels=32, num_blocks=2, patch_size=8))
    callbacks = [
        AdversarialEvaluation(num_batches=1, pgd_steps=2),
        OODEvaluation(num_batches=1),
        InferenceTimer(batch_size=8, num_warmup=1, num_repeats=1),
    ]
    trainer = pl.Trainer(callbacks=callbacks, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    keys = set(trainer.callback_metrics)
    assert {
        "test/acc_top1",
        "adv/fgsm_eps0.5/top5",
        "adv/pgd_eps3/top1",
        "ood/rotation/top5",
        "inference/seconds_per_batch",
    } <= keys
    assert callbacks[0]._warned_raw_pixels is False  # mean/std were found on the datamodule


# -- inputs the pixel-space evaluations cannot take --------------------------------------------------------------
def _attack(callback: AdversarialEvaluation, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> object:
    return callback.attack_batch(model, x, y)


def _perturb(callback: OODEvaluation, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> object:
    return callback.evaluate_batch(model, x)


@pytest.mark.parametrize(
    ("callback_class", "evaluate"),
    [(lambda **kw: AdversarialEvaluation(epsilons=[0.1], **kw), _attack), (OODEvaluation, _perturb)],
    ids=["adversarial", "ood"],
)
def test_standardized_inputs_without_their_normalization_are_refused_not_clipped(callback_class, evaluate) -> None:
    # they were clipped to [0, 1] as "pixels": a model perfect on the clean batch scored at chance, silently
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x, y = torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ConfigurationError, match=r"spans \[-\d.*: clipping it to \[0, 1\] would change the clean"):
        evaluate(callback_class(), model, x, y)
    with pytest.raises(ConfigurationError, match=r"de-normalized with mean=\[0\.5\] and std=\[2\.0\]"):
        evaluate(callback_class(mean=[0.5], std=[2.0]), model, x, y)  # the wrong normalization: refused too
    evaluate(callback_class(mean=[0.5], std=[0.25]), model, x.clamp(-2, 2), y)  # the right one is taken
    with pytest.raises(ConfigurationError, match=r"needs batches of shape \(N, C, H, W\), got \(8, 64\)"):
        evaluate(callback_class(), nn.Linear(64, 2), torch.rand(8, 64), y)


def test_color_jitter_on_images_with_two_channels_names_the_perturbation_to_drop() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(ConfigurationError, match="`color_jitter` needs images with 1 or 3 channels, got 2"):
        OODEvaluation().evaluate_batch(model, torch.rand(4, 2, 8, 8))
    OODEvaluation(perturbations=["gaussian_noise", "rotation"], crop_size=7, reference_size=8).evaluate_batch(
        model, torch.rand(4, 2, 8, 8)
    )


# -- the same images and draws on one process and on N (sample positions in the evaluation set) ------------
def test_batch_positions_follow_the_sampler_that_deals_samples_out_to_the_ranks() -> None:
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data import DistributedSampler

    from lightning_pdenets.evaluation import batch_positions

    data = TensorDataset(torch.arange(11))
    plain = batch_positions(DataLoader(data, batch_size=4), 2, 3)
    assert plain.indices.tolist() == [8, 9, 10] and plain.among_first(2).tolist() == [False] * 3
    rank1 = DataLoader(data, batch_size=4, sampler=UnrepeatedDistributedSampler(data, 3, 1, shuffle=False))
    assert batch_positions(rank1, 0, 4).indices.tolist() == next(iter(rank1))[0].tolist() == [1, 4, 7, 10]
    # a padding DistributedSampler repeats the first samples: rank 2 of 3 gets 2, 5, 8 and the padded 0
    padded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 3, 2, shuffle=False))
    assert batch_positions(padded, 0, 4).indices.tolist() == [2, 5, 8, 0]
    assert batch_positions(rank1, 0, 4).among_first(1).tolist() == [True, False, False, False]  # first 4 of the set
    for unknown in (DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=None), None):
        positions = batch_positions(unknown, 1, 4)
        assert positions.indices is None
        assert positions.among_first(2).all() and not positions.among_first(1).any()  # per-process batches


def _simulated_ranks(world_size: int, batch_size: int = 8) -> list[DataLoader]:
    """The test loader each rank of a ``world_size``-process run builds (data/loading.py), here in one process."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    data = PlainData(num_classes=10, n=36)
    dataset = TensorDataset(data.x, data.y)
    if world_size == 1:
        return [DataLoader(dataset, batch_size=batch_size)]
    return [
        DataLoader(dataset, batch_size=batch_size, sampler=UnrepeatedDistributedSampler(dataset, world_size, r, False))
        for r in range(world_size)
    ]


def _per_sample_outputs(callback: pl.Callback, method: str, loaders: list[DataLoader]) -> dict[str, dict[int, Any]]:
    """``{key: {sample: logits}}`` of every call of ``callback.<method>`` over test runs on ``loaders`` (one per rank).

    Rows are matched to samples by their image, so this reads what was evaluated whatever the callback reports.
    """
    images = loaders[0].dataset.tensors[0].flatten(1)
    outputs: dict[str, dict[int, Any]] = {}
    evaluate = getattr(callback, method)

    def spy(model, x, *args, **kwargs):
        result = evaluate(model, x, *args, **kwargs)
        rows = [int((images == row).all(1).nonzero()) for row in x.flatten(1).cpu()]
        for key, logits in result.items():
            outputs.setdefault(key, {}).update(zip(rows, logits))
        return result

    setattr(callback, method, spy)
    for loader in loaders:
        quiet_trainer(callbacks=[callback]).test(PlainClassifier(num_classes=10), dataloaders=loader, verbose=False)
    return outputs


def test_ood_perturbs_the_same_images_alike_on_one_process_and_on_two() -> None:
    runs = [
        _per_sample_outputs(
            OODEvaluation(
                perturbations=["gaussian_noise", "rotation"], noise_std=0.3, num_batches=3, mean=MEAN, std=STD
            ),
            "evaluate_batch",
            _simulated_ranks(world_size),
        )
        for world_size in (1, 2)
    ]
    one, two = runs
    assert one.keys() == two.keys() == {"gaussian_noise", "rotation"}
    for name in one:
        assert sorted(one[name]) == sorted(two[name]) == list(range(24)), "the first 3 × 8 samples of the set"
        for sample, logits in one[name].items():
            torch.testing.assert_close(two[name][sample], logits, msg=f"{name} of sample {sample}")


def test_adversarial_attacks_the_same_images_from_the_same_starts_on_one_process_and_on_two() -> None:
    def callback() -> AdversarialEvaluation:
        return AdversarialEvaluation(
            epsilons=["8/255"],
            attacks=["pgd", "spsa"],
            pgd_steps=2,
            num_batches=2,
            spsa_num_batches=1,
            spsa_steps=1,
            spsa_samples=2,
            mean=MEAN,
            std=STD,
            log_figure=False,
        )

    one, two = (_per_sample_outputs(callback(), "attack_batch", _simulated_ranks(n)) for n in (1, 2))
    assert sorted(one["clean"]) == sorted(two["clean"]) == list(range(16))
    assert sorted(one["spsa_eps8"]) == sorted(two["spsa_eps8"]) == list(range(8))  # SPSA: the first 8 of them
    for sample, logits in one["pgd_eps8"].items():  # the random start is drawn per image: the same on 2 ranks
        torch.testing.assert_close(two["pgd_eps8"][sample], logits, msg=f"PGD on sample {sample}")


def test_a_loader_of_unknown_order_falls_back_to_per_batch_seeds_with_a_warning() -> None:
    data = PlainData(num_classes=10, n=16)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=8, shuffle=True)
    callback = OODEvaluation(perturbations=["gaussian_noise"], num_batches=1, mean=MEAN, std=STD)
    with pytest.warns(UserWarning, match=r"its sampler is RandomSampler.*depend on the number of processes") as caught:
        quiet_trainer(callbacks=[callback]).test(PlainClassifier(num_classes=10), dataloaders=loader, verbose=False)
    assert sum("cannot tell which samples" in str(w.message) for w in caught) == 1  # once, not per batch
