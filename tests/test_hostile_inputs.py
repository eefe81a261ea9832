"""Issue 28, items 6 and 7: the traceback walls that remained, and the small things a careful user notices."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.fakedata.torchvision_sets import fake_mnist
from tests.test_hostile_resume import TINY, run, snapshot

pytestmark = pytest.mark.cli

QUICK = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width=8", *TINY]


class CreateMarker:
    """A pickled payload: unpickling it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.fixture
def last_checkpoint(tmp_path: Path, capsys) -> Path:
    assert run(["fit", *QUICK], capsys)[0] == 0
    return tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


# -- item 6 ------------------------------------------------------------------------------------------------
def test_a_binary_file_as_config_is_a_short_error(tmp_path: Path, capsys) -> None:
    picture = tmp_path / "run.yaml"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
    code, err = run(["fit", "--config", str(picture)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) <= 2
    assert f"--config: {str(picture)!r} is not a text file" in err and "pass a .yaml config file" in err
    assert not (tmp_path / "logs").exists()


def migrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_pdenets.migration", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )


def test_the_migration_refuses_crafted_and_truncated_files_in_two_lines(last_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({**torch.load(last_checkpoint, weights_only=True), "payload": CreateMarker(marker)}, crafted)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last_checkpoint.read_bytes()[:3000])
    for source, cause in ((crafted, "holds pickled Python objects"), (truncated, "cannot be read as a checkpoint")):
        result = migrate(str(source), str(tmp_path / "new.ckpt"))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr
        assert cause in result.stderr
    assert not marker.exists() and not (tmp_path / "new.ckpt").exists()


# -- item 7 ------------------------------------------------------------------------------------------------
def test_a_corrupt_checkpoint_message_offers_only_files_that_load(
    last_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    folder = last_checkpoint.parent
    torch.save(
        {**torch.load(last_checkpoint, weights_only=True), "payload": CreateMarker(tmp_path / "M")},
        folder / "crafted.ckpt",
    )
    broken = folder / "broken.ckpt"
    broken.write_bytes(last_checkpoint.read_bytes()[:3000])
    code, err = run(["test", *QUICK, f"--ckpt_path={broken}"], capsys)
    assert code == 2
    offered = err.split("that load, newest first:")[1].split("]")[0]
    assert "last.ckpt" in offered and "crafted.ckpt" not in offered


def test_an_image_size_from_the_checkpoint_is_not_blamed_on_the_config(
    last_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    fake_mnist(tmp_path / "data")
    code, err = run(
        [
            "test",
            *QUICK,
            "--data=lightning_pdenets.data.MNISTDataModule",
            f"--data.init_args.data_dir={tmp_path / 'data'}",
            f"--ckpt_path={last_checkpoint}",
        ],
        capsys,
    )
    assert code == 2
    assert "trained with `image_size` (8, 8), but MNISTDataModule gives (28, 28)" in err
    assert "remove it from the model's config" not in err


def test_max_epochs_0_is_not_called_no_limit(capsys) -> None:
    code, err = run(["fit", *QUICK, "--trainer.max_epochs=0"], capsys)
    assert code == 2
    assert "it is 0 (no epoch to train)" in err and "no limit" not in err


def test_checkpoints_are_written_like_every_other_output(tmp_path: Path, capsys) -> None:
    old = os.umask(0o022)
    try:
        assert run(["fit", *QUICK], capsys)[0] == 0
    finally:
        os.umask(old)
    version = tmp_path / "logs" / "quickstart" / "version_0"
    modes = {path.name: path.stat().st_mode & 0o777 for path in version.rglob("*") if path.is_file()}
    assert set(modes.values()) == {0o644}, modes


class CtrlCAtStep(pl.Callback):
    """Send SIGINT to this process after ``step`` optimizer steps, as Ctrl-C in the terminal does."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_exits_130_in_one_line_and_says_nothing_of_weights_only(tmp_path: Path, capsys, caplog) -> None:
    config = tmp_path / "ctrl_c.yaml"
    config.write_text(f"trainer:\n  callbacks+:\n    - class_path: {__name__}.CtrlCAtStep\n")
    handler = signal.getsignal(signal.SIGINT)
    caplog.set_level("INFO")
    # Ctrl-C in a terminal: Python's own handler. A suite started in the background (`.ci/run &`) inherits SIGINT
    # ignored from the shell, and the SIGINT below would then be lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, err = run(["fit", *QUICK, "--config", str(config)], capsys)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first one
    assert code == 130
    assert (
        "pdenets: fit interrupted by Ctrl-C (exit code 130). The fit resumes with the same command and "
        "--ckpt_path last." in err
    )
    assert "weights_only" not in caplog.text + err
    interrupted = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 1
    before = snapshot(tmp_path / "logs")
    assert run(["fit", *QUICK, "--ckpt_path", "last"], capsys)[0] == 0  # nothing lost: it resumes
    assert before.keys() <= snapshot(tmp_path / "logs").keys() | {"quickstart/version_0/checkpoints/interrupted.ckpt"}


def test_an_argument_that_contradicts_the_checkpoints_network_is_refused(last_checkpoint: Path, capsys) -> None:
    code, err = run(["test", *QUICK, f"--ckpt_path={last_checkpoint}", "--model.init_args.network.width=32"], capsys)
    assert code == 2
    assert "network.width (checkpoint 8, config 32)" in err
