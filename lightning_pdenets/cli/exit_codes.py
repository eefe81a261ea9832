"""How a ``pdenets`` run ends: its exit status, which errors are the user's, and what to tell after a stop.

``main`` (:mod:`lightning_pdenets.cli.entry`) maps exceptions to these statuses, and the CLI
(:mod:`lightning_pdenets.cli.app`) ends Ctrl-C with :data:`EXIT_INTERRUPTED`; both read this table.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_pdenets.checkpoints import find_resume_checkpoint
from lightning_pdenets.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    DatasetDownloadError,
    UntrustedCheckpointError,
)
from lightning_pdenets.interruption import EXIT_SIGTERM, RUN_RECORD, failed_peer
from lightning_pdenets.migration import LegacyCheckpointError

EXIT_USAGE = 2
"""Exit status of bad arguments, as argparse uses."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C, as a shell reports a process that SIGINT ended."""

EXIT_MODEL_FAILURE = 1
"""Exit status when the model failed (a NaN loss, a solver that could not integrate): a run that did not succeed."""

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_MODEL_FAILURE",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "SUBCOMMANDS",
    "USER_ERRORS",
    "after_ctrl_c_advice",
    "after_sigterm_advice",
    "peer_failure",
    "resume_advice",
    "subcommand_of",
]

SUBCOMMANDS = ("fit", "validate", "test", "predict")

USER_ERRORS = (
    ConfigurationError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
    LegacyCheckpointError,
    DatasetDownloadError,
    MisconfigurationException,  # Lightning's check of a setting, also mid-run: a ModelCheckpoint monitor no metric has
)
"""Errors of the user's input that reach the user as one message and :data:`EXIT_USAGE`, not a traceback."""


def subcommand_of(args: Sequence[str]) -> str | None:
    """The subcommand (``fit``, ``test``, ...) among the command-line arguments, or ``None``."""
    return next((arg for arg in args if arg in SUBCOMMANDS), None)


def after_sigterm_advice(subcommand: str | None) -> str:
    """What to do after SIGTERM stopped ``subcommand``: resume a fit from what it wrote, rerun an evaluation."""
    if subcommand == "fit":
        return resume_advice(processes=True)
    if subcommand in ("test", "validate", "predict"):
        return (
            f"Nothing of this {subcommand} run was written; run the same command again to {subcommand} from the start."
        )
    return ""


def after_ctrl_c_advice(subcommand: str) -> str:
    """What to do after Ctrl-C stopped ``subcommand``."""
    return resume_advice() if subcommand == "fit" else f"Run the same command again to {subcommand} from the start."


def resume_advice(processes: bool = False) -> str:
    """How to go on after a fit stopped, from what it left on disk (:data:`~lightning_pdenets.interruption.RUN_RECORD`).

    Names the checkpoint to resume from and ``--ckpt_path last`` when ``last`` finds that very file, its path
    otherwise; without one, says that nothing was written and to run the command again. ``processes`` adds that
    the resume may use another number of processes.
    """
    record = RUN_RECORD
    if not record.fit_started:
        return "Nothing of this fit was written; run the same command again."
    not_saved = f"{record.not_saved_because}. " if record.not_saved_because else ""
    point = _resume_point()
    if point is None:
        return (
            f"{not_saved}No checkpoint of this fit was written, so there is nothing to resume: run the same command "
            f"again without --ckpt_path."
        )
    path, found_by_last = point
    what = "the interrupt checkpoint" if _same_file(path, record.interrupt_checkpoint) else "the last checkpoint"
    anywhere = " (on any number of processes)" if processes else ""
    if found_by_last:
        return (
            f"{not_saved}The fit resumes with the same command and --ckpt_path last{anywhere}. It finds {what}, "
            f"{str(path)!r}."
        )
    return (
        f"{not_saved}The fit resumes with the same command and --ckpt_path {shlex.quote(str(path))}{anywhere}, "
        f"{what} (--ckpt_path last would not find it)."
    )


def _resume_point() -> tuple[Path, bool] | None:
    """The checkpoint a stopped fit resumes from, and whether ``--ckpt_path last`` finds that file; ``None``."""
    record = RUN_RECORD
    own = [
        Path(path)
        for path in (record.interrupt_checkpoint, *reversed(record.written), record.resumed_from)
        if path and os.path.isfile(path)
    ]
    if not own:
        return None
    found = find_resume_checkpoint(record.log_root) if record.log_root else None
    if found is not None and any(_same_file(found, path) for path in own):
        return found, True
    if record.interrupt_checkpoint and _same_file(own[0], record.interrupt_checkpoint):
        return own[0], False
    return max(own, key=lambda path: path.stat().st_mtime), False


def _same_file(path: str | os.PathLike[str] | None, other: str | os.PathLike[str] | None) -> bool:
    if not path or not other:
        return False
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def peer_failure() -> tuple[int, str]:
    """Exit status and one-line message of a process whose collective failed because another DDP process left.

    The process that left after an error of its own recorded its rank and error class
    (:func:`~lightning_pdenets.interruption.release_peers_after_local_failure`): this one exits with the status
    that error has (:data:`EXIT_USAGE` for a user error such as a corrupt dataset file), so the job's status is the
    cause's, and points at that rank's message instead of repeating it.
    """
    peer = failed_peer()
    if peer is None:
        return EXIT_MODEL_FAILURE, (
            "another DDP process ended while this one waited for it in a collective operation, so this one stopped "
            "too. The other process's own error message names the cause and what to do."
        )
    rank, names = peer
    user_error = any(kind.__name__ in names for kind in USER_ERRORS)
    return EXIT_USAGE if user_error else EXIT_MODEL_FAILURE, (
        f"another DDP process (rank {rank}) failed with {names[0]}, so this one stopped too. Rank {rank}'s own "
        f"error message names the cause and what to do."
    )
