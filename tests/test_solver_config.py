"""One solver configuration through every layer: YAML, command line, model, architecture, block, checkpoint."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_pdenets.blocks import ODEBlock
from lightning_pdenets.cli import build_cli
from lightning_pdenets.errors import ConfigurationError, SolverFailedError
from lightning_pdenets.migration import VERSION_KEY, LegacyCheckpointError, check_layout, upgrade_checkpoint
from lightning_pdenets.models import ODENetModule, RKNetModule
from lightning_pdenets.solvers import SolverConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

NON_DEFAULT = {
    "method": "bosh3",
    "step_size": 0.125,
    "rtol": 2e-3,
    "atol": 3e-3,
    "t0": 0.5,
    "t1": 1.5,
    "max_num_steps": 77,
    "min_step": 1e-4,
    "max_step": 0.3,
    "first_step": 0.01,
    "safety": 0.8,
    "ifactor": 5.0,
    "dfactor": 0.3,
    "adjoint": True,
    "adjoint_method": "dopri5",
    "adjoint_rtol": 1e-4,
    "adjoint_atol": 2e-4,
    "adjoint_options": {"norm": "seminorm"},
    "failure_retries": 3,
    "failure_tol_factor": 4.0,
    "failure_max_tol": 0.5,
    "kinetic_weight": 0.01,
    "jacobian_weight": 0.02,
    "hutchinson_noise": "rademacher",
    "backend": "torchdiffeq",
}
"""A valid value different from the default for every field (the first test keeps this list complete)."""


def test_every_field_has_a_non_default_test_value() -> None:
    defaults = SolverConfig()
    assert set(NON_DEFAULT) == set(SolverConfig.field_names())
    for name, value in NON_DEFAULT.items():
        assert getattr(defaults, name) != value, name
    SolverConfig.from_options(NON_DEFAULT)  # valid as a whole


def _block_settings(cli) -> dict:
    return cli.model.network.feature.solver_settings()


def test_every_field_is_reachable_from_the_command_line() -> None:
    args = ["--config", str(REPO_ROOT / "configs/quickstart.yaml")]
    for name, value in NON_DEFAULT.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        args += [f"--model.init_args.solver.{name}", text]
    settings = _block_settings(build_cli(args, run=False))
    assert {name: settings[name] for name in NON_DEFAULT} == NON_DEFAULT


def test_every_field_is_reachable_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "solver.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"solver": NON_DEFAULT}}}))
    cli = build_cli(["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--config", str(config)], run=False)
    settings = _block_settings(cli)
    assert {name: settings[name] for name in NON_DEFAULT} == NON_DEFAULT


def test_command_line_merges_into_the_config_solver() -> None:
    cli = build_cli(
        ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.solver.min_step", "0.01"], run=False
    )
    settings = _block_settings(cli)
    assert (settings["method"], settings["step_size"], settings["min_step"]) == ("rk4", 0.25, 0.01)


def test_model_defaults_merge_under_a_partial_solver() -> None:
    odenet = ODENetModule(network=dict(width=8, num_downsamples=1), solver={"rtol": 1e-4})
    settings = odenet.network.feature.solver_settings()
    assert (settings["method"], settings["adjoint"], settings["rtol"]) == ("dopri5", True, 1e-4)
    assert odenet.hparams.solver == settings  # the complete resolved configuration is a hyperparameter
    rknet = RKNetModule(network=dict(width=8, num_downsamples=1))
    assert rknet.network.feature.solver_settings()["method"] == "rk4"


def test_unknown_setting_suggests_the_closest_names() -> None:
    with pytest.raises(ValueError, match=r"'stepsize' \(did you mean 'step_size'\?\).*valid names are"):
        ODENetModule(network=dict(width=8, num_downsamples=1), solver={"stepsize": 0.1})
    with pytest.raises(TypeError, match="`solver` must be a mapping of solver settings"):
        SolverConfig.from_options("rk4")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("step_size", "-0.1", "`solver.step_size` must be a finite number > 0, got -0.1"),
        ("t1", ".inf", "`solver.t1` must be a finite number, got inf."),  # was "cannot convert float infinity"
    ],
)
def test_bad_solver_on_the_command_line_names_the_field(field: str, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        build_cli(
            ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), f"--model.init_args.solver.{field}", value],
            run=False,
        )
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_data_facts_come_from_the_datamodule_and_contradictions_stop(tmp_path: Path) -> None:
    cli = build_cli(
        ["--config", str(REPO_ROOT / "configs/spheres/odenet_euler.yaml"), "--data.init_args.dim", "3"], run=False
    )
    assert (cli.model.hparams.input_dim, cli.model.hparams.num_classes) == (3, 2)  # linked, not in the config
    with pytest.raises(
        ConfigurationError,
        match=r"`model.init_args.num_classes` is 7, but DigitsDataModule gives 10: "
        r"it is taken from the datamodule",
    ):
        build_cli(
            ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.num_classes", "7"], run=False
        )
    with pytest.raises(
        ConfigurationError,
        match=r"`model.init_args.image_size` is 28, but DigitsDataModule gives \(8, 8\): "
        r"it is taken from the datamodule",
    ):  # linked like num_classes
        build_cli(
            ["--config", str(REPO_ROOT / "configs/digits/prnet.yaml"), "--model.init_args.image_size", "28"], run=False
        )


class Decay(nn.Module):
    """dy/dt = a·y with a learnable rate: y(1) = y0·e^a."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(-0.8, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rate * y


