"""Exceptions with actionable messages, shared by blocks, models and callbacks."""

from __future__ import annotations


class ModelFailure(Exception):
    """Base of the errors that mean the model itself failed, not the run: no interrupt checkpoint is
    written for them, so the last good checkpoint stays the newest one."""


class SolverFailedError(ModelFailure, RuntimeError):
    """An ODE solver could not integrate (step size underflow, or too many steps)."""


class NonFiniteLossError(ModelFailure, FloatingPointError):
    """A loss term became NaN or Inf."""


class DivergedError(ModelFailure, ArithmeticError):
    """A fit ended without errors but its model diverged (a loss exploded, or accuracy stayed at chance)."""


class PeerFailedError(ModelFailure, RuntimeError):
    """Another DDP process hit a model failure in this step; every rank stops together instead of hanging."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupted, or not a checkpoint)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path given by the user names no file, or ``last`` finds none."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a file size limit); the previous file of that name is kept."""


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint needs unpickling, which can run arbitrary code, and was not trusted explicitly."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model class than the one the config asks for."""


class ConfigurationError(ValueError):
    """Settings that are valid one by one but cannot work together (e.g. a schedule without a horizon)."""


class DatasetNotFoundError(ConfigurationError, FileNotFoundError):
    """A dataset's files are not where its datamodule looks for them (``data_dir`` and ``download`` say what to do)."""


class CorruptDatasetError(ConfigurationError):
    """A dataset file is present but cannot be read (truncated, corrupt, or another format)."""


class DatasetDownloadError(ConnectionError):
    """A dataset could not be downloaded (no network, a failing mirror, an unwritable folder)."""


def is_peer_crash(error: BaseException) -> bool:
    """Whether a collective failed because another process went away (gloo and NCCL wordings)."""
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message
        for sign in ("Connection closed by peer", "remote worker", "ncclRemoteError", "Connection reset by peer")
    )


def is_solver_failure(error: BaseException) -> bool:
    """True for an ODE solver's step-size underflow or step-count overflow: a :class:`SolverFailedError`, or
    torchdiffeq's raw ``AssertionError``/``RuntimeError`` for it."""
    if isinstance(error, SolverFailedError):
        return True
    message = str(error)
    return isinstance(error, (AssertionError, RuntimeError)) and (
        "underflow in dt" in message or "max_num_steps exceeded" in message
    )
