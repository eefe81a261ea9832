"""`pdenets predict` writes its predictions to files (through the real CLI)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_pdenets.callbacks import PredictionWriter
from lightning_pdenets.checkpoints import find_resume_checkpoint
from lightning_pdenets.cli import build_cli
from tests.test_faults import QUICK


def test_predict_writes_one_row_per_test_sample_agreeing_with_test_accuracy(tmp_path: Path) -> None:
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    checkpoint = str(find_resume_checkpoint(tmp_path / "logs"))
    tested = build_cli(["test", *QUICK, f"--ckpt_path={checkpoint}"])
    test_accuracy = float(tested.trainer.callback_metrics["test/acc_top1"])

    predicted = build_cli(["predict", *QUICK, f"--ckpt_path={checkpoint}"])
    writer = next(c for c in predicted.trainer.callbacks if isinstance(c, PredictionWriter))
    tensors_path, table_path = writer.written
    assert tensors_path.parent == Path(predicted.trainer.log_dir)
    saved = torch.load(tensors_path)
    with open(table_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_size = len(predicted.datamodule.test_set)
    assert len(rows) == len(saved["probabilities"]) == test_size
    assert [int(row["sample_index"]) for row in rows] == list(range(test_size))
    assert torch.equal(saved["predicted"], saved["probabilities"].argmax(1))
    assert torch.allclose(saved["probabilities"].sum(1), torch.ones(test_size), atol=1e-5)
    assert [int(row["predicted"]) for row in rows] == saved["predicted"].tolist()
    accuracy_from_file = sum(row["predicted"] == row["labels"] for row in rows) / test_size
    assert accuracy_from_file == pytest.approx(test_accuracy, abs=1e-6)


def test_prediction_writer_rejects_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="`filename` must be a plain file stem"):
        PredictionWriter(filename="out/predictions")
    writer = PredictionWriter()
    writer.on_predict_epoch_start(None, None)
    with pytest.raises(TypeError, match=r"needs `predict_step` to return a \(batch, classes\) tensor"):
        writer.write_on_batch_end(None, None, torch.zeros(4), [0, 1, 2, 3], None, 0, 0)
