"""Figures and text for the loggers that show them (TensorBoard), from models and callbacks alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = ["add_figure", "add_text"]


def _writers(trainer: pl.Trainer, method: str) -> list[Any]:
    """The experiments of ``trainer``'s loggers that have ``method`` (TensorBoard's ``SummaryWriter``), rank 0 only."""
    if not trainer.is_global_zero:
        return []
    return [experiment for lg in trainer.loggers if hasattr(experiment := getattr(lg, "experiment", None), method)]


def add_figure(trainer: pl.Trainer, tag: str, make_figure: Callable[[], Figure]) -> None:
    """Add ``make_figure()`` under ``tag`` to every logger that takes figures (TensorBoard), on rank 0 only.

    The figure is built only when such a logger exists; build it with ``matplotlib.figure.Figure`` (not pyplot),
    which leaves the user's backend and open figures alone and works headless.
    """
    writers = _writers(trainer, "add_figure")
    if not writers:
        return
    figure = make_figure()
    for writer in writers:
        writer.add_figure(tag, figure, global_step=trainer.global_step)


def add_text(trainer: pl.Trainer, tag: str, text: str) -> None:
    """Add ``text`` under ``tag`` to every logger that takes text (TensorBoard), on rank 0 only."""
    for writer in _writers(trainer, "add_text"):
        writer.add_text(tag, text, global_step=trainer.global_step)
