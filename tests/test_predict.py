"""`pdenets predict` writes its predictions to files (through the real CLI)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.callbacks import PredictionWriter
from lightning_pdenets.checkpoints import find_resume_checkpoint
from lightning_pdenets.cli import build_cli
from lightning_pdenets.errors import ConfigurationError
from tests.test_faults import QUICK
from tests.trainers import quiet_trainer


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


class _LogitsModel(pl.LightningModule):
    """A ``predict_step`` returning logits, as Lightning's default does (the model's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.layer(x)

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])


def test_prediction_writer_turns_logits_into_probabilities_and_names_each_rows_dataloader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaders = [
        DataLoader(TensorDataset(torch.randn(n, 3), torch.zeros(n, dtype=torch.long)), batch_size=4) for n in (6, 5)
    ]
    model = _LogitsModel()
    writer = PredictionWriter(output_dir=tmp_path / "out")
    quiet_trainer(callbacks=[writer]).predict(model, loaders)
    saved = torch.load(writer.written[0])
    with torch.no_grad():
        expected = torch.cat([model(loader.dataset.tensors[0]).softmax(1) for loader in loaders])
    assert torch.allclose(saved["probabilities"], expected, atol=1e-6)
    assert saved["confidence"].max() <= 1.0
    assert saved["dataloader_idx"].tolist() == [0] * 6 + [1] * 5
    assert saved["sample_index"].tolist() == list(range(6)) + list(range(5))
    with open(writer.written[1], newline="") as handle:
        assert next(csv.reader(handle))[:2] == ["dataloader_idx", "sample_index"]


def test_prediction_writer_refuses_a_bad_output_dir_before_predicting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`output_dir` must be a folder path or None"):
        PredictionWriter(output_dir=123)
    taken = tmp_path / "a_file"
    taken.write_text("")
    writer = PredictionWriter(output_dir=taken)
    model = _LogitsModel()
    model.predict_step = lambda *args: pytest.fail("predicted before refusing the output folder")
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        quiet_trainer(callbacks=[writer]).predict(model, DataLoader(TensorDataset(torch.randn(2, 3)), batch_size=2))


def test_prediction_writer_removes_shards_of_an_earlier_ddp_run_and_reports_the_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_pdenets.callbacks import prediction_writer

    folder = tmp_path / "out"
    folder.mkdir()
    stale = [f"predictions_rank{rank}.{suffix}" for rank in (0, 1) for suffix in ("csv", "pt")]
    kept = ["predictions_old.csv", "other.csv", "predictions_rank1.txt"]  # not files this writer writes
    for name in stale + kept:
        (folder / name).write_text("an earlier run")
    messages: list[str] = []
    monkeypatch.setattr(prediction_writer, "rank_zero_info", messages.append)
    writer = PredictionWriter(output_dir=folder)
    loader = DataLoader(TensorDataset(torch.randn(11, 3)), batch_size=4)
    quiet_trainer(callbacks=[writer]).predict(_LogitsModel(), loader)
    assert sorted(path.name for path in folder.iterdir()) == sorted(["predictions.csv", "predictions.pt", *kept])
    assert messages[-1].startswith(f"Wrote 11 predictions to {folder}: predictions.csv (and .pt); removed 4 stale")
    assert all(name in messages[-1] for name in stale)


def test_a_ddp_run_counts_as_stale_the_unsharded_files_and_shards_it_did_not_write(tmp_path: Path) -> None:
    from lightning_pdenets.callbacks.prediction_writer import _remove_stale_files

    names = [
        f"{stem}.{suffix}" for stem in ("p", "p_rank0", "p_rank1", "p_rank2", "p_rank10") for suffix in ("pt", "csv")
    ]
    for name in [*names, "p_rankX.csv", "q_rank2.pt"]:
        (tmp_path / name).write_text("")
    removed = _remove_stale_files(tmp_path, "p", {"p_rank0", "p_rank1"})  # what 2 processes wrote now
    assert removed == ["p.csv", "p.pt", "p_rank10.csv", "p_rank10.pt", "p_rank2.csv", "p_rank2.pt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["p_rank0.pt", "p_rank0.csv", "p_rank1.pt", "p_rank1.csv", "p_rankX.csv", "q_rank2.pt"]
    )
