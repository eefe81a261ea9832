"""A rank-local failure ends every DDP rank within seconds (issue 28 follow-up): the failing rank with its own short
message, the others with one line that points at it, no traceback wall and no wait for the collective timeout.

Through the ``pdenets`` CLI on 2 gloo processes, as tests/test_ddp_cli.py runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.fakedata.tinyimagenet import fake_tinyimagenet
from tests.test_corrupt_datasets import train_order, truncate
from tests.test_ddp_cli import DDP_CPU, finish, start

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]

PROMPT = 60
"""Seconds within which both ranks must have ended: well below the 180 s collective timeout of ddp_cpu.yaml."""


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_corrupt_image_met_by_one_rank_mid_epoch_ends_both_ranks_at_once(failing_rank: int, tmp_path: Path) -> None:
    """Rank 1 fails: rank 0 (the job's status) names it and exits with its status. Rank 0 fails: the job ends with
    its error; rank 1, whose rank-0-hosted store left with it, says "another DDP process" without the rank."""
    settings = fake_tinyimagenet(tmp_path / "data")
    settings_for_order = {**settings, "val_size": 8, "batch_size": 2}
    # the single-process order, sharded: rank r reads order[2k + r] as its k-th sample; k = 4 is in each rank's
    # third batch of two (Lightning fetches one batch ahead, so it meets the file after the first optimizer step)
    broken = Path(train_order(settings_for_order)[2 * 4 + failing_rank])
    truncate(broken)
    process = start(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--config",
            DDP_CPU,
            "--model.init_args.network.width=8",
            "--data=lightning_pdenets.data.TinyImageNetDataModule",
            "--data.init_args.batch_size=2",
            "--data.init_args.val_size=8",
            "--data.init_args.num_workers=1",
            f"--data.init_args.data_dir={tmp_path / 'data'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=0",
            "--test_after_fit=false",
            "--trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    started = time.monotonic()
    result = finish(process, timeout=PROMPT + 60)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT, f"took {elapsed:.0f} s:\n{result.stderr[-6000:]}"
    assert result.returncode == 2, result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr[-6000:]
    own = [line for line in errors if f"file {str(broken)!r} is present but unreadable" in line]
    peer = [line for line in errors if line not in own]
    assert len(own) == 1 and len(peer) == 1, errors
    assert "another DDP process" in peer[0] and "own error message names the cause" in peer[0], peer[0]
    if failing_rank == 1:
        assert "(rank 1) failed with UnreadableSampleError" in peer[0], peer[0]
    assert not list(tmp_path.rglob("interrupted.ckpt"))  # saving it needs collectives the peer cannot join
