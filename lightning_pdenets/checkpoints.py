"""Reading, choosing and writing checkpoints: loading runs no code, and a half-written file is never chosen."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_pdenets._discovery import import_class
from lightning_pdenets.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
)

__all__ = [
    "INTERRUPT_CHECKPOINT_NAME",
    "AtomicCheckpointIO",
    "check_checkpoint",
    "checkpoint_class_path",
    "find_resume_checkpoint",
    "load_checkpoint",
    "needs_unpickling",
    "new_file_mode",
    "save_atomically",
    "unreadable_reason",
]

INTERRUPT_CHECKPOINT_NAME = "interrupted"
"""File stem of the checkpoint :class:`~lightning_pdenets.callbacks.CheckpointOnInterrupt` writes."""

TRUST_CKPT_PATH = "--weights_only false"
"""How a user trusts a ``--ckpt_path`` file that needs unpickling (Lightning's own argument of fit/test/...)."""


def load_checkpoint(path: str | Path, trusted: bool = False, how_to_trust: str = TRUST_CKPT_PATH) -> dict:
    """Load ``path`` on the CPU with ``torch.load(weights_only=True)``; unpickle only if ``trusted``.

    Args:
        path: A checkpoint file.
        trusted: Whether the user explicitly trusts this file to run code while it is unpickled.
        how_to_trust: The option that sets ``trusted``, named in the error.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        UntrustedCheckpointError: when the file holds pickled objects other than tensors and plain
            containers and ``trusted`` is false; nothing of it is executed.
        CorruptCheckpointError: when the file cannot be read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass an existing .ckpt file or `last`."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated, foreign or unsafe files
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise CorruptCheckpointError(_unreadable_message(path, error)) from error
    if not trusted:
        raise UntrustedCheckpointError(
            f"checkpoint {str(path)!r} holds pickled Python objects ({', '.join(unsafe[:5])}), and unpickling them "
            f"can run any code. Checkpoints written by this project never need it, so this file comes from "
            f"elsewhere or was crafted. Nothing of it was executed. If you trust the file and its source, load it "
            f"explicitly with {how_to_trust}."
        )
    # Reached only when the user explicitly trusts this file (--weights_only false / trust_pretrained_checkpoint).
    return torch.load(path, map_location="cpu", weights_only=False)


def check_checkpoint(path: str | Path, expected_class_path: str | None = None, trusted: bool = False) -> dict:
    """Load ``path`` like :func:`load_checkpoint`, and check that it is a Lightning checkpoint of the expected model.

    Args:
        path: A checkpoint file.
        expected_class_path: Import path of the model class the run asks for; a checkpoint whose
            recorded class (LightningCLI stores it in the hyperparameters) differs is refused.
        trusted: Passed to :func:`load_checkpoint`.

    Raises:
        CorruptCheckpointError: when the file cannot be read or holds no ``state_dict``.
        CheckpointMismatchError: when the checkpoint holds another model class.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, trusted=trusted)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CorruptCheckpointError(_corrupt_message(path, "is not a Lightning checkpoint: it holds no `state_dict`"))
    found = checkpoint_class_path(checkpoint)
    if expected_class_path and found and not _same_class(found, expected_class_path):
        config = path.parent.parent / "config.yaml"
        source = f" (its run saved it as {str(config)!r})" if config.is_file() else ""
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} holds a {found}, but the config asks for a {expected_class_path}. Pass the "
            f"config the checkpoint was trained with{source}, or a checkpoint of a "
            f"{expected_class_path.rsplit('.', 1)[-1]}."
        )
    return checkpoint


def _same_class(class_path: str, other_class_path: str) -> bool:
    """Whether two import paths name one class (``...models.RKNetModule`` and ``...models.odenet.RKNetModule``)."""
    if class_path == other_class_path:
        return True
    found = import_class(class_path)
    return found is not None and found is import_class(other_class_path)


