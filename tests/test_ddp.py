"""DDP on 2 CPU processes (gloo): identical ranks, same result as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_pdenets.data.loading import check_global_batch_size
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ddp
RUNNER = REPO_ROOT / "tests" / "ddp_runner.py"


def run(out_dir: Path, devices: int, batch_size: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(RUNNER), str(out_dir), str(devices), str(batch_size)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_ranks_agree_and_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    run(tmp_path, devices=2, batch_size=16)
    run(tmp_path, devices=1, batch_size=32)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}_of_2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of_1.pt")
    assert rank0["steps"] == rank1["steps"] == single["steps"] == 4
    assert torch.equal(rank0["parameters"], rank1["parameters"])
    assert torch.allclose(rank0["parameters"], single["parameters"], atol=1e-5, rtol=1e-4)
    # validation sees every sample exactly once on both layouts, and metrics are synced over ranks
    assert rank0["metrics"]["val/acc_top1"] == rank1["metrics"]["val/acc_top1"]
    assert abs(rank0["metrics"]["val/acc_top1"] - single["metrics"]["val/acc_top1"]) < 1e-6


def test_global_batch_size_must_divide_by_the_number_of_processes() -> None:
    assert check_global_batch_size(256, 4) == 64
    assert check_global_batch_size(None, 4) is None
    with pytest.raises(ValueError, match="`global_batch_size`=100 is not divisible by the 3 processes"):
        check_global_batch_size(100, 3)
