"""Checks the evaluation callbacks run in ``setup``: settings that contradict the data are refused before the run
(a :class:`~lightning_pdenets.errors.ConfigurationError`, one line with exit code 2 in the CLI), not after a fit
at its first validation or test. Every DDP rank holds the same datamodule, so all of them decide alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_pdenets.errors import ConfigurationError


def check_stats_match_data(owner: str, mean: Sequence[float] | None, trainer: Any) -> None:
    """An explicit ``mean`` (and ``std``, of the same length) needs one value per channel of the datamodule."""
    datamodule = getattr(trainer, "datamodule", None)
    channels = getattr(datamodule, "in_channels", None)
    if mean is not None and isinstance(channels, int) and not isinstance(channels, bool) and len(mean) != channels:
        raise ConfigurationError(
            f"{owner}: `mean`/`std` give {len(mean)} channels but {type(datamodule).__name__} has {channels}; give "
            f"one value per channel, or leave both unset to use the datamodule's normalization."
        )


def data_num_classes(trainer: Any) -> int | None:
    """The datamodule's ``num_classes``, or ``None`` when it has none."""
    value = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
