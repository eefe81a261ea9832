"""One process and two DDP processes (gloo) evaluate the same images with the same random draws.

``OODEvaluation`` and ``AdversarialEvaluation`` select their ``num_batches`` by the images' index in the test set
and draw perturbations and PGD starts per image from that index, and ``PredictionWriter`` writes one file per
rank, removes the files of earlier runs and announces the total. As with ``pdenets ... --config
configs/trainer/ddp_cpu.yaml``, the per-process batch size is the same on 1 and on 2 processes (tests/test_ddp.py
keeps the global batch instead). This file is also the script the test launches (Lightning relaunches it for
rank 1):

    python tests/test_evaluation_ddp_invariance.py OUT_DIR DEVICES
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_pdenets.callbacks import AdversarialEvaluation, OODEvaluation, PredictionWriter
from lightning_pdenets.data.loading import make_loader

pytestmark = pytest.mark.ddp
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NUM_TEST = 36  # 18 per rank: batches of 8, 8 and 2
STALE = {
    2: ["predictions.csv", "predictions.pt", "predictions_rank2.csv", "predictions_rank2.pt"],  # of 1 and 3 processes
    1: ["predictions_rank0.csv", "predictions_rank0.pt", "predictions_rank1.csv", "predictions_rank1.pt"],
}


class Classifier(pl.LightningModule):
    """A linear classifier on 3×8×8 images: every image's logits are independent of the rest of its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


class Data(pl.LightningDataModule):
    """Standardized random images labelled by ``model`` itself (clean accuracy 1), through the package's loaders."""

    mean, std = MEAN, STD

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        pixels = 0.25 + 0.5 * torch.rand(NUM_TEST, 3, 8, 8, generator=generator)
        self.x = (pixels - 0.5) / 0.25
        with torch.no_grad():
            self.y = model(self.x).argmax(1)

    def test_dataloader(self) -> Any:
        return make_loader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8, train=False, seed=0)

    predict_dataloader = test_dataloader


def main(out_dir: Path, devices: int) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = Classifier()
    callbacks = [
        OODEvaluation(perturbations=["gaussian_noise", "rotation"], noise_std=0.5, num_batches=3),
        AdversarialEvaluation(
            epsilons=["1/255"], attacks=["fgsm", "pgd"], pgd_steps=2, num_batches=2, log_figure=False
        ),
        PredictionWriter(output_dir=out_dir / "predictions"),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = Data(model)
    trainer.test(model, datamodule=data, verbose=False)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    trainer.predict(model, datamodule=data, return_predictions=False)
    if trainer.is_global_zero:
        torch.save(metrics, out_dir / "metrics.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The script on 1 and on 2 processes, launched concurrently, each over a folder with earlier runs' files."""
    from tests.test_ddp import _distinct_free_ports

    root = Path(__file__).resolve().parents[1]
    launches = {}
    for devices, port in zip((1, 2), _distinct_free_ports(2)):
        out_dir = tmp_path_factory.mktemp(f"devices{devices}")
        (out_dir / "predictions").mkdir()
        for name in STALE[devices]:
            (out_dir / "predictions" / name).write_text("an earlier run")
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
        command = [sys.executable, __file__, str(out_dir), str(devices)]
        launches[devices] = (
            out_dir,
            subprocess.Popen(command, env=env, cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
    results = {}
    for devices, (out_dir, launch) in launches.items():
        stdout, stderr = launch.communicate(timeout=600)
        assert launch.returncode == 0, stderr[-5000:]
        results[devices] = {
            "metrics": torch.load(out_dir / "metrics.pt"),
            "files": sorted(path.name for path in (out_dir / "predictions").iterdir()),
            "output": stdout + stderr,
            "folder": out_dir / "predictions",
        }
    return results


def test_robustness_metrics_are_the_same_on_one_process_and_on_two(runs: dict[int, dict[str, Any]]) -> None:
    one, two = runs[1]["metrics"], runs[2]["metrics"]
    keys = {key for key in one if key.startswith(("ood/", "adv/"))}
    assert keys and keys == {key for key in two if key.startswith(("ood/", "adv/"))}
    assert one["adv/clean/top1"] == 1.0  # the labels are the model's own predictions
    assert {key: two[key] for key in keys} == pytest.approx({key: one[key] for key in keys}, abs=1e-6)


def test_predictions_replace_earlier_runs_files_and_the_message_counts_every_rank(
    runs: dict[int, dict[str, Any]],
) -> None:
    assert runs[1]["files"] == ["predictions.csv", "predictions.pt"]
    assert runs[2]["files"] == [f"predictions_rank{rank}.{suffix}" for rank in (0, 1) for suffix in ("csv", "pt")]
    shards = [torch.load(runs[2]["folder"] / f"predictions_rank{rank}.pt") for rank in (0, 1)]
    assert sorted(torch.cat([shard["sample_index"] for shard in shards]).tolist()) == list(range(NUM_TEST))
    message = f"Wrote {NUM_TEST} predictions from 2 processes to {runs[2]['folder']}: "
    assert message + "predictions_rank0.csv, predictions_rank1.csv (and .pt); removed 4 stale" in runs[2]["output"]
    assert runs[2]["output"].count("Wrote ") == 1  # rank 0 only


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
