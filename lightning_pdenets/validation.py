"""Argument checks shared by every constructor; each error names the argument and what it got."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["check_bool", "check_non_negative", "check_positive", "check_positive_int", "check_setting_names"]


def check_positive(value: Any, argument: str, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``value`` is a finite number > 0."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{argument}` must be a finite number > 0, got {value!r}.")


def check_non_negative(value: Any, argument: str) -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``value`` is a finite number >= 0 (a weight 0 turns off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{argument}` must be a finite number >= 0, got {value!r}.")


def check_positive_int(value: Any, argument: str, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``value`` is an integer >= ``minimum`` (or allowed None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{argument}` must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}."
        )


def check_bool(value: Any, argument: str) -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``value`` is True or False ("no" would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False, got {value!r}.")


def check_setting_names(names: Iterable[Any], valid: Sequence[str], argument: str) -> None:
    """Raise a ``ValueError`` naming each setting of the dict ``argument`` not in ``valid``, with the closest ones."""
    unknown = [name for name in names if name not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), valid, n=2)
        hints.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    raise ValueError(f"unknown `{argument}` setting(s) {', '.join(hints)}; valid names are {list(valid)}.")