def checkpoint_class_path(checkpoint: dict) -> str | None:
    """Import path of the model class LightningCLI recorded in ``checkpoint``, or ``None`` when it recorded none."""
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    class_path = hyper_parameters.get("_class_path") if isinstance(hyper_parameters, dict) else None
    return class_path if isinstance(class_path, str) else None


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (empty, truncated, not a checkpoint), or ``None`` when it reads.

    Cheap: tensors are memory-mapped, not read. A file that only needs trust is readable.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        if _unsafe_globals(path):
            return None
        return _first_line(error)
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        return "it holds no `state_dict` (not a Lightning checkpoint)"
    return None


def find_resume_checkpoint(log_root: str | Path) -> Path | None:
    """The newest readable ``last*.ckpt`` or ``interrupted.ckpt`` under ``log_root`` (all versions), or ``None``.

    Unreadable candidates (e.g. written while the disk was full) are skipped with a warning naming them.
    """
    candidates = sorted(
        (
            path
            for path in Path(log_root).glob("**/*.ckpt")
            if path.stem == INTERRUPT_CHECKPOINT_NAME or path.stem == "last" or path.stem.startswith("last-v")
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in candidates:
        reason = unreadable_reason(path)
        if reason is None:
            return path
        rank_zero_warn(f"--ckpt_path last: skipped {str(path)!r}, it cannot be read ({reason}).")
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local files to a temporary file in the same folder, then renaming.

    Lightning's own transaction writes the temporary file in the system's temporary folder; when that
    lies on another file system, the final move is a copy, which a full disk interrupts and leaves a
    truncated checkpoint behind. A rename within one folder is atomic: the old file or the new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(checkpoint, path)


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to a temporary file in ``path``'s folder, flushed to disk, then renamed to ``path``.

    A crash or a full disk leaves the old file or the new one, never a truncated one; the file gets the mode a
    plain ``open()`` would give it.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, new_file_mode())  # mkstemp's 0600 would make checkpoints unlike every other output
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def needs_unpickling(path: str | Path) -> bool:
    """Whether ``path`` holds objects that ``torch.load(weights_only=True)`` refuses."""
    return bool(_unsafe_globals(Path(path)))


def _unsafe_globals(path: Path) -> list[str]:
    """The non-allowlisted globals a weights-only load refuses in ``path`` (empty for unreadable files)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


# How the files torch.save writes begin: a zip archive (the default since torch 1.6), or a pickle (the legacy format)
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _unreadable_message(path: Path, error: BaseException) -> str:
    """Why a file that torch cannot load is refused: not a checkpoint at all, or a damaged one."""
    with path.open("rb") as handle:
        start = handle.read(8)
    if not start:
        return _corrupt_message(path, "is corrupt: the file is empty", damaged=True)
    if not start.startswith(_CHECKPOINT_MAGIC):
        return _corrupt_message(
            path, f"is not a checkpoint: torch.save writes a zip archive, and this file begins with {start!r}"
        )
    return _corrupt_message(path, f"is corrupt: it cannot be read ({_first_line(error)})", damaged=True)


def _corrupt_message(path: Path, problem: str, damaged: bool = False) -> str:
    """``checkpoint PATH <problem>.``, the checkpoints beside it that load, and what to pass instead."""
    readable: list[str] = []
    skipped: list[str] = []
    for other in sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: -p.stat().st_mtime):
        # a file that needs unpickling would be refused: it is no way out
        (skipped if unreadable_reason(other) or needs_unpickling(other) else readable).append(str(other))
    cause = " It was probably truncated by a crash or a full disk." if damaged else ""
    hint = f" Checkpoints in that folder that load, newest first: {readable[:5]}." if readable else ""
    if skipped:
        hint += f" Unreadable or refused, skipped: {skipped[:5]}."
    instead = "one of those" if readable else "another checkpoint"
    return (
        f"checkpoint {str(path)!r} {problem}.{cause}{hint} Pass {instead} with --ckpt_path PATH, "
        f"or (for fit) start afresh without --ckpt_path."
    )
