"""examples/sweep_optuna.py at tiny size: Optuna 5 sweeps the quickstart's learning rate and RK4 step size through the
pdenets CLI, and its Lightning pruning callback prunes trials."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

optuna = pytest.importorskip("optuna")
pytest.importorskip("optuna_integration")

TINY = [
    "--model.init_args.network.width=8",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_optuna", REPO_ROOT / "examples" / "sweep_optuna.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_runs_trials_over_lr_and_step_size(sweep, tmp_path: Path, capsys) -> None:
    study = sweep.main(["--trials", "3", "--storage", f"sqlite:///{tmp_path / 'sweep.db'}", "--", *TINY])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # two startup trials, no pruning
    for trial in study.trials:
        assert sweep.LR_RANGE[0] <= trial.params["lr"] <= sweep.LR_RANGE[1]
        assert trial.params["step_size"] in sweep.STEP_SIZES
        assert 0.0 <= trial.value <= 1.0
        assert trial.user_attrs["val_nfe_forward"] == 4 * round(1 / trial.params["step_size"])  # RK4: 4 stages a step
        assert sorted(trial.intermediate_values) == [0, 1]
        checkpoint = Path(trial.user_attrs["best_checkpoint"])
        assert checkpoint.is_file() and checkpoint.parts[:3] == ("sweeps", "quickstart_sweep", f"trial_{trial.number}")
    assert len({(t.params["lr"], t.params["step_size"]) for t in study.trials}) == 3
    assert "3 trials: 3 complete, 0 pruned" in capsys.readouterr().out

    resumed = sweep.main(["--trials", "1", "--storage", f"sqlite:///{tmp_path / 'sweep.db'}", "--", *TINY])
    assert len(resumed.trials) == 4  # the stored study continues, in its folder
    assert Path(resumed.trials[-1].user_attrs["best_checkpoint"]).parts[:3] == ("sweeps", "quickstart_sweep", "trial_3")


def test_each_new_study_logs_into_a_folder_of_its_own(sweep, monkeypatch: pytest.MonkeyPatch, recwarn) -> None:
    # an in-memory study numbers its trials from 0 on every run: the second run's trial_0 wrote into the first's
    # folder (interleaved event files, a stale hparams.yaml, best-...-v1.ckpt)
    monkeypatch.setattr("sys.argv", ["sweep_optuna.py", "--trials", "1", "--", *TINY])
    first = sweep.main(["--trials", "1", "--", *TINY])
    second = sweep.main(["--trials", "1", "--", *TINY])
    paths = [Path(study.trials[0].user_attrs["best_checkpoint"]) for study in (first, second)]
    assert [path.parts[:3] for path in paths] == [
        ("sweeps", "quickstart_sweep", "trial_0"),
        ("sweeps", "quickstart_sweep-2", "trial_0"),
    ]
    assert [len(list(path.parent.parent.glob("events.out.tfevents.*"))) for path in paths] == [1, 1]
    assert not list(Path("sweeps").glob("**/*-v1.ckpt"))
    # build_cli's arguments are the trial's own, not the script's in sys.argv: Lightning's warning said otherwise
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_the_pruning_callback_stops_a_trial_without_an_interrupt_checkpoint(sweep) -> None:
    pruner = optuna.pruners.ThresholdPruner(lower=1.01)  # below 101 % accuracy: pruned at the first report
    study = sweep.run_study(1, extra=TINY, pruner=pruner, study_name="pruned")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    trial_dir = Path("sweeps/pruned/trial_0")
    assert trial_dir.is_dir() and not list(trial_dir.glob("**/interrupted.ckpt"))


def test_the_number_of_trials_is_checked(sweep) -> None:
    with pytest.raises(ValueError, match=r"`trials` must be an integer >= 1, got 0"):
        sweep.run_study(0)
