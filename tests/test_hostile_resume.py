"""Issue 28, item 1: ``--ckpt_path`` never continues another experiment, and says which settings differ."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_pdenets.cli import experiment_name, main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

QUICKSTART = REPO_ROOT / "configs/quickstart.yaml"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--test_after_fit=false",
]


def run(args: list[str], capsys) -> tuple[int, str]:
    """``pdenets ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def quickstart_copy(folder: Path, width: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quickstart.yaml"
    path.write_text(QUICKSTART.read_text().replace("width: 64 ", f"width: {width} "))
    return path


def test_configs_of_one_name_in_two_folders_log_apart_and_last_never_resumes_the_other(tmp_path: Path, capsys) -> None:
    a, b = quickstart_copy(tmp_path / "a", 16), quickstart_copy(tmp_path / "b", 8)
    assert experiment_name([a]) != experiment_name([b])
    assert experiment_name([QUICKSTART]) == "quickstart"  # configs/ keeps its names: users have runs there
    assert run(["fit", "--config", str(a), *TINY], capsys)[0] == 0
    before = snapshot(tmp_path / "logs")

    code, err = run(["fit", "--config", str(b), *TINY, "--ckpt_path", "last"], capsys)
    assert code == 2
    assert err.startswith("error: --ckpt_path last: no readable last.ckpt") and "start afresh" in err
    assert snapshot(tmp_path / "logs") == before  # a's run untouched, no folder for b


@pytest.fixture
def width8_run(tmp_path: Path, capsys) -> Path:
    """A quickstart run at width 8; its folder."""
    assert run(["fit", "--config", str(QUICKSTART), "--model.init_args.network.width=8", *TINY], capsys)[0] == 0
    return tmp_path / "logs" / "quickstart"


def test_last_refuses_a_checkpoint_of_another_network_and_names_the_keys(width8_run: Path, capsys) -> None:
    before = snapshot(width8_run)
    code, err = run(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--model.init_args.network.width=16",
            "--model.init_args.network.activation=silu",
            *TINY,
            "--trainer.max_epochs=2",
            "--ckpt_path",
            "last",
        ],
        capsys,
    )
    assert code == 2
    assert len(err.strip().splitlines()) <= 2
    assert (
        "network.width (checkpoint 8, config 16)" in err
        and "network.activation (checkpoint 'relu', config 'silu')" in err
    )
    assert "drop the overrides" in err and "start a fresh run without --ckpt_path" in err
    assert snapshot(width8_run) == before


def test_a_resumed_fit_refuses_other_data_settings(width8_run: Path, capsys) -> None:
    before = snapshot(width8_run)
    code, err = run(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--model.init_args.network.width=8",
            *TINY,
            "--trainer.max_epochs=2",
            "--data.init_args.batch_size=32",
            "--ckpt_path",
            "last",
        ],
        capsys,
    )
    assert code == 2
    assert "data.batch_size (checkpoint 64, config 32)" in err
    assert snapshot(width8_run) == before


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_an_explicit_checkpoint_that_contradicts_the_network_is_a_short_error(
    subcommand: str, width8_run: Path, capsys
) -> None:
    """Before: `test` silently used the checkpoint's width; `fit` ended in a wall of `size mismatch` lines."""
    checkpoint = width8_run / "version_0" / "checkpoints" / "last.ckpt"
    code, err = run(
        [
            subcommand,
            "--config",
            str(QUICKSTART),
            "--model.init_args.network.width=32",
            *TINY,
            "--trainer.max_epochs=2",
            f"--ckpt_path={checkpoint}",
        ],
        capsys,
    )
    assert code == 2
    assert "network.width (checkpoint 8, config 32)" in err and "size mismatch" not in err


def test_the_same_settings_still_resume(width8_run: Path, capsys) -> None:
    code, err = run(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--model.init_args.network.width=8",
            *TINY,
            "--trainer.max_epochs=2",
            "--ckpt_path",
            "last",
        ],
        capsys,
    )
    assert code == 0, err
    assert not (width8_run / "version_1").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.init_args.optimizer=sgd", "optimizer (checkpoint 'adam', config 'sgd')"),
        ("--model.init_args.weight_decay=0.5", "weight_decay (checkpoint 0.0, config 0.5)"),
        ("--model.init_args.lr_scheduler=none", "lr_scheduler (checkpoint 'cosine', config 'none')"),
    ],
)
def test_a_resumed_fit_refuses_other_training_settings_instead_of_dropping_them(
    override: str, named: str, width8_run: Path, capsys
) -> None:
    # Lightning rebuilds the model from the checkpoint's arguments: these overrides were dropped in silence
    before = snapshot(width8_run)
    args = ["fit", "--config", str(QUICKSTART), "--model.init_args.network.width=8", *TINY, "--trainer.max_epochs=2"]
    code, err = run([*args, override, "--ckpt_path", "last"], capsys)
    assert code == 2
    assert named in err and "drop the overrides" in err, err
    assert snapshot(width8_run) == before
    code, err = run([*args, "--model.init_args.lr=0.001", "--ckpt_path", "last"], capsys)  # a new lr is applied
    assert code == 0, err


