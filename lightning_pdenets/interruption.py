"""Ending a run on SIGTERM: a collective stop decision between batches, and a watchdog for stuck processes.

Lightning turns SIGTERM into :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` between training
and evaluation batches. Two cases it does not cover:

- **Long work inside one batch or one hook** (an attack, a solver-swap or step-adaptation grid): the callbacks
  call :func:`raise_if_stop_requested` between their units of work and raise :class:`RunInterrupted`, which
  names what was interrupted.
- **A process blocked in a collective** that a peer never joins: Python runs signal handlers only between
  bytecodes, so the blocked main thread never sees SIGTERM until the collective times out.
  :class:`StopWatchdog` notices the signal from a thread (through :func:`signal.set_wakeup_fd`, written by the C
  handler even while the main thread blocks), forwards it to the launched worker processes, and, if the
  process makes no progress (no :func:`beat` at a batch's end) for the grace period, prints one line and exits
  with code 143. The files on disk are complete: checkpoints are written to a temporary file and renamed
  (:mod:`lightning_pdenets.checkpoints`), so the last good checkpoint stays the newest readable one.

:data:`RUN_RECORD` says, for the message after a stop, which checkpoints this process's fit wrote or resumed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "EXIT_SIGTERM",
    "GRACE_ENVIRONMENT_VARIABLE",
    "RUN_RECORD",
    "RunInterrupted",
    "RunRecord",
    "SigtermBeforeStart",
    "StopWatchdog",
    "beat",
    "failed_like_rank_zero",
    "failed_peer",
    "leave_process_group",
    "raise_if_stop_requested",
    "release_peers_after_local_failure",
    "stop_requested",
]

EXIT_SIGTERM = 128 + signal.SIGTERM
"""Exit status after SIGTERM, as a shell reports a process that SIGTERM ended."""

GRACE_ENVIRONMENT_VARIABLE = "PDENETS_STOP_GRACE_SECONDS"
"""Seconds a process may take to stop cleanly after SIGTERM before the watchdog ends it (default 20)."""

DEFAULT_GRACE_SECONDS = 20.0


class RunInterrupted(SIGTERMException):
    """SIGTERM stopped long work inside a batch or hook; the message says what was interrupted."""


class SigtermBeforeStart(SystemExit):
    """SIGTERM arrived while no trainer stage handled it (setting up, e.g. preparing a dataset): the process ends."""

    def __init__(self) -> None:
        super().__init__(EXIT_SIGTERM)


@dataclass
class RunRecord:
    """What this process's fit left on disk to resume from, for the advice printed after a stop.

    :class:`~lightning_pdenets.callbacks.CheckpointOnInterrupt` keeps it (on every rank, no collective).

    Attributes:
        fit_started: Whether a fit got as far as ``on_fit_start`` (its checkpoint, if any, restored).
        log_root: The folder in which ``--ckpt_path last`` looks (the logger's ``save_dir``/``name``).
        resumed_from: The checkpoint the fit resumed from.
        written: Checkpoints the fit wrote (``ModelCheckpoint`` files, the interrupt checkpoint), oldest first.
        interrupt_checkpoint: The interrupt checkpoint written when the fit stopped.
        not_saved_because: Why a stop wrote no interrupt checkpoint although the fit made progress.
    """

    fit_started: bool = False
    log_root: str | None = None
    resumed_from: str | None = None
    written: list[str] = field(default_factory=list)
    interrupt_checkpoint: str | None = None
    not_saved_because: str | None = None

    def reset(self) -> None:
        """Forget the previous fit (a new one starts in this process)."""
        self.__init__()  # type: ignore[misc]

    def note_written(self, path: str | os.PathLike[str] | None) -> None:
        """Record a checkpoint the fit wrote (the newest last)."""
        if path:
            path = os.fspath(path)
            if path in self.written:
                self.written.remove(path)
            self.written.append(path)


RUN_RECORD = RunRecord()
"""The record of this process's current (or last) fit."""


HEARTBEAT_FACTOR = 3.0
"""The watchdog waits this many times the longest interval between two beats seen so far (if longer than the grace)."""

_BEATS = {"last": None, "longest": 0.0}


def beat() -> None:
    """Say that this process made progress (a batch ended); the :class:`StopWatchdog` ends only a process without."""
    now = time.monotonic()
    last = _BEATS["last"]
    if last is not None:
        _BEATS["longest"] = max(float(_BEATS["longest"] or 0.0), now - last)
    _BEATS["last"] = now


def stop_requested(trainer: pl.Trainer | None) -> bool:
    """Whether this process received SIGTERM (Lightning's flag); ``False`` outside a trainer.

    Rank-local on purpose, and no collective: evaluation ranks may hold different numbers of batches, so a
    per-batch collective would itself break the collective rule (:mod:`lightning_pdenets.metric_logging`). A
    rank that stops leaves without entering another collective; its peers stop too (the scheduler, torchrun
    and :class:`StopWatchdog` signal every process), or their next collective fails at once because the
    stopped process closed its connections.
    """
    return bool(getattr(trainer, "received_sigterm", False)) if trainer is not None else False


def raise_if_stop_requested(trainer: pl.Trainer | None, describe: Callable[[], str]) -> None:
    """Raise :class:`RunInterrupted`, with ``describe()`` as its message, when :func:`stop_requested`.

    Called between units of long work, it also calls :func:`beat`: that work is progress.
    """
    beat()
    if stop_requested(trainer):
        raise RunInterrupted(describe())


_FAILED_RANK_KEY = "lightning_pdenets/failed_rank"


_FAILURES = [0]
"""How many failures this process reported to its group's store (see :func:`release_peers_after_local_failure`)."""

_FAILED_LIKE_RANK_ZERO = [False]


def failed_like_rank_zero() -> bool:
    """Whether every DDP rank met this process's last error at one point, rank 0 with the same message: then rank 0
    alone reports it (:func:`release_peers_after_local_failure`); ``False`` on rank 0 and outside DDP."""
    return _FAILED_LIKE_RANK_ZERO[0]


AGREEMENT_SECONDS = 5.0
"""How long a DDP process that met an error waits for the others to report one too before it leaves alone."""


def leave_process_group() -> None:
    """Destroy this process's default process group, if there is one.

    Also at the end of a run that succeeded: a process that exits with a gloo group alive can be aborted during
    interpreter shutdown (``terminate called without an active exception``, exit status -6), when gloo's worker
    threads still hold tensors as Python tears down (pytorch/pytorch#190489).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def release_peers_after_local_failure(
    error: BaseException, where: str = "", wait_seconds: float = AGREEMENT_SECONDS
) -> bool:
    """Under DDP, leave the process group after an error only this process met; ``True`` if it left.

    An error met by one rank alone (a corrupt image in its shard) reaches no collective decision: its peers wait
    in the next collective of their step (the training step's finiteness check, the gradient all-reduce) until the
    collective timeout, while this rank's own exit handling (an interrupt checkpoint: metric syncs and a barrier)
    waits in collectives they never join. So each rank that fails reports it in the group's store (no collective)
    and waits up to ``wait_seconds`` for every rank to report the same failure point ``where``: an error every rank
    met (a bug in a hook, say) keeps the group, and the ranks go on together (an interrupt checkpoint). Otherwise
    this rank records its rank and error class (read by :func:`failed_peer`) and destroys the process group, which
    fails the peers' pending collective at once ("Connection closed by peer"); ``pdenets`` reports that in one
    line naming this rank. This process must enter no collective afterwards.

    When every rank failed at one point, a rank whose error message is rank 0's notes it
    (:func:`failed_like_rank_zero`), so that the message is printed once; rank 0, which hosts the store, waits until
    the others have read it. The store is polled with file descriptor 2 silenced: a store whose host just exited
    makes torch print a C++ stack.
    """
    _FAILED_LIKE_RANK_ZERO[0] = False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    world = torch.distributed.get_world_size()
    if world < 2:
        return False
    rank = torch.distributed.get_rank()
    message = f"{type(error).__name__}: {error}"
    try:
        with _silenced_stderr():
            store = torch.distributed.distributed_c10d._get_default_store()
            _FAILURES[0] += 1  # the n-th failure of every rank meets under one key, also when a group runs several fits
            key = f"lightning_pdenets/failed_at/{_FAILURES[0]}/{where}"
            store.set(f"{key}/message/{rank}", message)  # before counting: complete once the count is full
            failed = store.add(key, 1)
            deadline = time.monotonic() + wait_seconds
            while failed < world and time.monotonic() < deadline:
                time.sleep(0.05)
                failed = store.add(key, 0)
            if failed >= world:  # every rank failed here: they still meet in the same collectives
                if rank != 0:
                    _FAILED_LIKE_RANK_ZERO[0] = store.get(f"{key}/message/0").decode() == message
                read = store.add(f"{key}/read", 1)
                while rank == 0 and read < world and time.monotonic() < deadline + wait_seconds:
                    time.sleep(0.02)  # the store lives in this process: it must outlive the others' reads
                    read = store.add(f"{key}/read", 0)
                return False
            record = {"rank": rank, "error": [kind.__name__ for kind in type(error).__mro__]}
            store.set(_FAILED_RANK_KEY, json.dumps(record))
    except Exception:  # best effort: the peers then say "another process" without its rank
        _FAILED_LIKE_RANK_ZERO[0] = False
    leave_process_group()
    return True


def failed_peer(wait_seconds: float = 2.0) -> tuple[int, list[str]] | None:
    """The rank that left the process group after a local failure, and its error's class names (most derived
    first), as :func:`release_peers_after_local_failure` recorded them; ``None`` when nothing can be read."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_seconds))
        with _silenced_stderr():  # a store that left with the failed rank 0 makes torch print a C++ stack
            if not store.check([_FAILED_RANK_KEY]):
                return None
            record = json.loads(store.get(_FAILED_RANK_KEY))
        return int(record["rank"]), [str(name) for name in record["error"]]
    except Exception:  # any store failure: the caller says "another process"
        return None


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """File descriptor 2 to ``/dev/null`` for the block (torch's C++ warnings bypass ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class StopWatchdog:
    """After SIGTERM, end this process if it makes no progress and does not stop by itself.

    Start it once, in the main thread, before the work (``pdenets`` does). It keeps whatever SIGTERM handler is
    installed (Lightning's, which stops the run cleanly between batches): it only watches. On SIGTERM it sends
    SIGTERM on to this process's child processes (the DDP workers Lightning launched, which a ``kill`` of the
    parent alone would not reach), then waits.

    How it decides: the loops :func:`beat` at every batch's end (``SigtermFlagOnly`` does), and so does long work
    between its units. The process is ended when, since SIGTERM or since the last beat after it, whichever is
    later, no beat came for ``max(grace_seconds, 3 x the longest interval between two beats seen so far)``. A
    process that goes on stopping (a validation that ends before the stop, a long training step, the interrupt
    checkpoint) lives; one blocked (in a collective a peer never joined, in a long C call) prints one line naming
    the cause and the advice, and exits with :data:`EXIT_SIGTERM` without running further Python code. Before
    the first beat (setting up) and in a first batch longer than the grace, only the grace applies.

    Args:
        grace_seconds: Seconds to wait after SIGTERM (default: ``$PDENETS_STOP_GRACE_SECONDS`` or 20).
        describe: Returns the advice printed when the watchdog ends the process (e.g. how to resume).
    """

    def __init__(self, grace_seconds: float | None = None, describe: Callable[[], str] | None = None) -> None:
        if grace_seconds is None:
            grace_seconds = _grace_from_environment()
        if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float)) or not grace_seconds > 0:
            raise ValueError(f"`grace_seconds` must be a positive number of seconds, got {grace_seconds!r}.")
        self.grace_seconds = float(grace_seconds)
        self.describe = describe or (lambda: "")
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._previous_handler: object = None
        self._stopped = threading.Event()

    def start(self) -> StopWatchdog:
        """Start watching (main thread only; a no-op where signals cannot be watched)."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "set_wakeup_fd"):
            return self
        self._previous_handler = signal.getsignal(signal.SIGTERM)
        if self._previous_handler in (signal.SIG_DFL, None):
            # the C-level handler writes the wakeup fd only for signals with a Python handler; until Lightning
            # installs its own, this one ends the run at once, as the default disposition would
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(True)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="pdenets-stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and restore the SIGTERM handler found at :meth:`start` (for callers that go on running)."""
        self._stopped.set()
        if self._writer is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(-1)
        if self._previous_handler in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._writer.close()  # the watching thread reads the end of the stream and returns
        self._writer = None

    def _watch(self) -> None:
        assert self._reader is not None
        while True:
            try:
                received = self._reader.recv(64)
            except OSError:
                return
            if not received:
                self._reader.close()
                return
            if signal.SIGTERM in received:
                break
        received_at = time.monotonic()
        _forward_to_children(signal.SIGTERM)
        while True:
            limit = max(self.grace_seconds, HEARTBEAT_FACTOR * float(_BEATS["longest"] or 0.0))
            last = _BEATS["last"]
            since = received_at if last is None else max(received_at, float(last))
            remaining = since + limit - time.monotonic()
            if remaining <= 0:
                break
            if self._stopped.wait(remaining):
                return  # the work ended by itself (its caller handles the exit)
        advice = self.describe()
        sys.stderr.write(
            f"pdenets: rank {os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))} did not stop within "
            f"{round(limit, 1):g} s of SIGTERM and made no progress (blocked, e.g. in a collective operation another "
            f"process never joined); ended with exit code {EXIT_SIGTERM}.{(' ' + advice) if advice else ''}\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_SIGTERM)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SigtermBeforeStart


def _grace_from_environment() -> float:
    text = os.environ.get(GRACE_ENVIRONMENT_VARIABLE)
    if not text:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"${GRACE_ENVIRONMENT_VARIABLE} must be a positive number of seconds, got {text!r}.")
    return value


def _forward_to_children(signum: int) -> None:
    """Send ``signum`` to this process's children (read from ``/proc``; elsewhere nothing is forwarded)."""
    for pid in _child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except OSError:
            continue


def _child_pids(parent: int) -> list[int]:
    children: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(entry))
    return children
