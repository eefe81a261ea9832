"""Bad arguments reach the user as a hint and one message ending the output, with exit code 2, never a traceback."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_pdenets.cli import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

QUICK = ["fit", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--trainer.enable_progress_bar=false"]


def error_of(args: list[str], capsys) -> str:
    """Run ``pdenets`` with ``args``; check exit code 2 and no traceback; return the last line of stderr."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (
            "--model.init_args.solver.method=rk5",
            r"error: RKNetModule: `solver.method` must be one of \['adaptive_heun', .*got 'rk5'\.$",
        ),
        (
            "--model.init_args.solver.step_size=-0.1",
            r"error: RKNetModule: `solver.step_size` must be a finite number > 0, got -0\.1\.$",
        ),
        ("--data.init_args.batch_size=0", r"error: DigitsDataModule: `batch_size` must be an integer >= 1, got 0\.$"),
        (
            "--model.class_path=lightning_pdenets.models.RKNetModul",
            r"error: --model: there is no class 'lightning_pdenets\.models\.RKNetModul'\. Closest valid classes: "
            r"lightning_pdenets\.models\.RKNetModule, ",
        ),
        (
            "--model=RKNetModul",
            r"error: --model: there is no class 'RKNetModul'\. Closest valid classes: "
            r"lightning_pdenets\.models\.RKNetModule",
        ),
        (
            "--trainer.callbacks+=EarlyStoping",
            r"error: --trainer\.callbacks: there is no class 'EarlyStoping'\. "
            r"Closest valid classes: lightning\.pytorch\.callbacks\.EarlyStopping\.$",
        ),
        (
            "--model.init_args.network.widht=8",
            r"error: RKNetModule: `network` \(architecture 'odenet_chen'\): unknown `network` setting\(s\) 'widht' "
            r"\(did you mean 'width'\?\); valid names are \['width', 'num_downsamples', 'activation'\]\.$",
        ),
        (
            "--model.init_args.lr_schedular=cosine",
            r"error: --model: lightning_pdenets\.models\.RKNetModule has no argument "
            r"'lr_schedular'\. Closest valid arguments: lr_scheduler\.$",
        ),
        ("--trainer.max_epochs=x", r"error: --trainer\.max_epochs: expected int \(got 'x'\)$"),
        # Lightning's own checks of trainer settings (a MisconfigurationException traceback before)
        (
            "--trainer.max_epochs=-2",
            r"error: Trainer: `max_epochs` must be a non-negative integer or -1\. You passed in -2\.$",
        ),
        ("--trainer.limit_train_batches=-1", r"error: Trainer: You have passed invalid value -1 for limit_train"),
        ("--trainer.gradient_clip_algorithm=foo", r"error: Trainer: `gradient_clip_algorithm` foo is invalid\."),
        ("--trainer.max_time=abc", r"error: Trainer: `Timer\(duration='abc'\)` is not a valid duration\."),
        # counts Lightning let through: a ZeroDivisionError in the first batch, or silently "none"
        (
            "--trainer.accumulate_grad_batches=0",
            r"error: --trainer\.accumulate_grad_batches must be an integer >= 1 \(batches per optimizer step\), "
            r"got 0\.$",
        ),
        ("--trainer.check_val_every_n_epoch=0", r"error: --trainer\.check_val_every_n_epoch must be an integer >= 1"),
        ("--trainer.val_check_interval=0", r"error: --trainer\.val_check_interval must be an integer >= 1 \(batches\)"),
        ("--trainer.num_sanity_val_steps=-5", r"error: --trainer\.num_sanity_val_steps must be an integer >= 0"),
        ("--trainer.log_every_n_steps=-3", r"error: --trainer\.log_every_n_steps must be an integer >= 0"),
        ("--trainer.min_epochs=-1", r"error: --trainer\.min_epochs must be an integer >= 0, got -1\.$"),
    ],
)
def test_a_bad_argument_ends_with_a_short_message_and_exit_code_2(argument: str, message: str, capsys) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("JSONARGPARSE_DEBUG", raising=False)
        last_line = error_of([*QUICK, argument], capsys)
    assert re.search(message, last_line), last_line


def test_two_entries_of_one_stateful_callback_end_with_a_short_message(capsys) -> None:
    # Lightning's Trainer refuses them with a RuntimeError traceback (one checkpoint state per class)
    args = [
        "--trainer.callbacks+=SolverSwapCheck",
        "--trainer.callbacks+=SolverSwapCheck",
        "--trainer.callbacks.solvers=[euler]",
    ]
    last_line = error_of([*QUICK, *args], capsys)
    assert last_line.startswith("error: trainer.callbacks holds SolverSwapCheck twice; a run takes one"), last_line


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_schedule_that_needs_a_horizon_refuses_an_endless_run(schedule: str, capsys) -> None:
    last_line = error_of(
        [
            *QUICK,
            "--trainer.max_epochs=-1",
            f"--model.init_args.lr_scheduler={schedule}",
            "--trainer.limit_train_batches=2",
        ],
        capsys,
    )
    assert last_line.startswith(f"error: `lr_scheduler='{schedule}'`") and "Set --trainer.max_epochs N" in last_line


