"""The README's main job: `pdenets fit --config configs/quickstart.yaml` trains to >= 0.95 test accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_pdenets.cli import build_cli
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli


def test_quickstart_reaches_the_documented_accuracy_and_writes_logs(tmp_path: Path) -> None:
    cli = build_cli(
        ["fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--trainer.enable_progress_bar=false"]
    )
    test_accuracy = float(cli.trainer.callback_metrics["test/acc_top1"])
    assert test_accuracy >= 0.95, f"quickstart test accuracy {test_accuracy:.3f} < 0.95"
    version = tmp_path / "logs" / "quickstart" / "version_0"
    assert list(version.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert list((version / "checkpoints").glob("best-*.ckpt"))
