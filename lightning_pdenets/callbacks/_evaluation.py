"""Evaluation toolkit shared by the callbacks (private: its names may change between releases).

Callbacks that run the model for their own purposes (attacks, out-of-distribution tests, solver checks
and swaps, timing) wrap those passes in :func:`callback_pass`, so that the function evaluations of ODE
blocks spent there are never counted as the model's own by :class:`~lightning_pdenets.callbacks.NFEMonitor`,
whatever the order of the callbacks. The blocks' counters only ever increase; nothing is reset or restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["callback_pass", "in_callback_pass"]

_depth = 0


@contextlib.contextmanager
def callback_pass() -> Iterator[None]:
    """Mark the forward and backward passes run inside as a callback's own, not the model's step."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_callback_pass() -> bool:
    """Whether a :func:`callback_pass` is in progress."""
    return _depth > 0
