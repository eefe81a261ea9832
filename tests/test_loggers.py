"""`--trainer.logger` with Lightning's CSVLogger and MLFlowLogger (MLflow's local file store) from the `pdenets` CLI:
hyperparameters, metrics, the checkpoint artifact, and `--ckpt_path last` finding the run's checkpoint."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch.core.saving import load_hparams_from_yaml

from lightning_pdenets.cli import build_cli
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

TINY = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--trainer.enable_progress_bar=false",
    "--model.init_args.network.width=8",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
]


def test_csv_logger_records_hyperparameters_and_metrics_in_the_config_named_folder(tmp_path: Path) -> None:
    cli = build_cli(["fit", *TINY, "--trainer.max_epochs=2", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger"])
    run = tmp_path / "logs" / "quickstart" / "version_0"  # named after the config, as TensorBoard's folder
    hparams = load_hparams_from_yaml(str(run / "hparams.yaml"))
    assert hparams["lr"] == 0.003 and hparams["network"] == {"width": 8, "num_downsamples": 1}
    assert hparams["solver"]["method"] == "rk4" and hparams["batch_size"] == 64  # the datamodule's too
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    validation = [row for row in rows if row.get("val/acc_top1")]
    assert [int(row["epoch"]) for row in validation] == [0, 1]
    assert all(float(row["val/nfe_forward"]) == 16.0 for row in validation)  # rk4, step 0.25: 4 steps x 4 stages
    tested = [float(row["test/acc_top1"]) for row in rows if row.get("test/acc_top1")]
    assert tested == [pytest.approx(float(cli.trainer.callback_metrics["test/acc_top1"]))]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()

    resumed = build_cli(
        [
            "fit",
            *TINY,
            "--trainer.max_epochs=3",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--ckpt_path",
            "last",
            "--test_after_fit=false",
        ]
    )
    assert Path(resumed.config.fit.ckpt_path) == Path("logs/quickstart/version_0/checkpoints/last.ckpt")
    assert resumed.trainer.current_epoch == 3
    # Lightning's CSV writer deletes metrics.csv in an existing folder: the first run's rows must survive the resume
    kept = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in kept if row.get("val/acc_top1")] == [0, 1]
    continued = list(csv.DictReader((run.parent / "version_1" / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in continued if row.get("val/acc_top1")] == [2]


@pytest.fixture
def mlflow_file_store(monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 keeps the file store in maintenance mode and refuses it unless this is set (a database backend such
    # as sqlite:///mlflow.db needs no variable, but Lightning's SaveConfigCallback then finds no log_dir).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow


def test_mlflow_logger_records_hyperparameters_metrics_and_the_checkpoint(tmp_path: Path, mlflow_file_store) -> None:
    from mlflow.tracking import MlflowClient

    logger = [
        "--trainer.logger",
        "lightning.pytorch.loggers.MLFlowLogger",
        "--trainer.logger.save_dir",
        "mlruns",
        "--trainer.logger.experiment_name",
        "quickstart",
        "--trainer.logger.log_model",
        "true",
    ]
    cli = build_cli(["fit", *TINY, "--trainer.max_epochs=2", *logger])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["lr"] == "0.003" and params["network/width"] == "8" and params["solver/method"] == "rk4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc_top1")] == [2, 5]  # epoch ends
    assert run.data.metrics["test/acc_top1"] == pytest.approx(float(cli.trainer.callback_metrics["test/acc_top1"]))

    local = tmp_path / "mlruns" / experiment.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "last")]
    assert "last/last.ckpt" in artifacts
    artifact = Path(client.download_artifacts(run.info.run_id, "last/last.ckpt", str(tmp_path / "download")))
    assert hashlib.sha256(artifact.read_bytes()).digest() == hashlib.sha256(local.read_bytes()).digest()
    assert torch.load(artifact, weights_only=True)["epoch"] == 1

    resumed = build_cli(
        ["fit", *TINY, "--trainer.max_epochs=3", *logger, "--ckpt_path", "last", "--test_after_fit=false"]
    )
    assert Path(resumed.config.fit.ckpt_path).resolve() == local.resolve()
    assert resumed.trainer.current_epoch == 3


def test_mlflow_with_a_database_store_is_refused_in_one_line_before_anything_is_created(tmp_path: Path, capsys) -> None:
    # Lightning's config saving found no log folder: an AssertionError traceback after a FAILED MLflow run was created
    pytest.importorskip("mlflow")
    from lightning_pdenets.cli import main

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    logger = ["--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger", "--trainer.logger.tracking_uri", uri]
    with pytest.raises(SystemExit) as stop:
        main(["fit", *TINY, *logger])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: MLFlowLogger with tracking_uri {uri!r} (--trainer.logger.tracking_uri or $MLFLOW_TRACKING_URI): only "
        f"MLflow's file store (a file: URI) gives the run a local folder for its config.yaml and checkpoints. Use it: "
        f"MLFLOW_ALLOW_FILE_STORE=true pdenets ... --trainer.logger.save_dir mlruns (without tracking_uri)."
    )
    assert list(tmp_path.iterdir()) == []  # no database, no logs/, no checkpoints
