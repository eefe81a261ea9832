"""Settings given for this run that win over the hyperparameters stored in ``--ckpt_path``.

LightningCLI builds a resumed or evaluated model from the checkpoint's arguments, over the config's. Two kinds of
setting are meant to change there: learning rates of a resumed fit (a lower one after a NaN; the model applies it to
the restored optimizers, see ``ClassifierModule.on_train_start``), and the solver of ``test``/``validate``/``predict``
(the model applies the differences after loading, see :class:`lightning_pdenets.models.solver.ODESolverMixin`).
They are read before Lightning merges the checkpoint's arguments and put back after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jsonargparse import Namespace

EVALUATION_SUBCOMMANDS = ("test", "validate", "predict")


@dataclass
class GivenSettings:
    """The learning rates (``fit``) and the solver (evaluations) given in the config or on the command line."""

    learning_rates: dict[tuple[str, ...], Any] = field(default_factory=dict)
    evaluation_solver: Any = None

    @classmethod
    def read(cls, config: Namespace, subcommand: str) -> GivenSettings:
        """The settings ``config`` (the subcommand's) gives, before a checkpoint's hyperparameters are merged."""
        return cls(learning_rates(config) if subcommand == "fit" else {}, evaluation_solver(config, subcommand))

    def apply(self, config: Namespace) -> None:
        """Put the given settings back over those read from the checkpoint's hyperparameters."""
        set_learning_rates(config, self.learning_rates)
        if self.evaluation_solver is not None:
            config["model"]["init_args"]["solver"] = self.evaluation_solver


def evaluation_solver(config: Namespace, subcommand: str) -> Any:
    """The config's ``model.init_args.solver`` in ``test``/``validate``/``predict``, or ``None``."""
    if subcommand not in EVALUATION_SUBCOMMANDS:
        return None
    model: Any = config.get("model") or {}
    init_args = model.get("init_args")
    return init_args.get("solver") if hasattr(init_args, "get") else None


def is_learning_rate(key: str) -> bool:
    """Whether a model argument (or a setting of a dict-valued one) is a learning rate: ``lr`` or ``*_lr``."""
    return key.split(".")[-1] == "lr" or key.endswith("_lr")


def learning_rates(config: Namespace) -> dict[tuple[str, ...], Any]:
    """The model's learning-rate arguments as the config and command line set them, by path.

    ``lr`` and ``*_lr`` at any depth, in nested arguments and in dict-valued ones such as PR-Net's
    ``theta: {lr: 0.003}`` (path ``('theta', 'lr')``).
    """
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None:
        return {}
    rates: dict[tuple[str, ...], Any] = {}
    for key, value in init_args.items():
        if is_learning_rate(key):
            rates[(key,)] = value
        elif isinstance(value, dict):
            rates.update({(key, name): rate for name, rate in value.items() if is_learning_rate(name)})
    return rates


def set_learning_rates(config: Namespace, rates: dict[tuple[str, ...], Any]) -> None:
    """Put the given learning rates back over those read from the checkpoint's hyperparameters."""
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None:
        return
    for (key, *inner), value in rates.items():
        if key not in init_args:
            continue
        if not inner:
            init_args[key] = value
        elif isinstance(init_args[key], dict):  # a dict from the checkpoint: a copy with the given rate
            init_args[key] = {**init_args[key], inner[0]: value}
