"""``main``: the ``pdenets`` console script and ``python -m lightning_pdenets``, which turns errors into exit codes.

Kept apart from :mod:`lightning_pdenets.cli.exit_codes` (the table of statuses and advice), which the CLI class
reads too: ``main`` builds the CLI, so the table cannot live beside it without an import cycle.
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_pdenets.cli.app import build_cli
from lightning_pdenets.cli.arguments import debugging
from lightning_pdenets.cli.exit_codes import (
    EXIT_INTERRUPTED,
    EXIT_MODEL_FAILURE,
    EXIT_SIGTERM,
    EXIT_USAGE,
    USER_ERRORS,
    after_sigterm_advice,
    peer_failure,
    resume_advice,
    subcommand_of,
)
from lightning_pdenets.errors import CheckpointWriteError, ModelFailure, is_peer_crash
from lightning_pdenets.interruption import (
    RUN_RECORD,
    SigtermBeforeStart,
    StopWatchdog,
    failed_like_rank_zero,
    leave_process_group,
)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``pdenets`` and ``python -m lightning_pdenets``.

    Exits with 2 for bad arguments and checkpoints (one message, no traceback), with 1 when the model fails
    (a NaN loss, a solver failure: the message with its remedies, no traceback; the last good checkpoint is
    kept), and with 1 when a checkpoint cannot be written (a full disk); a DDP process whose peer left after an
    error of its own says so in one line, with that error's exit status
    (:func:`~lightning_pdenets.cli.exit_codes.peer_failure`), and an error every rank met alike is printed by rank
    0 alone; with 143 after SIGTERM (Lightning stops cleanly but would exit 0, which a scheduler or ``&&`` reads
    as success), also while setting up. A process that makes no progress for ``$PDENETS_STOP_GRACE_SECONDS``
    (20 s) after SIGTERM, e.g. one blocked in a collective that another DDP process never joined, is ended by
    :class:`~lightning_pdenets.interruption.StopWatchdog` with 143 and one line. ``JSONARGPARSE_DEBUG=true``
    shows the tracebacks.
    """
    subcommand = subcommand_of(sys.argv[1:] if args is None else args)
    RUN_RECORD.reset()
    watchdog = StopWatchdog(describe=lambda: after_sigterm_advice(subcommand)).start()
    try:
        build_cli(args)
    except KeyboardInterrupt:  # before the Trainer runs (it ends its own Ctrl-C, see PDENetsCLI): nothing to resume
        sys.stderr.write(
            f"pdenets: {subcommand or 'the run'} interrupted by Ctrl-C before it started "
            f"(exit code {EXIT_INTERRUPTED}).\n"
        )
        sys.exit(EXIT_INTERRUPTED)
    except SigtermBeforeStart:  # no trainer stage handled it: setting up (a dataset download), or between stages
        if RUN_RECORD.fit_started:
            sys.stderr.write(
                f"pdenets: {subcommand or 'the run'} stopped by SIGTERM (exit code {EXIT_SIGTERM}). "
                f"{after_sigterm_advice(subcommand)}\n"
            )
        else:
            sys.stderr.write(
                f"pdenets: {subcommand or 'the run'} stopped by SIGTERM before the run started (exit code "
                f"{EXIT_SIGTERM}); nothing was written, so there is nothing to resume: run the same command again.\n"
            )
        sys.exit(EXIT_SIGTERM)
    except SIGTERMException as error:
        what = f" during {error}" if str(error) else ""
        sys.stderr.write(
            f"pdenets: {subcommand or 'the run'} stopped by SIGTERM{what} (exit code {EXIT_SIGTERM}). "
            f"{after_sigterm_advice(subcommand)}\n"
        )
        sys.exit(EXIT_SIGTERM)
    except USER_ERRORS as error:
        if debugging():
            raise
        _report(f"error: {error}")
        sys.exit(EXIT_USAGE)
    except ModelFailure as error:
        if debugging():
            raise
        _report(f"error: {type(error).__name__}: {error}")
        sys.exit(EXIT_MODEL_FAILURE)
    except CheckpointWriteError as error:
        if debugging():
            raise
        advice = f" {resume_advice()}" if subcommand == "fit" else ""
        _report(f"error: {error}{advice}")
        sys.exit(EXIT_MODEL_FAILURE)
    except RuntimeError as error:
        if debugging() or not is_peer_crash(error):
            raise
        code, message = peer_failure()  # another DDP process left after an error of its own, named in its message
        sys.stderr.write(f"error: {message}\n")
        sys.exit(code)
    finally:
        watchdog.stop()
        leave_process_group()  # before interpreter shutdown, which a live gloo group can abort


def _report(message: str) -> None:
    """Print ``message``, unless every DDP rank failed alike and rank 0 prints it."""
    if not failed_like_rank_zero():
        sys.stderr.write(message + "\n")
