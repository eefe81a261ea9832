"""Issue 28, item 3: ``--trainer.default_root_dir`` decides where logs and checkpoints go, and ``last`` looks there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_hostile_resume import TINY, run, snapshot

pytestmark = pytest.mark.cli

QUICK = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width=8", *TINY]


def test_default_root_dir_holds_the_logs_and_last_resumes_from_there(tmp_path: Path, capsys) -> None:
    assert run(["fit", *QUICK, "--trainer.default_root_dir", "runs"], capsys)[0] == 0
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (tmp_path / "logs").exists()

    code, err = run(
        ["fit", *QUICK, "--trainer.default_root_dir", "runs", "--trainer.max_epochs=2", "--ckpt_path", "last"], capsys
    )
    assert code == 0, err
    assert torch.load(last, weights_only=True)["global_step"] == 4  # continued: 2 steps restored + 2 new
    assert not (tmp_path / "logs").exists()


def test_an_explicit_logger_save_dir_still_wins(tmp_path: Path, capsys) -> None:
    assert (
        run(
            ["fit", *QUICK, "--trainer.default_root_dir", "runs", "--trainer.logger.init_args.save_dir", "elsewhere"],
            capsys,
        )[0]
        == 0
    )
    assert (tmp_path / "elsewhere" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_default_root_dir_that_is_a_file_is_a_short_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    for root, cause in (("notes.txt", "is a file, not a folder"), ("notes.txt/runs", "'notes.txt' is a file")):
        code, err = run(["fit", *QUICK, "--trainer.default_root_dir", root], capsys)
        assert code == 2
        assert err.startswith("error: --trainer.default_root_dir") and cause in err and "Pass a folder" in err
        assert len(err.strip().splitlines()) <= 2
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert snapshot(tmp_path) == {"notes.txt": b"keep me"}


def test_a_default_root_dir_that_cannot_be_created_is_a_short_error(tmp_path: Path, capsys) -> None:
    """os.access says yes under /proc (and for root almost everywhere); creating the folder there fails. It was a
    FileNotFoundError traceback from the logger's first write."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    code, err = run(["fit", *QUICK, "--trainer.default_root_dir", "/proc/no_such_folder/runs"], capsys)
    assert code == 2
    assert err.startswith("error: --trainer.default_root_dir '/proc/no_such_folder/runs' cannot be created"), err
    assert "Pass a folder you can write to" in err and len(err.strip().splitlines()) <= 2


def test_the_creation_probe_leaves_no_folder_behind(tmp_path: Path, capsys) -> None:
    code, _ = run(["fit", *QUICK, "--trainer.default_root_dir", "new/deeper/runs", "--trainer.max_epochs=-2"], capsys)
    assert code == 2  # stopped by the bad max_epochs after the folder check
    assert not (tmp_path / "new").exists()
