"""Write what ``predict`` computes to files: ``pdenets predict`` otherwise discards it."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.evaluation import split_batch

__all__ = ["PredictionWriter"]


def _remove_stale_files(folder: Path, filename: str, current: set[str]) -> list[str]:
    """Remove ``filename.{pt,csv}`` and ``filename_rank<N>.{pt,csv}`` in ``folder`` whose stem is not in ``current``.

    Returns:
        The names of the removed files, sorted.
    """
    pattern = re.compile(rf"{re.escape(filename)}(_rank\d+)?\.(pt|csv)")
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if pattern.fullmatch(path.name) and path.stem not in current and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class PredictionWriter(BasePredictionWriter):
    """Save the class probabilities returned by ``predict_step`` as ``predictions.pt`` and ``predictions.csv``.

    Works with any LightningModule whose ``predict_step`` returns a ``(batch, classes)`` tensor of
    class probabilities (this library's models) or of logits (Lightning's default ``predict_step``, the
    model's output), which are turned into probabilities with a softmax, once announced. ``predictions.pt``
    holds ``probabilities``, ``predicted`` (the arg-max class), ``sample_index`` (position in the prediction
    dataset), with several predict dataloaders ``dataloader_idx``, and, when the batches carry targets
    (``(inputs, labels, ...)`` or ``{"inputs": ..., "targets": ...}``), ``labels``; the CSV has one row per
    sample with the same columns
    (``confidence`` is the top probability). Under DDP every process writes its own share, suffixed
    ``_rank{N}``; ``sample_index`` tells where each row belongs. Files of the same ``filename`` in the folder that
    this run did not write (the unsharded files of a one-process run, shards of an earlier run with more
    processes, or of a process that predicted nothing this time) are removed, so that merging every
    ``filename*.csv`` there never mixes runs; the message that announces the files names them.

    Args:
        output_dir: Folder of the files; default: the logger's version folder of the run (the
            trainer's ``default_root_dir`` without a logger).
        filename: File stem.
    """

    def __init__(self, output_dir: str | os.PathLike[str] | None = None, filename: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        if not isinstance(filename, str) or not filename or os.sep in filename or filename.endswith((".pt", ".csv")):
            raise ValueError(
                f"`filename` must be a plain file stem such as 'predictions' (the files get .pt and .csv), "
                f"got {filename!r}."
            )
        if output_dir is not None and (not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir)):
            raise ValueError(f"`output_dir` must be a folder path or None (the run's log folder), got {output_dir!r}.")
        self.output_dir = output_dir
        self.filename = filename
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._announced_softmax = False
        self.written: list[Path] = []

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.output_dir is not None and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            # found before predicting, not after every prediction has been computed
            raise ConfigurationError(
                f"PredictionWriter: `output_dir` {str(self.output_dir)!r} is a file, not a folder; name a folder."
            )
        self._parts = {"probabilities": [], "sample_index": [], "labels": [], "dataloader_idx": []}
        self.written = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, torch.Tensor) or prediction.dim() != 2:
            raise TypeError(
                f"PredictionWriter needs `predict_step` to return a (batch, classes) tensor of scores, got "
                f"{type(prediction).__name__}"
                f"{tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else ''}; "
                f"drop the callback or return class scores."
            )
        self._parts["probabilities"].append(self._probabilities(prediction.detach().float().cpu()))
        self._parts["dataloader_idx"].append(torch.full((prediction.shape[0],), dataloader_idx))
        if batch_indices is not None:
            self._parts["sample_index"].append(torch.as_tensor(list(batch_indices)))
        _, labels = split_batch(batch, need_targets=False)
        if labels is not None:
            self._parts["labels"].append(labels.detach().cpu())

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank takes rank 0's folder: each rank's logger works out its own next version number
        folder = Path(trainer.strategy.broadcast(str(self._folder(trainer))))
        sharded = trainer.world_size > 1
        stem = f"{self.filename}_rank{trainer.global_rank}" if sharded else self.filename
        count = sum(len(part) for part in self._parts.get("probabilities", []))
        failure: Exception | None = None
        if count:
            try:
                self.written = self._write(folder, stem)
            except Exception as error:  # raised after the count exchange, which every rank must join
                failure = error
        # one collective on every rank, whether it predicted anything or failed to write: (rows, failed) per rank
        local = torch.tensor([count, failure is not None], device=trainer.strategy.root_device)
        shares = trainer.strategy.all_gather(local)
        shares = shares.reshape(-1, 2).cpu()
        if failure is not None:
            raise failure
        if shares[:, 1].any():
            failed = shares[:, 1].nonzero().flatten().tolist()
            raise RuntimeError(
                f"PredictionWriter: process(es) {failed} could not write their predictions to {folder} (see their "
                f"error); the files there are incomplete."
            )
        if not trainer.is_global_zero:
            return
        ranks = shares[:, 0].nonzero().flatten().tolist()  # those that wrote files
        stems = [f"{self.filename}_rank{rank}" if sharded else self.filename for rank in ranks]
        removed = _remove_stale_files(folder, self.filename, set(stems))
        if not stems and not removed:
            return
        names = ", ".join(f"{name}.csv" for name in stems) or "no file"
        note = f"; removed {len(removed)} stale file(s) of an earlier run: {', '.join(removed)}" if removed else ""
        processes = f" from {trainer.world_size} processes" if sharded else ""
        rank_zero_info(f"Wrote {int(shares[:, 0].sum())} predictions{processes} to {folder}: {names} (and .pt){note}.")

    def _write(self, folder: Path, stem: str) -> list[Path]:
        """Write this process's predictions as ``stem.pt`` and ``stem.csv`` in ``folder``; the paths written."""
        probabilities = torch.cat(self._parts["probabilities"])
        columns: dict[str, torch.Tensor] = {}
        if len(self._parts["sample_index"]) == len(self._parts["probabilities"]):
            columns["sample_index"] = torch.cat(self._parts["sample_index"])
        confidence, predicted = probabilities.max(dim=1)
        columns["predicted"] = predicted
        columns["confidence"] = confidence
        if len(self._parts["labels"]) == len(self._parts["probabilities"]):
            columns["labels"] = torch.cat(self._parts["labels"])
        loader_index = torch.cat(self._parts["dataloader_idx"])
        if loader_index.any():  # several predict dataloaders: sample_index restarts in each
            columns = {"dataloader_idx": loader_index, **columns}
        folder.mkdir(parents=True, exist_ok=True)
        tensors_path, table_path = folder / f"{stem}.pt", folder / f"{stem}.csv"
        torch.save({"probabilities": probabilities, **columns}, tensors_path)
        with open(table_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(columns))
            for row in zip(*(values.tolist() for values in columns.values())):
                writer.writerow([f"{value:.6g}" if isinstance(value, float) else value for value in row])
        return [tensors_path, table_path]

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` if every row is a probability distribution, else their softmax (logits, log-probabilities)."""
        distributions = (
            (scores >= 0).all()
            and (scores <= 1).all()
            and torch.allclose(scores.sum(dim=1), torch.ones(scores.shape[0]), atol=1e-3)
        )
        if distributions:
            return scores
        if not self._announced_softmax:
            self._announced_softmax = True
            rank_zero_info(
                "PredictionWriter: predict_step returns scores that are not probabilities (rows outside [0, 1] or "
                "not summing to 1), e.g. logits; writing their softmax as `probabilities`."
            )
        return scores.softmax(dim=1)

    def _folder(self, trainer: pl.Trainer) -> Path:
        log_dir = cast(str, trainer.log_dir)  # a trainer with loggers has a log folder
        return Path(self.output_dir or (log_dir if trainer.loggers else trainer.default_root_dir))
