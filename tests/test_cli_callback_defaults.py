"""Issue 28 follow-ups through the CLI: a default callback given again by the user replaces the default, and a run
that a bad setting stops before its first step shows the error alone (no interrupt-checkpoint line)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from lightning_pdenets.callbacks import NFEMonitor, ResumeAwareProgressBar
from lightning_pdenets.cli.app import build_cli
from tests.conftest import REPO_ROOT
from tests.fakedata.tinyimagenet import fake_tinyimagenet
from tests.test_corrupt_datasets import TINY_IMAGENET, truncate
from tests.test_hostile_resume import TINY, run

pytestmark = pytest.mark.cli

QUICKSTART = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width=8"]


def test_a_second_nfe_monitor_given_by_the_user_replaces_the_default(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    user = [
        "--trainer.callbacks+=lightning_pdenets.callbacks.NFEMonitor",
        "--trainer.callbacks.histogram_every_n_steps=7",
    ]
    assert run(["fit", *QUICKSTART, *TINY, *user], capsys)[0] == 0  # was Lightning's RuntimeError, a traceback
    cli = build_cli([*QUICKSTART, *TINY, *user], run=False)
    [monitor] = [callback for callback in cli.trainer.callbacks if isinstance(callback, NFEMonitor)]
    assert monitor.histogram_every_n_steps == 7  # the user's settings win
    # the other defaults stay, once each
    names = [type(callback).__name__ for callback in cli.trainer.callbacks]
    for default in ("CheckpointOnInterrupt", "LearningRateMonitor", "SigtermFlagOnly", "PredictionWriter"):
        assert names.count(default) == 1, names
    assert names.count("ModelCheckpoint") == 2, names


def test_a_user_callback_of_another_class_keeps_every_default(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [*QUICKSTART, *TINY, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss"], run=False
    )
    names = [type(callback).__name__ for callback in cli.trainer.callbacks]
    assert names.count("NFEMonitor") == 1 and names.count("EarlyStopping") == 1, names


def progress_bars(cli) -> list[ProgressBar]:
    return [callback for callback in cli.trainer.callbacks if isinstance(callback, ProgressBar)]


def test_the_default_bar_survives_a_mid_epoch_resume(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*QUICKSTART, *TINY, "--trainer.enable_progress_bar=true"], run=False)
    assert [type(bar) for bar in progress_bars(cli)] == [ResumeAwareProgressBar]


def test_a_bar_given_by_the_user_is_the_only_bar(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            *QUICKSTART,
            *TINY,
            "--trainer.enable_progress_bar=true",
            "--trainer.callbacks+=TQDMProgressBar",
            "--trainer.callbacks.refresh_rate=5",
        ],
        run=False,
    )
    [bar] = progress_bars(cli)
    assert type(bar) is TQDMProgressBar and bar.refresh_rate == 5


def test_no_bar_when_it_is_switched_off(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*QUICKSTART, *TINY, "--trainer.enable_progress_bar=false"], run=False)
    assert progress_bars(cli) == [] and cli.trainer.progress_bar_callback is None


SECOND_BAR = ["--trainer.enable_progress_bar=true", "--trainer.callbacks+=TQDMProgressBar"]


@pytest.mark.parametrize("switched_off", [["--trainer.enable_progress_bar=false"], SECOND_BAR])
def test_a_bar_with_the_bar_switched_off_or_a_second_bar_is_a_short_error(
    switched_off, tmp_path, capsys, monkeypatch
) -> None:
    """Lightning's MisconfigurationException was a traceback wall."""
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", *QUICKSTART, *TINY, "--trainer.callbacks+=ResumeAwareProgressBar", *switched_off], capsys)
    assert code == 2
    assert "progress bar" in err and ("enable_progress_bar=false" in err or "Keep one of them" in err), err
    assert len(err.splitlines()) <= 3, err


def test_a_corrupt_file_found_before_the_first_step_is_the_only_news(tmp_path) -> None:
    """The interrupt-checkpoint callback said "no interrupted.ckpt written ..." ahead of the error."""
    settings = fake_tinyimagenet(tmp_path / "data")
    for path in (tmp_path / "data" / "tiny-imagenet-200" / "train").rglob("*.JPEG"):  # the sanity check reads one
        truncate(path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_pdenets",
            "fit",
            *TINY_IMAGENET,
            "--data.init_args.data_dir",
            settings["data_dir"],
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "is present but unreadable" in result.stderr
    assert "interrupted.ckpt" not in output and "CheckpointOnInterrupt" not in output, output[-3000:]


@pytest.mark.parametrize(("stop", "said"), [(KeyboardInterrupt(), True), (ValueError("bad setting"), False)])
def test_the_no_checkpoint_note_is_kept_for_a_stop_by_the_user(stop, said, monkeypatch) -> None:
    from types import SimpleNamespace

    from lightning_pdenets.callbacks import fault_tolerance

    notes: list[str] = []
    monkeypatch.setattr(fault_tolerance, "rank_zero_info", notes.append)
    callback = fault_tolerance.CheckpointOnInterrupt()
    trainer = SimpleNamespace(global_step=0, state=SimpleNamespace(fn="fit", stage="train"), checkpoint_callbacks=[])
    callback.on_train_start(trainer, None)
    callback.on_exception(trainer, None, stop)
    assert bool(notes) == said and all("no interrupted.ckpt written" in note for note in notes)
