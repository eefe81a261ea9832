"""Reading, choosing and writing checkpoints: loading runs no code, and a half-written file is never chosen."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_pdenets._discovery import import_class
from lightning_pdenets.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
)

__all__ = [
    "INTERRUPT_CHECKPOINT_NAME",
    "AtomicCheckpointIO",
    "archive_damage",
    "check_checkpoint",
    "check_map_location",
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
        FileNotFoundError: when ``path`` is not a file (a folder included).
        UntrustedCheckpointError: when the file holds pickled objects other than tensors and plain
            containers and ``trusted`` is false; nothing of it is executed.
        CorruptCheckpointError: when the file cannot be read at all, or a record of its zip archive fails its
            CRC-32 check (checked before anything of it is loaded: torch.load does not check them).
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("**/*.ckpt") if p.is_file())[:3]
        example = f" (it holds {', '.join(repr(p) for p in inside)})" if inside else ""
        raise CheckpointNotFoundError(
            f"checkpoint {str(path)!r} is a folder, not a checkpoint file; pass a .ckpt file inside it{example} "
            f"or `last`."
        )
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass an existing .ckpt file or `last`."
        )
    damage = archive_damage(path)
    if damage is not None:
        raise CorruptCheckpointError(
            _corrupt_message(path, f"is corrupt: {damage}", cause=_CHANGED_BYTES)
        ) from zipfile.BadZipFile(damage)
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


def archive_damage(source: str | os.PathLike[str] | IO[bytes]) -> str | None:
    """What is damaged in a checkpoint's zip archive (the first record whose CRC-32 fails), or ``None``.

    ``torch.load`` does not check the CRCs, so changed bytes inside a tensor would load silently. A legacy
    (pickle) file has none to check, and one whose archive does not open (e.g. truncated) is left to
    ``torch.load``, which says why it cannot be read. A file object is read from its current position and
    put back there.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as file:
                return _archive_damage(file)
        except OSError:  # unreadable: the load that follows reports it
            return None
    return _archive_damage(source)


def _archive_damage(file: IO[bytes]) -> str | None:
    start = file.tell()
    try:
        if file.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return None
        file.seek(start)
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return None
        with archive:
            try:
                bad = archive.testzip()
            except Exception as error:  # zipfile raises several types for damaged headers and short reads
                return f"its zip archive cannot be read ({_first_line(error)})"
        return None if bad is None else f"its record {bad!r} fails its CRC-32 check"
    finally:
        file.seek(start)


def check_map_location(map_location: Any, argument: str = "map_location") -> None:
    """Refuse a ``map_location`` that ``torch.load`` would fail on partway: no device, or one this machine lacks.

    Accepted as by ``torch.load``: ``None``, a device (``'cpu'``, ``'cuda'``, ``'cuda:N'``, a ``torch.device``), a
    dict from saved locations to devices (strings, ``{'cuda:0': 'cpu'}``), or a callable ``(storage, location) ->
    storage``.

    Raises:
        ValueError: for a string that names no device, or a device this machine does not have.
        TypeError: for any other type.
    """
    if map_location is None or callable(map_location):
        return
    if isinstance(map_location, dict):
        for location, device in map_location.items():
            if not isinstance(location, str) or not isinstance(device, str):
                raise TypeError(
                    f"{argument} as a dict maps saved locations to devices, both strings as torch.load takes them "
                    f"(e.g. {{'cuda:0': 'cpu'}}); got {location!r}: {device!r}."
                )
            _check_device(device, f"{argument}[{location!r}]")
        return
    if isinstance(map_location, (str, bytes, torch.device)):
        _check_device(map_location, argument)
        return
    raise TypeError(
        f"{argument} must be a device ({_VALID_DEVICES}), a dict from saved locations to devices, or a callable "
        f"(storage, location) -> storage, as for torch.load; got {type(map_location).__name__} {map_location!r}. "
        f"Pass e.g. {argument}='cpu'."
    )


_VALID_DEVICES = "'cpu', 'cuda', 'cuda:N' or a torch.device"


