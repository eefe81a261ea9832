"""Write what ``predict`` computes to files: ``pdenets predict`` otherwise discards it."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_pdenets.evaluation import split_batch

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Save the class probabilities returned by ``predict_step`` as ``predictions.pt`` and ``predictions.csv``.

    Works with any LightningModule whose ``predict_step`` returns a ``(batch, classes)`` tensor of
    scores. ``predictions.pt`` holds ``probabilities``, ``predicted`` (the arg-max class),
    ``sample_index`` (position in the prediction dataset) and, when the batches carry targets
    (``(inputs, labels, ...)`` or ``{"inputs": ..., "targets": ...}``), ``labels``; the CSV has one row per
    sample with the same columns
    (``confidence`` is the top score). Under DDP every process writes its own share, suffixed
    ``_rank{N}``; ``sample_index`` tells where each row belongs.

    Args:
        output_dir: Folder of the files; default: the logger's version folder of the run (the
            trainer's ``default_root_dir`` without a logger).
        filename: File stem.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        if not isinstance(filename, str) or not filename or os.sep in filename:
            raise ValueError(f"`filename` must be a plain file stem such as 'predictions', got {filename!r}.")
        self.output_dir = output_dir
        self.filename = filename
        self._parts: dict[str, list[torch.Tensor]] = {}
        self.written: list[Path] = []

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = {"probabilities": [], "sample_index": [], "labels": []}

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
        self._parts["probabilities"].append(prediction.detach().float().cpu())
        if batch_indices is not None:
            self._parts["sample_index"].append(torch.as_tensor(list(batch_indices)))
        _, labels = split_batch(batch, need_targets=False)
        if labels is not None:
            self._parts["labels"].append(labels.detach().cpu())

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank takes rank 0's folder: each rank's logger works out its own next version number
        folder = Path(trainer.strategy.broadcast(str(self._folder(trainer))))
        if not self._parts.get("probabilities"):
            return
        probabilities = torch.cat(self._parts["probabilities"])
        columns: dict[str, torch.Tensor] = {}
        if len(self._parts["sample_index"]) == len(self._parts["probabilities"]):
            columns["sample_index"] = torch.cat(self._parts["sample_index"])
        confidence, predicted = probabilities.max(dim=1)
        columns["predicted"] = predicted
        columns["confidence"] = confidence
        if len(self._parts["labels"]) == len(self._parts["probabilities"]):
            columns["labels"] = torch.cat(self._parts["labels"])
        folder.mkdir(parents=True, exist_ok=True)
        stem = self.filename if trainer.world_size == 1 else f"{self.filename}_rank{trainer.global_rank}"
        tensors_path, table_path = folder / f"{stem}.pt", folder / f"{stem}.csv"
        torch.save({"probabilities": probabilities, **columns}, tensors_path)
        with open(table_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(columns))
            for row in zip(*(values.tolist() for values in columns.values())):
                writer.writerow([f"{value:.6g}" if isinstance(value, float) else value for value in row])
        self.written = [tensors_path, table_path]
        rank_zero_info(f"Wrote {len(probabilities)} predictions to {table_path} and {tensors_path.name}.")

    def _folder(self, trainer: pl.Trainer) -> Path:
        log_dir = cast(str, trainer.log_dir)  # a trainer with loggers has a log folder
        return Path(self.output_dir or (log_dir if trainer.loggers else trainer.default_root_dir))