def test_evaluations_keep_the_training_config_and_warn_without_a_checkpoint(width8_run: Path, capsys) -> None:
    trained = (width8_run / "version_0" / "config.yaml").read_text()
    args = ["--config", str(QUICKSTART), "--model.init_args.network.width=8", *TINY]
    assert run(["test", *args, "--ckpt_path", "last"], capsys)[0] == 0
    assert (width8_run / "version_0" / "config.yaml").read_text() == trained  # was overwritten with test's
    assert (width8_run / "version_0" / "config_test.yaml").is_file()
    with pytest.warns(UserWarning, match="pdenets test without --ckpt_path: the model is built from the config"):
        assert run(["test", *args], capsys)[0] == 0


@pytest.mark.parametrize("value", ["best", "hpc", "registry"])
def test_lightnings_in_process_checkpoint_names_are_a_short_error(value: str, width8_run: Path, capsys) -> None:
    code, err = run(["test", "--config", str(QUICKSTART), *TINY, "--ckpt_path", value], capsys)
    assert code == 2
    assert err.startswith(f"error: --ckpt_path {value}: a fresh pdenets run has no '{value}' checkpoint"), err
    assert len(err.strip().splitlines()) == 1


def test_the_model_class_named_by_its_defining_module_is_the_same_class(width8_run: Path, capsys) -> None:
    checkpoint = width8_run / "version_0" / "checkpoints" / "last.ckpt"
    code, err = run(
        [
            "test",
            "--config",
            str(QUICKSTART),
            "--model.class_path=lightning_pdenets.models.odenet.RKNetModule",
            "--model.init_args.network.width=8",
            *TINY,
            f"--ckpt_path={checkpoint}",
        ],
        capsys,
    )
    assert code == 0, err


@pytest.mark.parametrize("switch", ["--trainer.logger=false", "--trainer.enable_checkpointing=false"])
def test_switching_off_the_logger_or_checkpoints_leaves_out_the_default_callbacks_that_need_them(
    switch: str, tmp_path: Path, capsys
) -> None:
    # Lightning refused the default LearningRateMonitor / ModelCheckpoint: an error naming callbacks the user never gave
    assert run(["fit", "--config", str(QUICKSTART), *TINY, switch], capsys)[0] == 0


def test_lightnings_top_level_optimizer_options_are_not_offered(capsys) -> None:
    # they replaced the model's optimizer while its checkpoint still named the model's own; a resume then failed
    code, err = run(["fit", "--config", str(QUICKSTART), *TINY, "--optimizer=SGD"], capsys)
    assert code == 2 and "unrecognized arguments: --optimizer" in err


def test_a_checkpoint_saved_by_a_plain_trainer_is_tested_with_the_configs_class(tmp_path: Path, capsys) -> None:
    # it records no model class: Lightning merged its arguments into a bare LightningModule and failed, garbled
    import lightning.pytorch as pl

    from lightning_pdenets.cli import build_cli
    from lightning_pdenets.data import DigitsDataModule
    from lightning_pdenets.models import RKNetModule
    from tests.trainers import quiet_trainer

    pl.seed_everything(0)
    model = RKNetModule(network=dict(width=8, num_downsamples=1))
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    expected = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]["test/acc_top1"]
    tested = build_cli(
        [
            "test",
            "--config",
            str(QUICKSTART),
            "--model.init_args.network.width=8",
            "--trainer.enable_progress_bar=false",
            "--ckpt_path=plain.ckpt",
        ]
    )
    assert float(tested.trainer.callback_metrics["test/acc_top1"]) == pytest.approx(expected, abs=1e-6)


def test_a_resumed_fit_keeps_the_checkpoints_solver_and_names_the_configs_ignored_settings(
    width8_run: Path, capsys
) -> None:
    # the solver is not refused (a resumed run continues the checkpoint's, possibly adapted, solver), nor dropped
    # in silence; and the data facts (image_size as a pair in the config, one side in the file) never differ
    args = ["fit", "--config", str(QUICKSTART), "--model.init_args.network.width=8", *TINY, "--trainer.max_epochs=2"]
    with pytest.warns(UserWarning, match=r"the config's different solver\.\{step_size\} are not applied"):
        code, err = run([*args, "--model.init_args.solver.step_size=0.5", "--ckpt_path", "last"], capsys)
    assert code == 0, err
