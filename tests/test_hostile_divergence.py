"""Issue 28, item 4: a fit that diverged says so with the measured symptom and exits 1, and its advice learns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_pdenets.cli import build_cli
from tests.conftest import REPO_ROOT
from tests.test_hostile_resume import run, snapshot

pytestmark = pytest.mark.cli

QUICKSTART = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--trainer.enable_progress_bar=false"]
EXPLODING = [*QUICKSTART, "--model.init_args.lr=1e6"]  # the case: Adam at 1e6, loss 1.9e12, accuracy 0.10


def test_a_fit_whose_loss_exploded_exits_1_with_the_symptom_and_keeps_its_checkpoints(tmp_path: Path, capsys) -> None:
    short = [
        *EXPLODING,
        "--model.init_args.network.width=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=1",
    ]
    code, err = run(["fit", *short], capsys)
    assert code == 1
    error = err.strip().splitlines()[-1]
    assert re.match(
        r"error: DivergedError: the model diverged: the training loss rose from \S+ at the first step to "
        r"\S+ in the last epoch",
        error,
    ), error
    assert "start a fresh run, i.e. the same command without --ckpt_path, with --model.init_args.lr 0.001" in error
    assert "test/acc_top1" not in err  # no test of a diverged model
    checkpoints = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    kept = snapshot(checkpoints)

    code, err = run(["fit", *short, "--allow_divergence=true"], capsys)
    assert code == 0
    assert snapshot(checkpoints) == kept  # the accepted run went to version_1


@pytest.mark.slow  # two quickstart fits of three epochs: about a minute each on 2 shared cores
def test_following_the_advice_after_a_divergence_gives_a_run_that_learns(tmp_path: Path, capsys) -> None:
    command = ["fit", *EXPLODING, "--trainer.max_epochs=3"]
    code, err = run(command, capsys)
    assert code == 1 and "DivergedError" in err
    advice = re.search(r"the same command without --ckpt_path, with (--model\.init_args\.lr \S+)\.", err)
    assert advice, err

    advised = build_cli([*command, *advice.group(1).split()])  # the advice, followed to the letter
    accuracy = float(advised.trainer.callback_metrics["test/acc_top1"])
    assert accuracy >= 0.8, accuracy
