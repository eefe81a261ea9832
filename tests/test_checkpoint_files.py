"""Checkpoint files as found on disk: changed bytes inside a record are refused before anything loads, `last` follows
the training progress recorded in the files (not modification times), and bad paths and arguments get short errors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_pdenets import pretrained
from lightning_pdenets.checkpoints import find_resume_checkpoint, load_checkpoint, unreadable_reason
from lightning_pdenets.errors import CheckpointNotFoundError, CorruptCheckpointError
from lightning_pdenets.migration import LEGACY_SOLVER_KEYS, VERSION_KEY
from lightning_pdenets.migration import main as migrate
from lightning_pdenets.models import RKNetModule
from tests.conftest import REPO_ROOT

QUICKSTART = REPO_ROOT / "bench/checkpoints/digits/quickstart.ckpt"


def damage_record(path: Path) -> str:
    """Invert 64 bytes inside the largest tensor record of ``path`` (size and zip structure unchanged); its name."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("r+b") as file:
        file.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        start = record.header_offset + 30 + name_length + extra_length
        file.seek(start)
        data = file.read(64)
        file.seek(start)
        file.write(bytes(byte ^ 0xFF for byte in data))
    return record.filename


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, str]:
    """A folder with an intact ``last.ckpt`` and ``flipped.ckpt``, a copy with changed bytes in one record."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(QUICKSTART, folder / "last.ckpt")
    flipped = folder / "flipped.ckpt"
    shutil.copy(QUICKSTART, flipped)
    return flipped, damage_record(flipped)


def test_changed_bytes_inside_a_record_are_refused_naming_the_record_and_the_intact_checkpoint(
    damaged: tuple[Path, str],
) -> None:
    """torch.load does not check the zip CRCs: such a file loaded, one weight off by 3e38, and its NaN was blamed on
    the model."""
    flipped, record = damaged
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(flipped)
    message = str(info.value)
    assert f"its record {record!r} fails its CRC-32 check" in message and "nothing of it was loaded" in message
    assert f"that load, newest first: ['{flipped.parent / 'last.ckpt'}']" in message
    assert "Pass one of those with --ckpt_path" in message and len(message.splitlines()) == 1
    assert unreadable_reason(flipped) == f"its record {record!r} fails its CRC-32 check"
    with pytest.raises(CorruptCheckpointError, match="fails its CRC-32 check"):
        RKNetModule.load_from_checkpoint(flipped)


def test_a_legacy_pickle_checkpoint_has_no_crc_to_check_and_still_reads(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(legacy)["state_dict"]["w"], torch.ones(3))
    assert unreadable_reason(legacy) is None  # was: mmap refused the legacy format, so `last` skipped it


def test_a_pretrained_file_damaged_before_its_hash_was_recorded_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = pretrained.info("quickstart_digits")
    (tmp_path / entry.file).parent.mkdir(parents=True)
    shutil.copy(QUICKSTART, tmp_path / entry.file)
    record = damage_record(tmp_path / entry.file)
    sha256 = hashlib.sha256((tmp_path / entry.file).read_bytes()).hexdigest()
    monkeypatch.setitem(pretrained.PRETRAINED, entry.name, dataclasses.replace(entry, sha256=sha256))
    with pytest.raises(CorruptCheckpointError, match=rf"has the recorded SHA-256, but its record {record!r} fails"):
        pretrained.load(entry.name, root=tmp_path)


def test_pretrained_load_validates_root_and_map_location() -> None:
    with pytest.raises(TypeError, match=r"root must be a folder path \(str or os.PathLike\), got int 5"):
        pretrained.load("quickstart_digits", root=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"map_location='bogus' names no device; pass 'cpu', 'cuda', 'cuda:N'"):
        pretrained.load("quickstart_digits", map_location="bogus")
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    with pytest.raises(ValueError, match=rf"map_location='{absent}': this machine has .*pass"):
        pretrained.load("quickstart_digits", map_location=absent)
    with pytest.raises(TypeError, match=r"map_location must be a device .* got int 7"):
        pretrained.load("quickstart_digits", map_location=7)
    with pytest.raises(TypeError, match=r"both strings as torch.load takes them"):  # torch fails on a device there
        pretrained.load("quickstart_digits", map_location={"cpu": torch.device("cpu")})
    model = pretrained.load("quickstart_digits", map_location={"cuda:0": "cpu"})
    assert next(model.parameters()).device.type == "cpu"


def test_a_folder_given_as_checkpoint_says_it_is_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run.ckpt"
    folder.mkdir()
    shutil.copy(QUICKSTART, folder / "last.ckpt")
    with pytest.raises(CheckpointNotFoundError, match=r"is a folder, not a checkpoint file; pass a \.ckpt file inside"):
        load_checkpoint(folder)


# -- --ckpt_path last ------------------------------------------------------------------------------------------
def save(path: Path, global_step: int, epoch: int, age: float) -> Path:
    """A small checkpoint at ``path`` recording that progress, modified ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(64)}, "global_step": global_step, "epoch": epoch}, path)
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    return path


