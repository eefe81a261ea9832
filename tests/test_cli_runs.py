"""Runs through the real `pdenets` command: last.ckpt, per-config log folders, SIGTERM, advice after a NaN."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_pdenets.cli import build_cli, experiment_name, main
from lightning_pdenets.errors import NonFiniteLossError
from lightning_pdenets.models import RKNetModule
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

QUICKSTART = str(REPO_ROOT / "configs/quickstart.yaml")
TINY = [
    "--model.init_args.network.width=8",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--test_after_fit=false",
]
QUICK = ["--config", QUICKSTART, *TINY]


def test_last_checkpoint_holds_the_last_epoch_when_the_best_is_earlier(tmp_path: Path) -> None:
    # lr 1e-12 leaves the weights as they are: validation accuracy stays equal, so the best epoch stays the first
    build_cli(["fit", *QUICK, "--trainer.max_epochs=3", "--model.init_args.lr=1e-12"])
    checkpoints = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-epoch=00.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)


def test_each_config_logs_into_a_folder_named_after_it() -> None:
    assert experiment_name([REPO_ROOT / "configs/mnist/odenet.yaml"]) == "mnist/odenet"
    assert experiment_name([REPO_ROOT / "configs/trainer/cpu.yaml", QUICKSTART]) == "quickstart"  # the model's config
    assert re.fullmatch(r"my_run-[0-9a-f]{8}", experiment_name([Path("/elsewhere/my_run.yaml")]))  # stem + path hash
    assert experiment_name([]) == "pdenets"


def test_ckpt_path_last_resumes_this_configs_run_never_another_ones(tmp_path: Path) -> None:
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    # a PR-Net run afterwards: its checkpoint is the newest in logs/, but belongs to another experiment
    build_cli(["fit", "--config", str(REPO_ROOT / "configs/digits/prnet.yaml"), *TINY[1:], "--trainer.max_epochs=1"])
    assert (tmp_path / "logs" / "digits" / "prnet" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    resumed = build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert type(resumed.model) is RKNetModule
    assert resumed.trainer.ckpt_path == str(Path("logs/quickstart/version_0/checkpoints/last.ckpt"))
    assert resumed.trainer.global_step == 6


def test_ckpt_path_last_says_what_it_does_with_the_checkpoint(tmp_path: Path, caplog) -> None:
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    caplog.set_level("INFO")
    last = Path("logs/quickstart/version_0/checkpoints/last.ckpt")
    build_cli(["test", *QUICK[:-1], "--trainer.limit_test_batches=1", "--ckpt_path=last"])
    assert f"Running test on {last}" in caplog.text and "Resuming" not in caplog.text  # a test resumes nothing
    caplog.clear()
    build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert f"Resuming from {last}" in caplog.text


def test_ckpt_path_last_skips_an_unreadable_checkpoint_and_says_so(tmp_path: Path) -> None:
    """An interrupt checkpoint left empty by a full disk is the newest file; `last` must not choose it."""
    build_cli(["fit", *QUICK, "--trainer.max_epochs=1"])
    checkpoints = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    (checkpoints / "interrupted.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped .*interrupted\.ckpt', it cannot be read \(the file is empty\)"):
        resumed = build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.ckpt_path == str(checkpoints.relative_to(tmp_path) / "last.ckpt")
    assert resumed.trainer.global_step == 6


class SigTermAtStep(pl.Callback):
    """Send SIGTERM to this process after ``step`` optimizer steps, as a cluster scheduler would."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm_config(tmp_path: Path, step: int) -> list[str]:
    config = tmp_path / "sigterm.yaml"
    config.write_text(
        f"trainer:\n  callbacks+:\n    - class_path: {__name__}.SigTermAtStep\n      init_args:\n        step: {step}\n"
    )
    return ["--config", str(config)]


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", *QUICK, "--trainer.max_epochs=2", *sigterm_config(tmp_path, step=2)])
    assert stop.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM (exit code 143)" in capsys.readouterr().err
    interrupted = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 2
    resumed = build_cli(["fit", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 6


def tensorboard_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """Every scalar of every event file in ``folder`` as ``{(tag, step): value}`` (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.update({(tag, event.step): event.value for event in accumulator.Scalars(tag)})
    return scalars


@pytest.mark.parametrize("step", [2, 3])  # inside epoch 0; after its last batch, so during its validation
def test_a_run_stopped_by_sigterm_and_resumed_logs_what_an_uninterrupted_run_logs(step: int, tmp_path: Path) -> None:
    run = [*QUICK, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"]
    build_cli(["fit", *run])
    with pytest.raises(SystemExit):
        build_cli(["fit", *run, *sigterm_config(tmp_path, step)])
    build_cli(["fit", *run, "--ckpt_path=last"])
    logs = tmp_path / "logs" / "quickstart"
    reference, resumed = tensorboard_scalars(logs / "version_0"), tensorboard_scalars(logs / "version_1")
    assert {("train/loss_epoch", 2), ("train/acc_top1", 2), ("val/acc_top1", 2)} <= set(reference)
    assert resumed == reference


class DivergesAboveLR(RKNetModule):
    """An RK-Net whose training loss is NaN whenever the learning rate exceeds ``max_stable_lr``."""

    def __init__(self, max_stable_lr: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_stable_lr = max_stable_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training and self.trainer.optimizers[0].param_groups[0]["lr"] > self.max_stable_lr:
            return logits * float("nan")
        return logits


# SGD at 0.01, x100 from epoch 1 on: epoch 0 trains, epoch 1 diverges at 1.0 > 0.5
DIVERGING = [
    *QUICK,
    f"--model={__name__}.DivergesAboveLR",
    "--model.init_args.optimizer=sgd",
    "--model.init_args.lr=0.01",
    "--model.init_args.lr_scheduler=multistep",
    "--model.init_args.lr_milestones=[1]",
    "--model.init_args.lr_gamma=100",
    "--trainer.max_epochs=3",
]


def test_the_advice_after_a_nan_continues_the_run(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as failure:
        build_cli(["fit", *DIVERGING])
    message = str(failure.value)
    assert "The last good checkpoint is kept: logs/quickstart/version_0/checkpoints/last.ckpt" in message
    advice = re.search(r"run the same command with (--ckpt_path last --model\.init_args\.lr \S+)", message)
    assert advice, message

    resumed = build_cli(["fit", *DIVERGING, *advice.group(1).split()])  # the advice, followed to the letter
    assert resumed.trainer.global_step == 9  # resumed at step 3, trained epochs 1 and 2 to the end
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 * 100)


def test_a_nan_ends_pdenets_with_its_message_and_no_traceback(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *DIVERGING])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "error: NonFiniteLossError: non-finite loss term(s) ['loss']" in error
    assert "--ckpt_path last --model.init_args.lr" in error  # the remedy is in the message


def test_the_advice_after_a_nan_before_any_checkpoint_starts_afresh(tmp_path: Path) -> None:
    diverging_at_once = [*DIVERGING, "--model.init_args.max_stable_lr=0.005"]
    with pytest.raises(NonFiniteLossError) as failure:
        build_cli(["fit", *diverging_at_once])
    message = str(failure.value)
    assert "kept" not in message and "No checkpoint was written yet" in message
    assert not list(tmp_path.rglob("*.ckpt"))
    advice = re.search(r"run the same command with a lower learning rate \((--model\.init_args\.lr \S+)\)", message)
    assert advice, message
    rerun = build_cli(["fit", *diverging_at_once, "--trainer.max_epochs=1", *advice.group(1).split()])
    assert rerun.trainer.global_step == 3


def test_a_run_without_a_logger_writes_into_a_version_folder_of_its_config(tmp_path: Path) -> None:
    # Lightning wrote config.yaml and checkpoints/ into the working directory, and the next run wrote over them
    args = ["fit", *QUICK, "--trainer.logger=false", "--trainer.max_epochs=1"]
    build_cli(args)
    build_cli(args)
    runs = tmp_path / "logs" / "quickstart"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    for version in ("version_0", "version_1"):
        assert (runs / version / "config.yaml").is_file() and (runs / version / "checkpoints" / "last.ckpt").is_file()

    resumed = build_cli([*args[:-1], "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.ckpt_path == str(Path("logs/quickstart/version_1/checkpoints/last.ckpt"))
    assert torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # the resumed run continued its folder
