"""AutoAttack (Croce & Hein, ICML 2020) in AdversarialEvaluation through the optional extra torchattacks 3.5.1.

Tiny models on fabricated images: a linear classifier (AutoAttack must reach its closed-form worst case), a
classifier that masks gradients by a non-differentiable threshold (only the gradient-free Square stage can
fool it: the masking flag must rise, Huang et al., MSML 2022), and an ODE classifier whose gradient-based
stages go through a stand-in solver.
"""

from __future__ import annotations

import itertools
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.callbacks import AdversarialEvaluation
from tests.trainers import quiet_trainer

EPSILON = 0.25
SIDE = 6  # 1 x 6 x 6 images: 36 pixels


def test_missing_extra_fails_at_construction_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` now raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r'pip install "lightning_pdenets\[autoattack\]"'):
        AdversarialEvaluation(epsilons=[0.1], attacks=["pgd", "autoattack"])
    AdversarialEvaluation(epsilons=[0.1], attacks=["fgsm", "pgd", "spsa"])  # the advertorch attacks need no extra


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(attacks=["autoattack", "apgd"]),
            "`attacks` must be a non-empty subset of ['fgsm', 'pgd', 'spsa', 'autoattack']",
        ),
        (dict(attacks=["autoattack"], autoattack_steps=0), "`autoattack_steps` must be an integer >= 1, got 0"),
        (dict(attacks=["autoattack"], autoattack_queries=2.5), "`autoattack_queries` must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_autoattack_arguments_are_named(kwargs, message):
    pytest.importorskip("torchattacks")
    with pytest.raises(ValueError) as error:
        AdversarialEvaluation(epsilons=[0.1], **kwargs)
    assert message in str(error.value)


def test_gradient_solver_accepts_autoattack_as_its_white_box_attack():
    pytest.importorskip("torchattacks")
    callback = AdversarialEvaluation(
        epsilons=[0.1], attacks=["autoattack"], gradient_solver={"method": "rk4", "step_size": 0.5}
    )
    assert callback.gradient_solver == {"method": "rk4", "step_size": 0.5}


# -- models and data -------------------------------------------------------------------------------------------
class Linear(pl.LightningModule):
    """A 10-class linear classifier on [0, 1] pixels (no normalization)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(SIDE * SIDE, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))


class Thresholded(Linear):
    """Masks gradients by construction: a pixel counts only above 0.5, and the threshold has zero gradient.

    Class 0 wins on the clean images (all pixels 0.3, none above 0.5); class 1 wins once more than half of the
    36 pixels (18 or more) are pushed above 0.5 (possible at ε = 0.25). A random start in the ε-ball lifts a pixel above
    0.5 with probability 0.1, so the gradient-based stages, which see zero gradients, stay stuck there;
    Square's ±ε stripes lift half the pixels at once and climb from there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = (torch.sign(x - 0.5) + 1) / 2  # zero gradient everywhere, still connected to x
        count = on.flatten(1).sum(dim=1, keepdim=True)
        logits = torch.full((x.shape[0], 10), -100.0, device=x.device) + 0 * self.linear(x.flatten(1))
        logits[:, 0] = SIDE * SIDE / 2 - 0.5  # no ties: Square stops on a zero margin, argmax keeps class 0
        logits[:, 1] = count[:, 0]
        return logits


def images(n: int = 8, value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if value is not None:
        return torch.full((n, 1, SIDE, SIDE), value), torch.zeros(n, dtype=torch.long)
    return 0.3 + 0.4 * torch.rand(n, 1, SIDE, SIDE, generator=generator), torch.arange(n) % 10


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=4)


def run_test(
    model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, **kwargs
) -> tuple[dict[str, float], list[str]]:
    callback = AdversarialEvaluation(epsilons=[EPSILON], num_batches=None, log_figure=False, **kwargs)
    trainer = quiet_trainer(callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, dataloaders=loader(x, y), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, [
        str(w.message) for w in caught if "masked" in str(w.message)
    ]


# -- AutoAttack itself -----------------------------------------------------------------------------------------
def test_autoattack_reaches_the_closed_form_worst_case_of_a_linear_classifier():
    """For a linear classifier an image is robust at ε exactly when every margin exceeds ε·||w_y − w_j||_1."""
    pytest.importorskip("torchattacks")
    model = Linear().eval()
    x, _ = images(16)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(dim=1)  # every image correctly classified
        weights = model.linear.weight
        margins = logits.gather(1, y[:, None]) - logits  # (images, classes)
        spread = (weights[y][:, None, :] - weights[None]).abs().sum(-1)  # worst-case margin drop per unit ε
        ratio = torch.where(margins > 0, margins / spread, torch.full_like(margins, float("inf"))).min(dim=1).values
    epsilon = float(ratio.median())  # half of the images are robust at this budget
    assert epsilon < 0.3  # images lie in [0.3, 0.7]: no clipping, the closed form is exact
    robust = ratio > epsilon
    assert 0 < int(robust.sum()) < 16
    key = f"eps{round(epsilon * 255, 4):g}"
    callback = AdversarialEvaluation(
        epsilons=[epsilon], attacks=["autoattack"], autoattack_steps=20, autoattack_queries=50
    )
    state = torch.get_rng_state()
    outputs = callback.attack_batch(model, x, y, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left untouched
    assert torch.equal(outputs[f"autoattack_{key}"].argmax(dim=1) == y, robust)
    # stage by stage the robust set only shrinks
    stages = ["autoattack-apgd-ce", "autoattack-apgd-t", "autoattack-fab-t", "autoattack"]
    correct = [(outputs[f"{stage}_{key}"].argmax(dim=1) == y) for stage in stages]
    assert all(bool((later <= earlier).all()) for earlier, later in itertools.pairwise(correct))
    assert torch.equal(outputs[f"robust_{key}"].argmax(dim=1) == y, robust)
    again = callback.attack_batch(model, x, y, seed=3)
    assert torch.equal(again[f"autoattack_{key}"], outputs[f"autoattack_{key}"])  # seeded


def test_autoattack_perturbations_stay_in_the_eps_ball_and_pixel_range():
    pytest.importorskip("torchattacks")
    model = Linear().eval()
    x, y = images(8)
    mean, std = (0.5,), (0.25,)
    callback = AdversarialEvaluation(
        epsilons=[0.1], attacks=["autoattack"], autoattack_steps=5, autoattack_queries=20, mean=mean, std=std
    )
    captured: dict = {}
    original = callback.autoattack

    def spy(*args, **kwargs):
        captured.update(original(*args, **kwargs))
        return captured

    callback.autoattack = spy
    callback.attack_batch(model, (x - 0.5) / 0.25, y)
    for images_after in captured.values():
        assert images_after.min() >= 0 and images_after.max() <= 1
        assert (images_after - x).abs().max() <= 0.1 + 1e-6


def test_autoattack_needs_three_classes():
    pytest.importorskip("torchattacks")
    model = nn.Linear(SIDE * SIDE, 2)
    x = torch.rand(4, 1, SIDE, SIDE)
    callback = AdversarialEvaluation(epsilons=[0.1], attacks=["autoattack"], autoattack_steps=2, autoattack_queries=2)
    with pytest.raises(ValueError, match=r"need at least 3 classes.*returns 2"):
        callback.attack_batch(nn.Sequential(nn.Flatten(), model), x, torch.zeros(4, dtype=torch.long))


# -- gradient masking ------------------------------------------------------------------------------------------
def test_square_fooling_what_the_gradient_stages_left_raises_the_masking_flag():
    pytest.importorskip("torchattacks")
    x, y = images(8, value=0.3)
    metrics, warned = run_test(
        Thresholded(), x, y, attacks=["pgd", "autoattack"], pgd_steps=5, autoattack_steps=10, autoattack_queries=200
    )
    assert metrics["adv/clean/top1"] == 1.0
    assert metrics["adv/pgd_eps63.75/top1"] == 1.0  # zero gradients: PGD is stuck
    assert metrics["adv/autoattack-fab-t_eps63.75/top1"] == 1.0  # and so are APGD-CE, APGD-T and FAB-T
    assert metrics["adv/autoattack_eps63.75/top1"] == 0.0  # Square's queries alone fool every image
    assert metrics["adv/robust_eps63.75/top1"] == 0.0
    assert metrics["adv/gradient_masking_eps63.75"] == 1.0
    assert len(warned) == 1 and "Square" in warned[0] and "Huang et al., MSML 2022" in warned[0]


@pytest.mark.parametrize("margin, flagged", [(0.2, 1.0), (0.3, 0.0)])
def test_masking_margin_tolerates_a_small_square_gain(margin, flagged):
    pytest.importorskip("torchattacks")
    foolable, _ = images(2, value=0.3)
    out_of_reach, _ = images(6, value=0.0)  # 0 + ε stays below the threshold: no attack can fool these
    x = torch.cat([foolable, out_of_reach])
    y = torch.zeros(8, dtype=torch.long)
    metrics, warned = run_test(
        Thresholded(), x, y, attacks=["autoattack"], autoattack_steps=10, autoattack_queries=200, masking_margin=margin
    )
    assert metrics["adv/autoattack-fab-t_eps63.75/top1"] == 1.0
    assert metrics["adv/autoattack_eps63.75/top1"] == 0.75  # Square's gain: 0.25
    assert metrics["adv/gradient_masking_eps63.75"] == flagged and len(warned) == flagged


def test_masking_flag_stays_down_where_the_gradient_stages_do_the_work():
    pytest.importorskip("torchattacks")
    x, y = images(8)
    with torch.no_grad():
        y = Linear()(x).argmax(dim=1)
    metrics, warned = run_test(
        Linear(),
        x,
        y,
        attacks=["fgsm", "pgd", "spsa", "autoattack"],
        pgd_steps=10,
        autoattack_steps=20,
        autoattack_queries=100,
        spsa_steps=5,
        spsa_samples=8,
    )
    assert metrics["adv/autoattack_eps63.75/top1"] < metrics["adv/clean/top1"]
    assert metrics["adv/autoattack_eps63.75/top1"] == metrics["adv/autoattack-fab-t_eps63.75/top1"]
    assert metrics["adv/autoattack_eps63.75/top1"] <= metrics["adv/pgd_eps63.75/top1"]
    assert metrics["adv/gradient_masking_eps63.75"] == 0.0 and warned == []


# -- ODE models: gradients through a stand-in solver -----------------------------------------------------------
class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(y))


@pytest.mark.parametrize("gradient_solver", [None, {"method": "rk4", "step_size": 0.5}], ids=["own", "stand-in"])
def test_gradient_stages_go_through_the_stand_in_solver_and_square_through_the_model_s_own(gradient_solver):
    pytest.importorskip("torchattacks")
    from lightning_pdenets.blocks import ODEBlock

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        ODEBlock(Field(), method="dopri5", rtol=1e-3, atol=1e-3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 10),
    )
    block = model[1]
    before = block.solver_settings()
    seen: list[tuple[str, bool]] = []
    block.register_forward_pre_hook(
        lambda module, args: seen.append((module.solver_settings()["method"], torch.is_grad_enabled()))
    )
    x, _ = images(4)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    callback = AdversarialEvaluation(
        epsilons=[0.1],
        attacks=["autoattack"],
        autoattack_steps=2,
        autoattack_queries=3,
        gradient_solver=gradient_solver,
    )
    callback.attack_batch(model, x, y)
    differentiated = {method for method, grad in seen if grad}
    assert differentiated <= {"dopri5" if gradient_solver is None else "rk4"} and differentiated
    if gradient_solver is not None:
        assert "dopri5" in {method for method, grad in seen if not grad}  # Square and the checks: the own solver
    assert block.solver_settings() == before  # restored exactly
