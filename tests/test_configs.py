"""Every YAML in configs/ and callbacks/ through the real CLI: parse, instantiate, and fast_dev_run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_pdenets.cli import build_cli
from tests.conftest import REPO_ROOT
from tests.fakedata import load_all

pytestmark = pytest.mark.cli

FAKE_DATASETS = load_all()
RUN_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if p.parent.name != "trainer")
TRAINER_PRESETS = sorted((REPO_ROOT / "configs" / "trainer").glob("*.yaml"))
CALLBACK_PRESETS = sorted((REPO_ROOT / "callbacks").glob("*.yaml"))
CPU = str(REPO_ROOT / "configs" / "trainer" / "cpu.yaml")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def fake_data_args(config: Path, root: Path) -> list[str]:
    """CLI overrides pointing the config's datamodule at fabricated files in ``root``."""
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    if data_class not in FAKE_DATASETS:
        raise AssertionError(f"no fabricator in tests/fakedata for {data_class} (used by {rel(config)})")
    overrides = FAKE_DATASETS[data_class](root / "data")
    return [f"--data.{key}={value}" for key, value in overrides.items()]


def test_every_config_is_found() -> None:
    assert {"quickstart.yaml", "resnet.yaml", "rknet.yaml", "odenet.yaml"} <= {p.name for p in RUN_CONFIGS}
    assert {"cpu.yaml", "gpu.yaml", "ddp.yaml", "ddp_cpu.yaml", "multinode.yaml"} <= {p.name for p in TRAINER_PRESETS}


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=rel)
def test_config_runs_fast_dev_run_through_the_cli(config: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(config),
        "--config",
        CPU,
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        *fake_data_args(config, tmp_path),
    ]
    cli = build_cli(args)
    assert cli.trainer.state.finished, f"{rel(config)} did not finish"
    assert any(key.startswith("train/loss") for key in cli.trainer.callback_metrics)


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=rel)
def test_trainer_presets_validate_against_the_trainer_signature(preset: Path) -> None:
    """GPU presets cannot instantiate here, so each is type-checked against ``Trainer.__init__``."""
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    config = parser.parse_path(str(preset))
    expected = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in expected.items():
        parsed = config.trainer[key]
        if isinstance(value, dict):  # a class: its path, and the given init_args over the class's defaults
            assert parsed.class_path == value["class_path"]
            assert {name: str(parsed.init_args[name]) for name in value["init_args"]} == {
                name: str(given) for name, given in value["init_args"].items()
            }
        else:
            assert parsed == value, key


@pytest.mark.parametrize("name", ["ddp.yaml", "ddp_cpu.yaml", "multinode.yaml"])
def test_ddp_presets_bound_the_wait_in_a_collective(name: str) -> None:
    """A collective one rank never joins fails after the preset's timeout instead of hanging (issue 26)."""
    strategy = yaml.safe_load((REPO_ROOT / "configs" / "trainer" / name).read_text())["trainer"]["strategy"]
    hours, minutes, seconds = (int(part) for part in strategy["init_args"]["timeout"].split(":"))
    assert 0 < hours * 3600 + minutes * 60 + seconds <= 30 * 60


def test_cpu_ddp_preset_sets_the_collective_timeout() -> None:
    cli = build_cli(
        [
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--config",
            str(REPO_ROOT / "configs/trainer/ddp_cpu.yaml"),
        ],
        run=False,
    )
    assert cli.trainer.strategy._timeout.total_seconds() == 180


def test_cpu_ddp_preset_instantiates() -> None:
    cli = build_cli(
        [
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--config",
            str(REPO_ROOT / "configs/trainer/ddp_cpu.yaml"),
        ],
        run=False,
    )
    assert cli.trainer.num_devices == 2 and type(cli.trainer.strategy).__name__ == "DDPStrategy"


PRESET_EXTRAS = {"autoattack.yaml": "torchattacks"}
"""Presets whose callback needs an optional extra (README, "Set up"): skipped where it is not installed."""


def _skip_without_extra(preset: Path) -> None:
    if preset.name in PRESET_EXTRAS:
        pytest.importorskip(PRESET_EXTRAS[preset.name])


@pytest.mark.parametrize("preset", CALLBACK_PRESETS, ids=rel)
def test_callback_preset_appends_to_the_default_callbacks(preset: Path) -> None:
    """``trainer.callbacks+`` must append: the default ModelCheckpoint survives next to the preset's callbacks."""
    _skip_without_extra(preset)
    entries = yaml.safe_load(preset.read_text())["trainer"]["callbacks+"]
    cli = build_cli(["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--config", str(preset)], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "ModelCheckpoint" in names and "LearningRateMonitor" in names
    for entry in entries:
        assert entry["class_path"].rsplit(".", 1)[-1] in names


def test_two_callback_presets_compose() -> None:
    presets = [preset for preset in CALLBACK_PRESETS if preset.name not in PRESET_EXTRAS][:2]
    args = ["--config", str(REPO_ROOT / "configs/quickstart.yaml")]
    for preset in presets:
        args += ["--config", str(preset)]
    cli = build_cli(args, run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for preset in presets:
        for entry in yaml.safe_load(preset.read_text())["trainer"]["callbacks+"]:
            assert entry["class_path"].rsplit(".", 1)[-1] in names


def test_command_line_override_wins_over_config() -> None:
    cli = build_cli(
        ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.lr=0.5", "--trainer.max_epochs=2"],
        run=False,
    )
    assert cli.model.optimization["lr"] == 0.5 and cli.trainer.max_epochs == 2


@pytest.mark.parametrize("command", [["pdenets"], [sys.executable, "-m", "lightning_pdenets"]])
def test_entry_points_expose_the_subcommands(command: list[str]) -> None:
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_print_config_round_trips(tmp_path: Path) -> None:
    result = subprocess.run(
        ["pdenets", "fit", "--config", str(REPO_ROOT / "configs/mnist/odenet.yaml"), "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["init_args"]["solver"]["method"] == "dopri5"
    assert printed["model"]["init_args"]["solver"]["adjoint"] is True


def test_unknown_solver_in_config_is_reported_with_valid_names(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        build_cli(
            ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.solver.method=rk45"], run=False
        )
    assert stop.value.code == 2
    assert re.search(
        r"error: RKNetModule: `solver.method` must be one of .*dopri5.*got 'rk45'\.$", capsys.readouterr().err
    )