def test_last_chooses_the_most_training_progress_not_the_newest_file_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After cp -r, touch or rsync without -t, last.ckpt (step 3) was newer than interrupted.ckpt (step 4): the run
    resumed the older state, then deleted interrupted.ckpt at teardown."""
    folder = tmp_path / "version_0" / "checkpoints"
    interrupted = save(folder / "interrupted.ckpt", global_step=4, epoch=1, age=60)
    last = save(folder / "last.ckpt", global_step=3, epoch=1, age=0)
    caplog.set_level(logging.INFO)
    assert find_resume_checkpoint(tmp_path) == interrupted
    assert f"chose {str(interrupted)!r} (global_step 4, epoch 1) over the newer file {str(last)!r}" in caplog.text


def test_last_breaks_ties_by_epoch_then_modification_time(tmp_path: Path) -> None:
    folder = tmp_path / "version_0" / "checkpoints"
    save(folder / "last.ckpt", global_step=5, epoch=1, age=0)
    later_epoch = save(folder / "interrupted.ckpt", global_step=5, epoch=2, age=60)
    assert find_resume_checkpoint(tmp_path) == later_epoch
    newest = save(folder / "last-v1.ckpt", global_step=5, epoch=2, age=10)
    assert find_resume_checkpoint(tmp_path) == newest


def test_last_takes_the_latest_run_and_in_it_the_most_progress(tmp_path: Path) -> None:
    """A fresh run (version_1) stopped at step 2 is resumed, not the finished version_0 at step 6, whatever the
    modification times say; without version folders (MLflow's run ids), the run of the newest file counts."""
    save(tmp_path / "version_0" / "checkpoints" / "last.ckpt", global_step=6, epoch=1, age=0)
    interrupted = save(tmp_path / "version_1" / "checkpoints" / "interrupted.ckpt", global_step=2, epoch=0, age=60)
    assert find_resume_checkpoint(tmp_path) == interrupted

    mlruns = tmp_path / "mlruns"
    save(mlruns / "0a1b" / "checkpoints" / "last.ckpt", global_step=6, epoch=1, age=120)
    save(mlruns / "2c3d" / "checkpoints" / "last.ckpt", global_step=3, epoch=1, age=0)
    newest_run = save(mlruns / "2c3d" / "checkpoints" / "interrupted.ckpt", global_step=4, epoch=1, age=60)
    assert find_resume_checkpoint(mlruns) == newest_run


def test_last_skips_a_file_with_changed_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "version_0" / "checkpoints"
    last = save(folder / "last.ckpt", global_step=3, epoch=1, age=60)
    interrupted = save(folder / "interrupted.ckpt", global_step=4, epoch=1, age=0)
    record = damage_record(interrupted)
    with pytest.warns(UserWarning, match=rf"skipped .*interrupted\.ckpt', it cannot be read \(its record {record!r}"):
        assert find_resume_checkpoint(tmp_path) == last


# -- python -m lightning_pdenets.migration -------------------------------------------------------------------
def run_migration(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of the migration command run in this process."""
    try:
        migrate(args)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def legacy_rknet(tmp_path: Path) -> Path:
    """The quickstart RK-Net as release 0.1.x saved it without the CLI: flat hyperparameters, no model class."""
    checkpoint = torch.load(QUICKSTART, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    del hparams["_class_path"], checkpoint[VERSION_KEY]
    solver = hparams.pop("solver")
    hparams.update({key: solver[key] for key in LEGACY_SOLVER_KEYS}, **hparams.pop("network"))
    torch.save(checkpoint, tmp_path / "old.ckpt")
    return tmp_path / "old.ckpt"


def test_the_migration_refuses_a_model_class_the_checkpoint_does_not_fit(
    legacy_rknet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "new.ckpt"
    code, err = run_migration(
        [str(legacy_rknet), str(target), "--model", "lightning_pdenets.models.PRNetModule"], capsys
    )
    assert code == 2 and not target.exists()
    line = err.strip().splitlines()[-1]
    assert "is not a checkpoint of --model lightning_pdenets.models.PRNetModule" in line
    assert "it fits lightning_pdenets.models.ODENetModule or lightning_pdenets.models.RKNetModule" in line
    assert run_migration([str(legacy_rknet), str(target), "--model", "lightning_pdenets.models.RKNetModule"], capsys)[
        0
    ] == 0 and isinstance(RKNetModule.load_from_checkpoint(target), RKNetModule)


def test_the_migration_refuses_a_model_class_other_than_the_recorded_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_migration(
        [str(QUICKSTART), str(tmp_path / "new.ckpt"), "--model", "lightning_pdenets.models.ResNetModule"], capsys
    )
    assert code == 2 and not (tmp_path / "new.ckpt").exists()
    assert "records its model class lightning_pdenets.models.RKNetModule, but --model names " in err


def test_the_migration_names_a_folder_given_as_source_or_target(
    legacy_rknet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoints").mkdir()
    rknet = ["--model", "lightning_pdenets.models.RKNetModule"]
    code, err = run_migration([str(legacy_rknet), str(tmp_path / "checkpoints"), *rknet], capsys)
    assert code == 2 and "Traceback" not in err  # was an IsADirectoryError traceback
    assert f"target '{tmp_path / 'checkpoints'}' is a folder; pass the file to write, e.g. " in err
    code, err = run_migration([str(tmp_path / "checkpoints"), str(tmp_path / "new.ckpt")], capsys)
    assert code == 2 and "is a folder; pass the .ckpt file to upgrade" in err


def test_the_migration_refuses_changed_bytes(damaged: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    flipped, record = damaged
    code, err = run_migration([str(flipped), str(flipped.with_name("new.ckpt"))], capsys)
    assert code == 2 and f"its record {record!r} fails its CRC-32 check" in err
    assert not flipped.with_name("new.ckpt").exists()


# -- through the CLI --------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_the_cli_refuses_changed_bytes_and_a_folder_in_one_line(
    damaged: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_pdenets.cli import main

    flipped, record = damaged
    for ckpt_path, problem in ((flipped, f"its record {record!r} fails its CRC-32 check"), (flipped.parent, "folder")):
        with pytest.raises(SystemExit) as stop:
            main(["test", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--ckpt_path", str(ckpt_path)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err
        assert problem in err.strip().splitlines()[-1] and err.strip().splitlines()[-1].startswith("error: checkpoint")


def test_load_from_checkpoint_checks_file_objects_folders_and_map_location(
    damaged: tuple[Path, str], tmp_path: Path
) -> None:
    flipped, record = damaged
    with open(flipped, "rb") as file, pytest.raises(CorruptCheckpointError, match=record):
        RKNetModule.load_from_checkpoint(file)
    with pytest.raises(CheckpointNotFoundError, match="is a folder, not a checkpoint file"):
        RKNetModule.load_from_checkpoint(flipped.parent)
    with pytest.raises(ValueError, match="map_location"):
        RKNetModule.load_from_checkpoint(flipped.parent / "last.ckpt", map_location="bogus")
    with open(flipped.parent / "last.ckpt", "rb") as file:
        assert isinstance(RKNetModule.load_from_checkpoint(file), RKNetModule)  # an intact file object loads