def _check_device(value: Any, argument: str) -> None:
    try:
        device = torch.device(value.decode() if isinstance(value, bytes) else value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{argument}={value!r} names no device; pass {_VALID_DEVICES} (N below torch.cuda.device_count(), "
            f"{torch.cuda.device_count()} here), or a dict or callable as torch.load takes (e.g. {argument}='cpu')."
        ) from None
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and count == 0:
        raise ValueError(f"{argument}={value!r}: this machine has no CUDA GPU; pass {argument}='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(
            f"{argument}={value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; pass one of "
            f"those, 'cuda' or 'cpu'."
        )
    available = getattr(getattr(torch, device.type, None), "is_available", None)  # torch.mps, torch.xpu, ...
    if device.type not in ("cpu", "cuda", "meta") and callable(available) and not available():
        raise ValueError(f"{argument}={value!r}: this machine has no {device.type} device; pass {argument}='cpu'.")


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (empty, truncated, not a checkpoint, a record that fails its CRC), or
    ``None`` when it reads.

    Tensors are memory-mapped, not loaded; the CRC pass reads the file once. A file that only needs trust is
    readable.
    """
    path = Path(path)
    _, reason = _load_lazily(path)
    return reason or archive_damage(path)


def _load_lazily(path: Path) -> tuple[dict | None, str | None]:
    """``path`` loaded with its tensors memory-mapped (CRCs unchecked) and ``None``, or ``None`` and why it does
    not load; ``(None, None)`` for a file that needs unpickling."""
    try:
        if path.stat().st_size == 0:
            return None, "the file is empty"
        with path.open("rb") as file:
            zipped = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        # torch memory-maps only its zip format; a legacy pickle file is small enough to read
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as error:
        return None, None if _unsafe_globals(path) else _first_line(error)
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        return None, "it holds no `state_dict` (not a Lightning checkpoint)"
    return loaded, None


def find_resume_checkpoint(log_root: str | Path) -> Path | None:
    """The ``last*.ckpt`` or ``interrupted.ckpt`` to resume under ``log_root``, or ``None`` when none is readable.

    The latest run counts (the highest ``version_N``; in other layouts, the folder of the newest file), and in it the
    most training progress recorded in the files: ``global_step``, then ``epoch``, with the modification time only
    breaking ties, since copying (``cp -r``, rsync without ``-t``) or ``touch`` changes it. When the choice is not
    the newest file, an info line says why. Unreadable candidates (e.g. written while the disk was full, or with a
    record that fails its CRC) are skipped with a warning naming them.
    """
    found: list[tuple[Path, int, int, float]] = []
    for path in Path(log_root).glob("**/*.ckpt"):
        if not (path.stem == INTERRUPT_CHECKPOINT_NAME or path.stem == "last" or path.stem.startswith("last-v")):
            continue
        checkpoint, reason = _load_lazily(path)
        if reason is None:
            try:
                found.append((path, *_progress(checkpoint), path.stat().st_mtime))
            except OSError as error:  # removed since the glob
                reason = _first_line(error)
        if reason is not None:
            rank_zero_warn(f"--ckpt_path last: skipped {str(path)!r}, it cannot be read ({reason}).")
    versions = {path: _version_number(path) for path, *_ in found}
    newest_in_folder: dict[Path, float] = {}
    for path, _, _, mtime in found:
        newest_in_folder[path.parent] = max(mtime, newest_in_folder.get(path.parent, mtime))

    by_version = None not in versions.values()

    def run_order(path: Path) -> float:
        number = versions[path]
        return number if by_version and number is not None else newest_in_folder[path.parent]

    found.sort(key=lambda entry: (run_order(entry[0]), *entry[1:]), reverse=True)
    damaged: set[Path] = set()
    for path, step, epoch, _ in found:
        damage = archive_damage(path)  # only the candidates up to the chosen one pay for the CRC pass
        if damage is not None:
            damaged.add(path)
            rank_zero_warn(f"--ckpt_path last: skipped {str(path)!r}, it cannot be read ({damage}).")
            continue
        newest, newest_step, newest_epoch, _ = max((e for e in found if e[0] not in damaged), key=lambda e: e[3])
        if newest != path:
            rank_zero_info(
                f"--ckpt_path last: chose {str(path)!r} (global_step {step}, epoch {epoch}) over the newer file "
                f"{str(newest)!r} (global_step {newest_step}, epoch {newest_epoch}): `last` takes the latest run "
                f"(the highest version_N) and in it the most training progress, as copying (cp -r, rsync without -t) "
                f"or touch changes modification times. Pass --ckpt_path PATH to resume another file."
            )
        return path
    return None


def _version_number(path: Path) -> int | None:
    """N of the ``version_N`` folder holding ``path``'s folder (``version_N/checkpoints/last.ckpt``), else ``None``."""
    name = path.parent.parent.name
    number = name.removeprefix("version_")
    return int(number) if name.startswith("version_") and number.isdigit() else None


def _progress(checkpoint: dict | None) -> tuple[int, int]:
    """``(global_step, epoch)`` recorded in ``checkpoint``; ``-1`` for what it does not record (or is unread)."""
    values = [checkpoint.get(key) if checkpoint is not None else None for key in ("global_step", "epoch")]
    return tuple(value if isinstance(value, int) else -1 for value in values)  # type: ignore[return-value]


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

    Raises:
        CheckpointWriteError: when writing fails (a full disk, a file size limit), naming the file and the reason.
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
    except (OSError, RuntimeError) as error:  # torch wraps a failed write of its zip writer in a RuntimeError
        Path(temporary).unlink(missing_ok=True)
        kept = "the previous file of that name is kept" if path.exists() else "no earlier file of that name existed"
        raise CheckpointWriteError(
            f"could not write checkpoint {str(path)!r}: {_write_failure_reason(error)}; {kept}, and no partial "
            f"file was left."
        ) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_failure_reason(error: BaseException) -> str:
    """The operating system's reason in ``error``'s chain (``[Errno 28] No space left on device``), else its first
    line."""
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.strerror:
            return f"[Errno {cause.errno}] {cause.strerror}"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return _first_line(error)


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
_ZIP_MAGIC = b"PK\x03\x04"
_CHECKPOINT_MAGIC = (_ZIP_MAGIC, b"\x80")

_TRUNCATED = "It was probably truncated by a crash or a full disk."
_CHANGED_BYTES = (
    "Bytes inside it changed after it was written (a disk, memory or copy error), so its weights cannot be trusted "
    "and nothing of it was loaded."
)


def _unreadable_message(path: Path, error: BaseException) -> str:
    """Why a file that torch cannot load is refused: not a checkpoint at all, or a damaged one."""
    with path.open("rb") as handle:
        start = handle.read(8)
    if not start:
        return _corrupt_message(path, "is corrupt: the file is empty", cause=_TRUNCATED)
    if not start.startswith(_CHECKPOINT_MAGIC):
        return _corrupt_message(
            path, f"is not a checkpoint: torch.save writes a zip archive, and this file begins with {start!r}"
        )
    return _corrupt_message(path, f"is corrupt: it cannot be read ({_first_line(error)})", cause=_TRUNCATED)


def _corrupt_message(path: Path, problem: str, cause: str = "") -> str:
    """``checkpoint PATH <problem>. <cause>``, the checkpoints beside it that load, and what to pass instead."""
    readable: list[str] = []
    skipped: list[str] = []
    siblings = (p for p in path.parent.glob("*.ckpt") if p != path and p.is_file())
    for other in sorted(siblings, key=lambda p: -p.stat().st_mtime):
        # a file that needs unpickling would be refused: it is no way out
        (skipped if unreadable_reason(other) or needs_unpickling(other) else readable).append(str(other))
    hint = f" Checkpoints in that folder that load, newest first: {readable[:5]}." if readable else ""
    if skipped:
        hint += f" Unreadable or refused, skipped: {skipped[:5]}."
    instead = "one of those" if readable else "another checkpoint"
    cause = f" {cause}" if cause else ""
    return (
        f"checkpoint {str(path)!r} {problem}.{cause}{hint} Pass {instead} with --ckpt_path PATH, "
        f"or (for fit) start afresh without --ckpt_path."
    )