def test_seminorm_adjoint_gives_the_closed_form_gradient_with_no_more_backward_steps() -> None:
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    expected = math.exp(-0.8) * float(y0.sum())  # d/da sum(y0 e^a) at a = -0.8
    counts = {}
    for name, options in (("default", None), ("seminorm", {"norm": "seminorm"})):
        block = ODEBlock(Decay(), method="dopri5", rtol=1e-7, atol=1e-9, adjoint=True, adjoint_options=options)
        block(y0).sum().backward()
        assert block.field.rate.grad.item() == pytest.approx(expected, rel=1e-5)
        counts[name] = block.nfe_backward
    assert counts["seminorm"] <= counts["default"]


def test_adjoint_method_and_tolerances_reach_torchdiffeq() -> None:
    config = SolverConfig(
        method="dopri5", adjoint=True, adjoint_method="rk4", adjoint_options={"step_size": 0.1}, adjoint_rtol=1e-5
    )
    kwargs = config.odeint_kwargs()
    assert kwargs["adjoint_method"] == "rk4" and kwargs["adjoint_options"] == {"step_size": 0.1}
    assert (kwargs["adjoint_rtol"], kwargs["adjoint_atol"]) == (1e-5, config.atol)
    block = ODEBlock(Decay(), config)
    block(torch.ones(1, dtype=torch.float64)).sum().backward()
    assert block.nfe_backward == 40  # rk4, 10 steps of 4 stages backwards: the fixed-step adjoint ran


class Oscillation(nn.Module):
    """dy/dt = 30 cos(30 t): dopri5 needs ~300 steps at rtol 1e-10 and ~15 at 1e-2."""

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 30 * torch.cos(30 * t) * torch.ones_like(y)


def test_failure_retries_loosen_the_tolerance_and_keep_it() -> None:
    strict = dict(method="dopri5", rtol=1e-10, atol=1e-10, max_num_steps=30)
    with pytest.raises(SolverFailedError):
        ODEBlock(Oscillation(), **strict)(torch.zeros(1, dtype=torch.float64))
    block = ODEBlock(Oscillation(), **strict, failure_retries=20, failure_tol_factor=10.0)
    y1 = block(torch.zeros(1, dtype=torch.float64))
    assert y1.item() == pytest.approx(math.sin(30.0), abs=1e-2)  # the closed form y(1) = sin(30)
    loosened = block.solver_settings()["rtol"]
    steps = math.log10(loosened / 1e-10)
    assert 1 <= round(steps) <= 10 and steps == pytest.approx(round(steps))  # a whole number of x10 retries
    fresh = ODEBlock(Oscillation(), **strict)
    fresh.load_state_dict(block.state_dict())
    assert fresh.solver_settings()["rtol"] == loosened  # the loosened tolerance is kept, checkpoints included
    capped = ODEBlock(Oscillation(), **strict, failure_retries=20, failure_tol_factor=10.0, failure_max_tol=1e-9)
    with pytest.raises(SolverFailedError):
        capped(torch.zeros(1, dtype=torch.float64))


