"""AutoAttack (Croce & Hein, ICML 2020) through torchattacks 3.5.1, an optional extra.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020: the *standard* version runs, in this order and each on the points the previous ones left
correctly classified, APGD-CE (100 iterations), APGD-T (targeted DLR loss, 9 target classes, 100 iterations),
FAB-T (9 target classes, 100 iterations) and the gradient-free Square attack (5,000 queries).

``torchattacks.AutoAttack(version="standard")`` builds exactly these four attacks but leaves APGD, APGD-T and
FAB-T at torchattacks' default of 10 iterations; :func:`standard_autoattack` builds it through torchattacks and
sets the iterations (default: the paper's 100). :func:`run_autoattack` then runs the four stages itself, as
torchattacks' ``MultiAttack`` does, so that the robust set after each stage is known: when Square (which only
queries outputs) fools points that the three gradient-based stages left robust, the model's gradients are
likely masked (Croce & Hein, section 5; Huang et al., MSML 2022, for adaptive-step neural ODEs).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTOATTACK_STAGES",
    "GRADIENT_STAGES",
    "INSTALL_HINT",
    "import_torchattacks",
    "run_autoattack",
    "standard_autoattack",
]

AUTOATTACK_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The stages of AutoAttack's standard version, in the order they run."""
GRADIENT_STAGES = ("apgd-ce", "apgd-t", "fab-t")
"""The stages that differentiate the model (Square only queries its outputs)."""
TORCHATTACKS_VERSION = "3.5.1"
INSTALL_HINT = (
    f"AutoAttack needs the optional extra torchattacks {TORCHATTACKS_VERSION}; install it with "
    f'`pip install "lightning_pdenets[autoattack]"` (or `pip install torchattacks=={TORCHATTACKS_VERSION}`).'
)


def import_torchattacks() -> ModuleType:
    """Return the ``torchattacks`` module.

    Raises:
        ImportError: when torchattacks is not installed, with the command that installs the extra.
    """
    try:
        return importlib.import_module("torchattacks")
    except ModuleNotFoundError as error:
        if error.name != "torchattacks":
            raise
        raise ImportError(INSTALL_HINT) from error


def standard_autoattack(
    model: nn.Module,
    epsilon: float,
    num_classes: int,
    seed: int = 0,
    steps: int = 100,
    queries: int = 5000,
) -> list[tuple[str, Any]]:
    """The four attacks of AutoAttack's standard L∞ version on ``model`` (a [0, 1]-pixel classifier).

    Args:
        model: Classifier on [0, 1] pixels returning logits.
        epsilon: L∞ budget in pixel units.
        num_classes: Number of classes (APGD-T and FAB-T target the ``num_classes - 1`` runner-up classes).
        seed: Seed of every stage's random start.
        steps: Iterations of APGD-CE, APGD-T and FAB-T (Croce & Hein: 100; torchattacks' default: 10).
        queries: Queries of Square (Croce & Hein: 5,000).

    Returns:
        ``[(stage, attack), ...]`` in the order of :data:`AUTOATTACK_STAGES`.
    """
    torchattacks = import_torchattacks()
    # torchattacks prints "Failed to set device automatically" for a model without parameters of its own
    # (``PixelSpace`` references the classifier without registering it); the device is set by the caller.
    with contextlib.redirect_stdout(io.StringIO()):
        auto = torchattacks.AutoAttack(
            model, norm="Linf", eps=epsilon, version="standard", n_classes=num_classes, seed=seed
        )
    attacks = list(getattr(getattr(auto, "_autoattack", None), "attacks", ()))
    expected = (torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square)
    if len(attacks) != len(expected) or not all(isinstance(a, kind) for a, kind in zip(attacks, expected)):
        raise ImportError(
            f"torchattacks {getattr(torchattacks, '__version__', '?')} builds AutoAttack differently from "
            f"{TORCHATTACKS_VERSION} (expected APGD, APGDT, FAB, Square); {INSTALL_HINT}"
        )
    for attack in attacks[:3]:
        attack.steps = steps
    attacks[3].n_queries = queries
    return list(zip(AUTOATTACK_STAGES, attacks))


def run_autoattack(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    num_classes: int,
    seed: int = 0,
    steps: int = 100,
    queries: int = 5000,
    gradient_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Run standard AutoAttack stage by stage; the adversarial images after each stage.

    Each stage attacks only the images that the clean pass and the earlier stages left correctly classified
    (as ``torchattacks.MultiAttack`` and Croce & Hein's reference code do); an image counts as fooled when
    ``model`` (evaluated outside ``gradient_context``) misclassifies it.

    Args:
        model: Classifier on [0, 1] pixels returning logits.
        pixels: Images in [0, 1].
        labels: True classes.
        epsilon: L∞ budget in pixel units.
        num_classes: Number of classes.
        seed: Seed of every stage's random start.
        steps: Iterations of the gradient-based stages.
        queries: Queries of Square.
        gradient_context: Entered around the gradient-based stages only (e.g. a stand-in ODE solver);
            Square and the success checks use the model as it is.

    Returns:
        ``{stage: images}`` for every stage of :data:`AUTOATTACK_STAGES`: the images after that stage and all
        earlier ones (an image is replaced by an adversarial one only where it fools ``model``). The entry of
        ``"square"`` is AutoAttack's result.
    """
    stages = standard_autoattack(model, epsilon, num_classes, seed=seed, steps=steps, queries=queries)
    adversarial = pixels.detach().clone()
    with torch.no_grad():
        robust = model(adversarial).argmax(dim=1) == labels
    snapshots: dict[str, torch.Tensor] = {}
    for stage, attack in stages:
        attack.set_device(pixels.device)
        indices = robust.nonzero().flatten()
        if indices.numel():
            if stage in GRADIENT_STAGES:
                context = gradient_context() if gradient_context is not None else contextlib.nullcontext()
            else:
                context = torch.no_grad()  # Square only queries; torchattacks leaves some queries under autograd
            with context:
                candidates = attack(pixels[indices], labels[indices]).detach()
            lower, upper = pixels[indices] - epsilon, pixels[indices] + epsilon
            candidates = torch.min(torch.max(candidates, lower), upper).clamp(0, 1)  # guard against round-off
            with torch.no_grad():
                fooled = model(candidates).argmax(dim=1) != labels[indices]
            adversarial[indices[fooled]] = candidates[fooled]
            robust[indices[fooled]] = False
        snapshots[stage] = adversarial.clone()
    return snapshots
