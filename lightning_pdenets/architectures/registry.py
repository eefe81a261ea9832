"""One dictionary of architecture names, filled by the ``@register_architecture`` decorator.

Each entry records a factory building a plain ``nn.Module`` plus a tiny configuration and input
shape, so that ``tests/test_architectures.py`` can run forward/backward on every registered model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ["ARCHITECTURES", "ArchitectureEntry", "create_architecture", "register_architecture"]


@dataclass(frozen=True)
class ArchitectureEntry:
    """A registered architecture.

    Attributes:
        factory: Callable returning the ``nn.Module``.
        input_shape: Per-sample input shape (C, H, W) or (D,) used by the registry test.
        tiny_kwargs: Keyword arguments giving a small instance for fast tests.
        num_classes_kwarg: Name of the argument holding the number of classes, if any.
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes_kwarg: str = "num_classes"


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


def create_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name``; unknown names list the registered ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[name].factory(**kwargs)
