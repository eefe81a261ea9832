"""One dictionary of architecture names, filled by the ``@register_architecture`` decorator.

Each entry records a factory building a plain ``nn.Module`` plus a tiny configuration and input
shape, so that ``tests/test_architectures.py`` can run forward/backward on every registered model.
The factory's signature is the one list of an architecture's arguments: models hand them over as one
``network`` dict, checked against it by :func:`resolve_network_arguments`.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import ArgumentParser
from torch import nn

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.validation import check_setting_names

__all__ = [
    "ARCHITECTURES",
    "DATA_FACTS",
    "MODEL_SUPPLIED_ARGUMENTS",
    "ArchitectureEntry",
    "NetworkOptions",
    "architecture_parameters",
    "check_data_facts",
    "create_architecture",
    "register_architecture",
    "resolve_network_arguments",
]

DATA_FACTS = ("num_classes", "in_channels", "image_size", "input_dim")
"""Architecture arguments that describe the data, not the network: models take them as arguments of their own,
which the CLI links from the datamodule, so they are never part of ``network``."""

MODEL_SUPPLIED_ARGUMENTS = ("solver",)
"""Architecture arguments that models supply from a hyperparameter of their own (``ODESolverMixin``'s resolved
``solver``), never part of ``network``."""

NetworkOptions = dict[str, Any]
"""The YAML/command-line form of an architecture's arguments: ``network: {width: 64}``."""


@dataclass(frozen=True)
class ArchitectureEntry:
    """A registered architecture.

    Attributes:
        factory: Callable returning the ``nn.Module``.
        input_shape: Per-sample input shape (C, H, W) or (D,) used by the registry test.
        tiny_kwargs: Keyword arguments giving a small instance for fast tests.
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, ArchitectureEntry] = {}


def register_architecture(
    name: str, input_shape: tuple[int, ...], tiny_kwargs: dict[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or function decorator adding a factory to :data:`ARCHITECTURES` under ``name``."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = ArchitectureEntry(factory, tuple(input_shape), dict(tiny_kwargs or {}))
        return factory

    return decorate


def _entry(name: str) -> ArchitectureEntry:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[name]


def create_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name``; unknown names list the registered ones."""
    return _entry(name).factory(**kwargs)


def architecture_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    """The parameters of the registered architecture ``name``'s factory (unknown names list the registered ones)."""
    return inspect.signature(_entry(name).factory).parameters


def resolve_network_arguments(
    name: str,
    network: Mapping[str, Any] | None,
    facts: Mapping[str, Any],
    supplied: Sequence[str] = (),
    model: str = "the model",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a model's ``network`` dict and data facts against architecture ``name``'s factory, and complete them.

    Args:
        name: A registered architecture.
        network: The model's ``network`` argument (None: every default).
        facts: The model's data facts (:data:`DATA_FACTS`), None where not given.
        supplied: Factory arguments the model supplies itself (e.g. ``solver``), refused in ``network``.
        model: The model's name, for error messages.

    Returns:
        ``network`` with every default filled in, and the data facts that the factory takes (defaults filled in;
        a square ``image_size`` given as (height, width) becomes one side).

    Raises:
        ConfigurationError: naming an unknown or misplaced argument (with the valid names), a value of the wrong
            type, or non-square images for an architecture that needs square ones.
    """
    parameters = architecture_parameters(name)
    if network is not None and not isinstance(network, Mapping):
        raise ConfigurationError(
            f"{model}: `network` must be a mapping of architecture {name!r}'s settings such as {{width: 64}}, got "
            f"{network!r}."
        )
    given = dict(network or {})
    where = f"`network` (architecture {name!r})"
    for key in given:
        if key in DATA_FACTS:
            raise ConfigurationError(
                f"{where}: {key!r} describes the data; set `model.init_args.{key}` instead "
                f"(the CLI takes it from the datamodule), not `network.{key}`."
            )
        if key in supplied:
            raise ConfigurationError(f"{where}: {key!r} is set by its own model argument `{key}`, not in `network`.")
    valid = [key for key in parameters if key not in DATA_FACTS and key not in supplied]
    try:
        check_setting_names(given, valid, "network")
    except ValueError as error:
        raise ConfigurationError(f"{where}: {error}") from None
    try:
        completed = _typed_parser(name, tuple(valid)).parse_object(given).as_dict() if valid else {}
    except ConfigurationError as error:
        raise ConfigurationError(f"{where}: {error}") from None
    taken: dict[str, Any] = {key: facts.get(key) for key in DATA_FACTS if key in parameters}
    for key, value in taken.items():
        if value is None:
            taken[key] = parameters[key].default
    if isinstance(taken.get("image_size"), (list, tuple)):
        height, width = taken["image_size"]
        if height != width:
            raise ConfigurationError(
                f"{model} (architecture {name!r}) needs square images, but `image_size` is "
                f"{height}x{width}; resize them in the datamodule."
            )
        taken["image_size"] = height
    return completed, taken


def check_data_facts(facts: Mapping[str, Any], model: str = "the model") -> None:
    """Refuse data facts (:data:`DATA_FACTS`) that no dataset has, naming the argument; ``None`` means not given.

    Raises:
        ConfigurationError: ``num_classes`` below 2, ``in_channels``/``input_dim`` below 1, or an ``image_size`` that
            is not a positive side or a (height, width) pair of them.
    """
    for name, smallest in (("num_classes", 2), ("in_channels", 1), ("input_dim", 1)):
        value = facts.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
            raise ConfigurationError(f"{model}: `{name}` must be an integer >= {smallest}, got {value!r}.")
    size = facts.get("image_size")
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    if size is not None and (
        len(sides) not in (1, 2) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides)
    ):
        raise ConfigurationError(
            f"{model}: `image_size` must be a positive side or a (height, width) pair of them, got {size!r}."
        )


@functools.cache
def _typed_parser(name: str, keys: tuple[str, ...]) -> ArgumentParser:
    """A jsonargparse parser of the factory's typed arguments ``keys``, whose errors say which one is wrong."""
    factory = ARCHITECTURES[name].factory
    target = factory.func if isinstance(factory, functools.partial) else factory
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    parser = _NetworkParser(exit_on_error=False)
    for key in keys:
        parameter = architecture_parameters(name)[key]
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        parser.add_argument(f"--{key}", type=hints.get(key, Any), default=default)
    return parser


class _NetworkParser(ArgumentParser):
    """Turns jsonargparse's type errors into one-line :class:`ConfigurationError`s naming the ``network`` key."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        key = re.search(r'Parser key "([^"]+)"', message)
        detail = re.search(r"Expected a (?:<class ')?([^'>]+)'?>?\.? Got value: (.*)", message)
        text = (
            f"`network.{key.group(1)}` expected {detail.group(1)}, got {detail.group(2)!r}"
            if key and detail
            else " ".join(message.split())
        )
        raise ConfigurationError(f"{text}.")
