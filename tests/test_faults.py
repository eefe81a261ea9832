"""Faults through the real CLI: --ckpt_path last across versions, corrupt checkpoints, interrupted writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_pdenets.callbacks import CheckpointOnInterrupt
from lightning_pdenets.checkpoints import AtomicCheckpointIO, check_checkpoint, find_resume_checkpoint
from lightning_pdenets.cli import build_cli
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.errors import CheckpointWriteError, CorruptCheckpointError, SolverFailedError
from lightning_pdenets.models import ODENetModule, RKNetModule
from tests.conftest import REPO_ROOT
from tests.ddp_cases import RaiseAtStep, StiffInBackwardOnRank

pytestmark = pytest.mark.cli

QUICK = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--config",
    str(REPO_ROOT / "configs/trainer/cpu.yaml"),
    "--model.init_args.network.width=8",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--test_after_fit=false",
]


def test_ckpt_path_last_resumes_the_newest_run_in_its_own_version(tmp_path: Path) -> None:
    first = build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    assert first.trainer.current_epoch == 1
    last = find_resume_checkpoint(tmp_path / "logs")
    assert last is not None and last.name == "last.ckpt" and "version_0" in str(last)

    resumed = build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 6  # 3 steps restored + 3 new, not 3 from scratch
    assert resumed.trainer.logger.version == 0  # continued in version_0, not a fresh version_1
    assert not (tmp_path / "logs" / "quickstart" / "version_1").exists()


def test_a_run_that_fails_before_its_first_step_leaves_the_resume_point_alone(tmp_path: Path) -> None:
    """An error while setting up a resumed run (here: a callback preset that does not fit the model) must not
    write an interrupt checkpoint of the not yet restored model: it would be the newest file, and the next
    ``--ckpt_path last`` would restart from it instead of from the real resume point."""
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    with pytest.raises(ValueError, match="TimeTVRegularization found no module"):
        build_cli(
            [
                "fit",
                *QUICK,
                "--trainer.max_epochs=2",
                "--ckpt_path=last",
                "--config",
                str(REPO_ROOT / "callbacks/time_tv.yaml"),
            ]
        )
    assert not list(tmp_path.rglob("interrupted.ckpt"))
    resumed = build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 6  # 3 restored + 3 new


def test_ckpt_path_last_without_any_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no readable last\.ckpt or interrupted\.ckpt under"):
        build_cli(["fit", *QUICK, "--ckpt_path=last"])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_gives_a_clear_error_naming_alternatives(damage: str, tmp_path: Path) -> None:
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    checkpoints = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    broken = checkpoints / "last.ckpt"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError) as info:
        build_cli(["fit", *QUICK, "--trainer.max_epochs=2", f"--ckpt_path={broken}"])
    message = str(info.value)
    assert (
        str(broken) in message and "best-epoch=00.ckpt" in message and "Pass one of those with --ckpt_path" in message
    )
    if damage == "truncate":  # a zip archive cut short: damaged, probably by a crash or a full disk
        assert "is corrupt: it cannot be read" in message and "truncated by a crash" in message
    else:  # not a checkpoint at all: no guess about crashes
        assert "is not a checkpoint: torch.save writes a zip archive, and this file begins with b'not a ch" in message
        assert "truncated" not in message


def test_the_checkpoints_offered_instead_of_a_refused_one_are_themselves_accepted(tmp_path: Path) -> None:
    # a torch.save'd dict without a state_dict was listed among the "checkpoints that load", though refused itself
    torch.save({"epoch": 3}, tmp_path / "nostate.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "good.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError) as info:
        check_checkpoint(tmp_path / "broken.ckpt")
    message = str(info.value)
    assert f"Checkpoints in that folder that load, newest first: ['{tmp_path / 'good.ckpt'}']" in message
    assert f"Unreadable or refused, skipped: ['{tmp_path / 'nostate.ckpt'}']" in message


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    """pdenets writes checkpoints to a temporary file beside the target, then renames it: a disk that fills up
    mid-write keeps the old file and leaves no temporary file behind. (Lightning's own transaction writes the
    temporary file in the system's temporary folder; from another file system the final move is a copy.)"""
    cli = build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    target = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(target)
    before = target.read_bytes()

    def disk_full(checkpoint, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"\[Errno 28\] No space left on device; the previous file"):
        cli.trainer.save_checkpoint(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.ckpt")] == []
    assert torch.load(target, weights_only=True)["global_step"] == 3


class FailingSolverModule(RKNetModule):
    """An RK-Net whose ODE block is switched, in epoch 1, to a dopri5 setting that cannot succeed."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.network.feature.configure_solver(method="dopri5", rtol=1e-12, atol=1e-12, max_num_steps=2)


def test_solver_failure_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = FailingSolverModule(network=dict(width=8, num_downsamples=1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), CheckpointOnInterrupt()],
    )
    with pytest.raises(SolverFailedError, match="max_num_steps"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "ckpt" / "interrupted.ckpt").exists()  # the failing state is not the newest checkpoint
    assert find_resume_checkpoint(tmp_path) == tmp_path / "ckpt" / "last.ckpt"


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1


def _trainer(tmp_path: Path, *callbacks: pl.Callback, max_epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks],
    )


def test_interrupt_checkpoint_is_written_beside_the_model_checkpoints_and_removed_after_completion(
    tmp_path: Path,
) -> None:
    interrupt = CheckpointOnInterrupt()
    with pytest.raises(RuntimeError, match="simulated failure"):
        _trainer(tmp_path, interrupt, RaiseAtStep(2)).fit(
            RKNetModule(network=dict(width=8, num_downsamples=1)), datamodule=DigitsDataModule(batch_size=16)
        )
    written = tmp_path / "ckpt" / "interrupted.ckpt"
    assert Path(interrupt.ckpt_path) == written
    assert torch.load(written, weights_only=True)["global_step"] == 2
    resumed = _trainer(tmp_path, CheckpointOnInterrupt())
    resumed.fit(
        RKNetModule(network=dict(width=8, num_downsamples=1)),
        datamodule=DigitsDataModule(batch_size=16),
        ckpt_path=written,
    )
    assert resumed.global_step == 4  # continued from step 2, not restarted
    assert not written.exists()  # stale after the run completed


class DiskFullFromStep(pl.Callback):
    """From optimizer step ``step`` on, every checkpoint write fails as on a full disk, after half the bytes."""

    def __init__(self, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step, self.monkeypatch = step, monkeypatch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.monkeypatch.setattr(torch, "save", disk_full)


def disk_full(checkpoint, file) -> None:
    file.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_interrupt_checkpoint_keeps_the_original_error_and_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(
        tmp_path, CheckpointOnInterrupt(), DiskFullFromStep(6, monkeypatch), RaiseAtStep(6), max_epochs=2
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    with (
        pytest.warns(
            UserWarning,
            match=r"stopped with RuntimeError: simulated failure after 6 steps; writing "
            r".*interrupted\.ckpt failed too \(CheckpointWriteError: .*No space left on device",
        ),
        pytest.raises(RuntimeError, match="simulated failure after 6 steps"),
    ):  # not the OSError
        trainer.fit(RKNetModule(network=dict(width=8, num_downsamples=1)), datamodule=DigitsDataModule(batch_size=16))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # no half file
    assert find_resume_checkpoint(tmp_path) == tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4


class RaiseBeforeFirstStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the first batch is on its way


def test_an_interrupt_before_the_first_step_writes_no_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, CheckpointOnInterrupt(), RaiseBeforeFirstStep())
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
        trainer.fit(RKNetModule(network=dict(width=8, num_downsamples=1)), datamodule=DigitsDataModule(batch_size=16))
    assert trainer.interrupted and trainer.global_step == 0
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_fresh_fit_never_resumes_implicitly(tmp_path: Path, recwarn) -> None:
    """Lightning turns fit(ckpt_path=None) into "last" when an OnExceptionCheckpoint is present; ours must not,
    or a new run with a fixed checkpoint folder silently continues an old one."""
    first = _trainer(tmp_path, CheckpointOnInterrupt())
    first.fit(RKNetModule(network=dict(width=8, num_downsamples=1)), datamodule=DigitsDataModule(batch_size=16))
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and first.global_step == 4
    batches = CountBatches()
    fresh = _trainer(tmp_path, CheckpointOnInterrupt(), batches, max_epochs=1)
    fresh.fit(RKNetModule(network=dict(width=8, num_downsamples=1)), datamodule=DigitsDataModule(batch_size=16))
    assert batches.count == 4  # trained its own epoch; a resumed run would stop at once (epoch 1 of 1 done)
    assert not [w for w in recwarn if "ckpt_path" in str(w.message)]


def test_adjoint_failure_in_backward_stops_cleanly_with_remedies(tmp_path: Path) -> None:
    """dopri5 failing inside loss.backward() (the adjoint solve) is a SolverFailedError with remedies, not a bare
    torchdiffeq AssertionError, and like a forward failure it leaves the last good checkpoint the newest one."""
    model = ODENetModule(solver=dict(adjoint=True, max_num_steps=50), network=dict(width=8, num_downsamples=1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            CheckpointOnInterrupt(),
            StiffInBackwardOnRank(rank=0, step=2),
        ],
    )
    with pytest.raises(SolverFailedError, match=r"in the backward \(adjoint\) pass: ") as failure:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert "method='dopri5'" in str(failure.value) and "adjoint_options" in str(failure.value)
    assert trainer.global_step == 2
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "ckpt" / "interrupted.ckpt").exists()


def test_checkpoint_on_interrupt_rejects_an_empty_filename() -> None:
    with pytest.raises(
        ValueError,
        match=r"`filename` must be a plain file stem such as 'interrupted' \(no folder, no \.ckpt: it is added\), got ''",
    ):
        CheckpointOnInterrupt(filename="")
    assert CheckpointOnInterrupt(dirpath="ckpt", filename="stop").ckpt_path == os.path.join("ckpt", "stop.ckpt")


def test_a_file_size_limit_during_a_checkpoint_save_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Before: two chained tracebacks (the OSError, then torch's inline_container RuntimeError), some 29 frames."""
    import resource
    import subprocess
    import sys

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # bytes: event files fit, a checkpoint does not

    result = subprocess.run(
        [sys.executable, "-m", "lightning_pdenets", "fit", *QUICK, "--trainer.max_epochs=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "File too large" in errors[0], errors
    assert not list(tmp_path.rglob(".*.tmp"))  # no partial file left
