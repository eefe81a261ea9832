"""Issue 28, item 5: resuming with a longer run stretches ``cosine`` and ``onecycle`` over it, and says so."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_hostile_resume import TINY, run

pytestmark = pytest.mark.cli

QUICK = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width=8", *TINY]
LR = 0.003  # the quickstart's


def schedule_state(tmp_path: Path) -> dict:
    last = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)["lr_schedulers"][0]


def test_a_cosine_run_resumed_with_more_epochs_anneals_over_them(tmp_path: Path, capsys, caplog) -> None:
    assert run(["fit", *QUICK, "--trainer.max_epochs=3"], capsys)[0] == 0
    caplog.set_level("INFO")
    code, err = run(["fit", *QUICK, "--trainer.max_epochs=4", "--ckpt_path", "last"], capsys)
    assert code == 0, err
    expected = LR * (1 + math.cos(math.pi * 3 / 4)) / 2  # epoch 3 of 4, not 0
    assert (
        f"lr_scheduler 'cosine': the checkpoint's schedule annealed over 3 epochs, this run has max_epochs 4, so "
        f"it now anneals over 4: learning rate {expected:.3g} at epoch 3 (was 0)"
    ) in caplog.text
    state = schedule_state(tmp_path)
    assert state["T_max"] == 4
    assert state["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # annealed to 0 at the end, not rising again


def test_a_onecycle_run_resumed_with_more_epochs_stretches_its_cycle(tmp_path: Path, capsys, caplog) -> None:
    onecycle = [*QUICK, "--model.init_args.lr_scheduler=onecycle"]
    assert run(["fit", *onecycle, "--trainer.max_epochs=2"], capsys)[0] == 0
    caplog.set_level("INFO")
    code, err = run(["fit", *onecycle, "--trainer.max_epochs=3", "--ckpt_path", "last"], capsys)
    assert code == 0, err
    assert "lr_scheduler 'onecycle': the checkpoint's cycle spanned 4 optimizer steps, this run has 6" in caplog.text
    state = schedule_state(tmp_path)
    assert state["total_steps"] == 6 and state["last_epoch"] == 6