def test_checkpoint_of_the_previous_layout_fails_with_the_release_and_the_upgrade_command(tmp_path: Path) -> None:
    model = RKNetModule(network=dict(width=8, num_downsamples=1), solver={"step_size": 0.5})
    flat = {k: v for k, v in model.hparams.items() if k not in ("solver", "network")}
    flat.update(model.hparams.network)  # 0.1.x also stored the architecture's arguments flat
    flat.update(method="rk4", step_size=0.5, rtol=1e-3, atol=1e-3, adjoint=False, t0=0.0, t1=1.0, max_num_steps=1000)
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": flat, "pytorch-lightning_version": "2.6.0"}, old)

    with pytest.raises(
        LegacyCheckpointError, match=r"written by lightning_pdenets 0\.1\.x.*python -m lightning_pdenets\.migration"
    ) as error:
        RKNetModule.load_from_checkpoint(old)
    assert "flat solver arguments" in str(error.value) and "flat architecture arguments" in str(error.value)
    with pytest.raises(LegacyCheckpointError):
        build_cli(["test", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--ckpt_path", str(old)])

    new = tmp_path / "new.ckpt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_pdenets.migration",
            str(old),
            str(new),
            "--model",
            "lightning_pdenets.models.RKNetModule",
        ],  # saved without the CLI: no class path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    upgraded = torch.load(new, weights_only=True)
    assert upgraded[VERSION_KEY] and upgraded["hyper_parameters"]["solver"]["step_size"] == 0.5
    assert upgraded["hyper_parameters"]["network"] == model.hparams.network
    check_layout(upgraded, new)
    restored = RKNetModule.load_from_checkpoint(new)
    assert restored.network.feature.solver_settings()["step_size"] == 0.5
    assert upgrade_checkpoint(upgraded)["hyper_parameters"] == upgraded["hyper_parameters"]  # idempotent


def test_description_names_the_step_bounds_that_change_an_adaptive_solve() -> None:
    """A test-time `first_step` must be visible in "trained with ...; evaluated with ...", not only in `changed`."""
    assert SolverConfig().describe() == "dopri5, rtol=0.001, atol=0.001"
    assert (
        SolverConfig(first_step=1.0, max_step=0.5).describe()
        == "dopri5, rtol=0.001, atol=0.001, first_step=1, max_step=0.5"
    )
    assert SolverConfig(method="rk4", step_size=0.25).describe() == "rk4, step_size=0.25"


def test_solver_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SolverConfig().rtol = 1.0  # type: ignore[misc]


def _fit_tiny(tmp_path: Path, *extra: str) -> Path:
    args = [
        "fit",
        "--config",
        str(REPO_ROOT / "configs/quickstart.yaml"),
        "--model.init_args.network.width=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *extra,
    ]
    build_cli(args)
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    return checkpoint


def test_test_time_solver_from_the_command_line_applies_after_loading(tmp_path: Path, caplog) -> None:
    checkpoint = _fit_tiny(tmp_path)
    caplog.set_level("INFO")
    cli = build_cli(
        [
            "test",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--model.init_args.network.width=8",
            "--ckpt_path",
            str(checkpoint),
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.solver.method=euler",
            "--model.init_args.solver.step_size=0.1",
        ]
    )
    settings = cli.model.network.feature.solver_settings()
    assert (settings["method"], settings["step_size"]) == ("euler", 0.1)
    assert cli.trainer.callback_metrics["test/nfe_forward"].item() == 10.0  # Euler, 10 steps: evaluated as asked
    assert "trained with rk4, step_size=0.25; evaluated with euler, step_size=0.1" in caplog.text


def test_resumed_fit_continues_with_the_adapted_solver_and_says_so(tmp_path: Path, caplog) -> None:
    checkpoint = _fit_tiny(tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("_extra_state"))
    state["state_dict"][key]["solver_settings"]["step_size"] = 0.125  # as a step-size adaptation would leave it
    adapted = tmp_path / "adapted.ckpt"
    torch.save(state, adapted)
    caplog.set_level("INFO")
    cli = build_cli(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--model.init_args.network.width=8",
            "--ckpt_path",
            str(adapted),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert cli.model.network.feature.solver_settings()["step_size"] == 0.125
    assert "resuming with the checkpoint's rk4, step_size=0.125" in caplog.text
