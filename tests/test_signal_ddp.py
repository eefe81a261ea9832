"""SIGTERM to one DDP rank, and an error every rank meets while setting up: both ranks end together, in few lines.

Through the ``pdenets`` CLI on 2 gloo processes, as tests/test_ddp_cli.py runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_ddp_cli import DDP_CPU, finish, start

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
FIT = [
    "fit",
    "--config",
    QUICKSTART,
    "--config",
    DDP_CPU,
    "--model.init_args.network.width=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=2",
    "--test_after_fit=false",
    "--trainer.enable_progress_bar=false",
]


def test_sigterm_to_rank_1_alone_stops_both_ranks_at_one_batch_with_an_interrupt_checkpoint(tmp_path: Path) -> None:
    """Lightning's per-batch check broadcast rank 0's flag alone and then stopped rank 1 alone: rank 0 waited in its
    next collective until the watchdog ended rank 1 (20 s), no checkpoint was written, the job exited 1, and the
    advice to resume with --ckpt_path last failed."""
    process = start([*FIT, "--trainer.callbacks+=tests.ddp_faults.SigtermOnRank"], tmp_path)
    started = time.monotonic()
    result = finish(process, timeout=240)
    assert result.returncode == 143, result.stderr[-6000:]
    assert "Traceback" not in result.stderr and "did not stop" not in result.stderr, result.stderr[-6000:]
    written = list(tmp_path.rglob("interrupted.ckpt"))
    assert len(written) == 1, result.stderr[-6000:]
    steps = torch.load(written[0], map_location="cpu", weights_only=True)["global_step"]
    assert steps == 3  # batches 0 to 2: the signalled batch completed on both ranks
    stops = [line for line in result.stderr.splitlines() if line.startswith("pdenets: fit stopped by SIGTERM")]
    assert stops and all("--ckpt_path last" in line for line in stops), result.stderr[-4000:]
    assert time.monotonic() - started < 200

    resumed = finish(start([*FIT, "--ckpt_path", "last"], tmp_path), timeout=240)  # the advice, followed
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert not list(tmp_path.rglob("interrupted.ckpt"))  # the completed fit removed it


def test_a_setup_error_on_every_rank_is_printed_once_without_a_store_stack(tmp_path: Path) -> None:
    """Rank 1 polled the store that rank 0 hosts after rank 0 had left: torch printed a C++ stack
    (``TCPStore ... recvValue failed``), and both ranks printed the error."""
    result = finish(start([*FIT, "--config", str(REPO_ROOT / "callbacks" / "multilevel.yaml")], tmp_path), 240)
    assert result.returncode == 2, result.stderr[-6000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-6000:]
    assert "TCPStore" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-6000:]
