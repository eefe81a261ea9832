"""Finding and checking checkpoints before a run resumes from them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from lightning_pdenets.errors import CorruptCheckpointError

__all__ = ["INTERRUPT_CHECKPOINT_NAME", "check_checkpoint", "find_resume_checkpoint"]

INTERRUPT_CHECKPOINT_NAME = "interrupted"
"""File stem of the checkpoint :class:`~lightning_pdenets.callbacks.CheckpointOnInterrupt` writes."""


def find_resume_checkpoint(log_root: Union[str, Path]) -> Optional[Path]:
    """The newest ``last*.ckpt`` or ``interrupted.ckpt`` under ``log_root`` (all versions), or ``None``."""
    root = Path(log_root)
    candidates = [
        path
        for path in root.glob("**/*.ckpt")
        if path.stem == INTERRUPT_CHECKPOINT_NAME or path.stem == "last" or path.stem.startswith("last-v")
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def check_checkpoint(path: Union[str, Path]) -> dict:
    """Load ``path`` on the CPU, or raise :class:`CorruptCheckpointError` naming it and the alternatives."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass an existing .ckpt file or `last`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpointError(_corrupt_message(path, f"it cannot be read ({type(error).__name__}: {error})")) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CorruptCheckpointError(_corrupt_message(path, "it holds no `state_dict`, so it is not a Lightning checkpoint"))
    return checkpoint


def _corrupt_message(path: Path, reason: str) -> str:
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: -p.stat().st_mtime)
    hint = f" Other checkpoints in that folder, newest first: {[str(p) for p in others[:5]]}." if others else ""
    return (
        f"checkpoint {str(path)!r} is corrupt: {reason}. It was probably truncated by a crash or a full disk "
        f"while written outside Lightning (Lightning writes to a temporary file and renames it).{hint} "
        f"Resume from one of those with --ckpt_path PATH, or start afresh without --ckpt_path."
    )
