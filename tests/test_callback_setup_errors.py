"""Issue 28: a callback that does not suit the model, the data or the run (found in its ``setup``) ends in one short
message with exit code 2 and leaves no version folder, not a traceback with exit code 1 - on every DDP rank alike."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lightning_pdenets.callbacks import MultilevelTraining
from lightning_pdenets.errors import ConfigurationError
from tests.conftest import REPO_ROOT
from tests.test_hostile_resume import TINY, run

QUICKSTART = ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width=8", *TINY]
SPHERES = ["--config", str(REPO_ROOT / "configs/spheres/odenet_euler.yaml"), *TINY]
PARABOLIC_DIGITS = """\
seed_everything: 0
model:
  class_path: lightning_pdenets.models.ParabolicCNNModule
  init_args:
    network: {widths: [4, 8], num_steps: 2}
data:
  class_path: lightning_pdenets.data.DigitsDataModule
  init_args: {batch_size: 16}
trainer: {max_epochs: 1, accelerator: cpu, devices: 1}
"""


def add(callback: str, **init_args: str) -> list[str]:
    """Command-line arguments appending ``callback`` with ``init_args`` to the trainer's callbacks."""
    return [
        f"--trainer.callbacks+=lightning_pdenets.callbacks.{callback}",
        *(f"--trainer.callbacks.init_args.{key}={value}" for key, value in init_args.items()),
    ]


def assert_short_config_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not list(Path("logs").glob("**/version_*")), list(Path("logs").rglob("*"))


@pytest.mark.cli
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            add("WeightBoxProjection"),
            ["WeightBoxProjection found no TimeDependentWeights module in RKNetModule", "`parameter_names`"],
        ),
        (add("WeightBoxProjection", parameter_names="[nothing*]"), ["no parameter matching ['nothing*']"]),
        (add("TimeTVRegularization"), ["TimeTVRegularization found no module following the TimeDependentWeights"]),
        (
            add("MultilevelTraining", refine_epochs="[1]", block_names="[nowhere]"),
            ["MultilevelTraining found no TimeSteppingBlock matching `block_names`=['nowhere']"],
        ),
        (
            add("ToleranceAdaptation"),
            ["ToleranceAdaptation adapts adaptive solvers: `train_solver` must be one of", "got 'rk4'"],
        ),
        (
            add("AdversarialEvaluation", epsilons="[0.1]", mean="[0.5,0.5,0.5]", std="[0.2,0.2,0.2]"),
            ["AdversarialEvaluation: `mean`/`std` give 3 channels but DigitsDataModule has 1"],
        ),
        (
            add("OODEvaluation", mean="[0.5,0.5,0.5]", std="[0.2,0.2,0.2]"),
            ["OODEvaluation: `mean`/`std` give 3 channels but DigitsDataModule has 1"],
        ),
    ],
)
def test_a_callback_that_does_not_suit_the_quickstart_is_refused_before_the_run(args, fragments, tmp_path, capsys):
    code, err = run(["fit", *QUICKSTART, *args], capsys)
    assert_short_config_error(code, err, *fragments)


@pytest.mark.cli
def test_solver_swap_check_on_a_model_without_ode_blocks_is_refused_before_the_first_epoch(tmp_path, capsys):
    code, err = run(
        [
            "fit",
            *QUICKSTART,
            "--model=lightning_pdenets.models.ResNetModule",
            "--model.init_args.network.width=8",
            "--model.init_args.network.num_downsamples=1",
            *add("SolverSwapCheck"),
        ],
        capsys,
    )
    assert_short_config_error(code, err, "SolverSwapCheck found no ODE block in ResNetModule")


@pytest.mark.cli
def test_autoattack_on_two_classes_is_refused_before_the_run(tmp_path, capsys):
    pytest.importorskip("torchattacks")
    code, err = run(["fit", *SPHERES, *add("AdversarialEvaluation", epsilons="[0.1]", attacks="[autoattack]")], capsys)
    assert_short_config_error(code, err, "need at least 3 classes", "ConcentricSpheresDataModule has 2 classes")


def test_multilevel_refining_weights_under_ddp_is_a_configuration_error() -> None:
    from lightning_pdenets.models import ParabolicCNNModule

    class TwoRanks:
        world_size = 2

    model = ParabolicCNNModule(network={"widths": [4, 8], "num_steps": 2}, num_classes=10, in_channels=1)
    callback = MultilevelTraining(refine_epochs=[1])
    with pytest.raises(ConfigurationError, match="DDP cannot follow; set `refine_weights: false`"):
        callback.setup(TwoRanks(), model, "fit")


@pytest.mark.ddp
def test_multilevel_under_ddp_ends_every_rank_with_one_short_error(tmp_path: Path) -> None:
    """Both gloo ranks decide alike in setup: neither waits for the other, the job exits 2 in one line."""
    from tests.test_ddp_cli import DDP_CPU, pdenets

    config = tmp_path / "parabolic_digits.yaml"
    config.write_text(PARABOLIC_DIGITS)
    result: subprocess.CompletedProcess = pdenets(
        ["fit", "--config", str(config), "--config", DDP_CPU, *TINY, *add("MultilevelTraining", refine_epochs="[1]")],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("DDP cannot follow" in line for line in errors), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "logs").glob("**/version_*"))