def test_multistep_needs_no_horizon(tmp_path) -> None:
    """Milestones are epochs counted from the start: an endless run (stopped by max_steps here) is fine."""
    main(
        [
            *QUICK,
            "--trainer.max_epochs=-1",
            "--trainer.max_steps=2",
            "--model.init_args.lr_scheduler=multistep",
            "--model.init_args.lr_milestones=[1]",
            "--model.init_args.network.width=8",
            "--test_after_fit=false",
        ]
    )


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_on_a_machine_without_one_says_which_setting_to_change(capsys) -> None:
    last_line = error_of([*QUICK, "--trainer.accelerator=gpu"], capsys)
    assert last_line.startswith("error: Trainer: No supported gpu backend found!"), last_line
    assert "use --trainer.accelerator=cpu" in last_line, last_line


def test_a_monitor_no_metric_has_ends_with_a_short_message_after_the_first_validation(tmp_path, capsys) -> None:
    """Lightning finds it only when the checkpoint is first saved, mid-run; it was a traceback wall."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        last_line = error_of(
            [
                *QUICK,
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
                "--trainer.callbacks+=ModelCheckpoint",
                "--trainer.callbacks.monitor=val/accuracy",
            ],
            capsys,
        )
    assert last_line.startswith("error: `ModelCheckpoint(monitor='val/accuracy')` could not find the monitored key")
    assert "'val/acc_top1'" in last_line  # Lightning's message lists the keys there are


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trainer.max_epcohs", "1"],
            r"error: unrecognized arguments: --trainer\.max_epcohs 1\. Did you mean --trainer\.max_epochs\?$",
        ),
        # argparse's prefix matching took it for --trainer.max_epochs in silence
        (
            ["--trainer.max_epoch=1"],
            r"error: unrecognized arguments: --trainer\.max_epoch=1\. Did you mean --trainer\.max_epochs\?$",
        ),
        (["--ckpt_pth=x"], r"Did you mean --ckpt_path\?$"),
        (
            ["--model.init_args.solver.step_sise=0.1"],
            r"error: --model: lightning_pdenets\.models\.RKNetModule: unknown `solver` key\(s\) 'step_sise' \(did you "
            r"mean 'step_size'\?\); valid keys are .*\bmethod, .*\bstep_size, t0, t1\.$",
        ),
        # argparse named the option that took the value (--data), not the one typed
        (
            ["--data.init_args.seed"],
            r"error: --data\.init_args\.seed expects a value: `--data\.init_args\.seed VALUE` or "
            r"`--data\.init_args\.seed=VALUE`\.$",
        ),
    ],
    ids=["misspelled-trainer-option", "abbreviated-option", "misspelled-top-level-option", "typeddict-key", "no-value"],
)
def test_a_misspelled_option_or_key_gets_the_closest_valid_one(args: list[str], message: str, capsys) -> None:
    last_line = error_of([*QUICK, *args], capsys)
    assert re.search(message, last_line), last_line


def test_a_misspelled_optimizer_options_key_of_prnet_gets_the_closest_valid_one(capsys) -> None:
    config = str(REPO_ROOT / "configs/mnist/prnet.yaml")
    last_line = error_of(["fit", "--config", config, "--model.init_args.theta.lrr=0.1"], capsys)
    assert re.search(
        r"unknown `theta` key\(s\) 'lrr' \(did you mean 'lr'\?\); valid keys are lr, lr_gamma, .*weight_decay\.$",
        last_line,
    ), last_line


def test_a_misspelled_key_in_a_config_file_gets_the_closest_valid_one(tmp_path, capsys) -> None:
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epcohs: 2\n")
    last_line = error_of([*QUICK, "--config", str(tmp_path / "typo.yaml")], capsys)
    assert last_line.endswith("does not accept option 'trainer.max_epcohs'. Did you mean trainer.max_epochs?"), (
        last_line
    )


def test_a_config_before_the_subcommand_is_told_to_go_after_it(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "fit"])
    tip, last_line = capsys.readouterr().err.strip().splitlines()[-2:]
    assert stop.value.code == 2
    assert last_line == (
        "error: the --config given before the subcommand sets 'model.init_args.network.width', which only the "
        "subcommand takes. Put --config after the subcommand: `pdenets fit --config FILE`."
    )
    assert tip == "tip: `pdenets fit --help` lists every option and its default."  # `pdenets --help` lists no option


def test_the_tip_without_a_subcommand_names_the_subcommands_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fti"])
    assert capsys.readouterr().err.startswith(
        "tip: `pdenets fit --help` (or validate, test, predict) lists every option and its default.\n"
    )
