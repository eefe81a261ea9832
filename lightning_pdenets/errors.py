"""Exceptions with actionable messages, shared by blocks, models and callbacks."""

from __future__ import annotations


class SolverFailedError(RuntimeError):
    """An ODE solver could not integrate (step size underflow, or too many steps)."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupted, or not a checkpoint)."""
