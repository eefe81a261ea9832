"""Optuna sweep over the quickstart's learning rate and RK4 step size, with pruning of unpromising trials.

Each trial builds the ``pdenets`` command's objects (LightningCLI with the config, its defaults and the data
facts linked) for ``configs/quickstart.yaml`` with the suggested ``model.init_args.lr`` (log-uniform) and
``model.init_args.solver.step_size`` (1, 1/2, 1/4 or 1/8 of the interval: 1 to 8 RK4 steps, 4 to 32 function
evaluations per forward pass), trains it, and returns its best validation accuracy. Optuna's Lightning
integration (``optuna_integration.PyTorchLightningPruningCallback``) reports ``val/acc_top1`` after every
validation epoch and prunes a trial the median pruner finds behind. Needs the ``sweep`` extra::

    pip install -e ".[sweep]"
    python examples/sweep_optuna.py --trials 20                       # ~30 s per full trial on 2 CPU cores
    python examples/sweep_optuna.py --trials 20 --storage sqlite:///sweep.db --study quickstart   # resumable
    python examples/sweep_optuna.py --trials 4 -- --trainer.max_epochs=3   # anything after -- goes to pdenets

optuna-integration 5.0 with Lightning 2.6: the callback imports ``lightning.pytorch`` and works unchanged on one
process. It stops a pruned trial by raising ``optuna.TrialPruned`` inside Lightning's ``on_validation_end``, which
Lightning treats as a crash; the trials therefore run without the CLI's ``CheckpointOnInterrupt`` (a pruned
trial is not meant to be resumed, and its ``interrupted.ckpt`` would be what ``--ckpt_path last`` picks), and
each trial logs into a folder of its own, ``<log-dir>/<study folder>/trial_<number>``, outside ``logs/quickstart``.
A new study takes a study folder no earlier study has, ``<study>``, else ``<study>-2``, ``<study>-3``, ... (an
in-memory study numbers its trials from 0 on every run); a study continued from ``--storage`` keeps the folder it
started in, recorded in the study as the user attribute ``log_folder``. Under DDP the integration needs an RDB
storage (``--storage sqlite:///...``) and ``check_pruned()`` after fit (not done here).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna_integration import PyTorchLightningPruningCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets.callbacks import CheckpointOnInterrupt  # noqa: E402
from lightning_pdenets.cli import build_cli  # noqa: E402

MONITOR = "val/acc_top1"
STEP_SIZES = (1.0, 0.5, 0.25, 0.125)
"""RK4 step sizes over t in [0, 1]: 1, 2, 4 or 8 steps."""
LR_RANGE = (3e-4, 3e-2)
"""Log-uniform range of the learning rate (the quickstart's 0.003 in the middle)."""


def objective(trial: optuna.Trial, config: str, log_dir: str, study_folder: str, extra: Sequence[str]) -> float:
    """Train one trial of ``config`` with the suggested settings, logging into
    ``log_dir/study_folder/trial_<number>``; its best validation accuracy."""
    lr = trial.suggest_float("lr", *LR_RANGE, log=True)
    step_size = trial.suggest_categorical("step_size", STEP_SIZES)
    cli = build_cli(
        [
            "--config",
            config,
            f"--model.init_args.lr={lr}",
            f"--model.init_args.solver.step_size={step_size}",
            f"--trainer.logger.init_args.save_dir={log_dir}",
            f"--trainer.logger.init_args.name={study_folder}",
            f"--trainer.logger.init_args.version=trial_{trial.number}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ],
        run=False,
    )
    trainer = cli.trainer
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, CheckpointOnInterrupt)]
    trainer.callbacks.append(PyTorchLightningPruningCallback(trial, monitor=MONITOR))
    trainer.fit(cli.model, datamodule=cli.datamodule)  # a pruned trial raises optuna.TrialPruned here
    best = next(c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == MONITOR)
    nfe = trainer.callback_metrics.get("val/nfe_forward")
    if nfe is not None:
        trial.set_user_attr("val_nfe_forward", float(nfe))
    trial.set_user_attr("best_checkpoint", best.best_model_path)
    return float(best.best_model_score)


def study_folder(study: optuna.Study, log_dir: str) -> str:
    """The folder under ``log_dir`` of ``study``'s trials: the one it recorded, or, for a new study, the first of
    ``<name>``, ``<name>-2``, ... that does not exist yet (created here, so that two sweeps never share one)."""
    recorded = study.user_attrs.get("log_folder")
    if recorded is not None:
        return str(recorded)
    if study.trials:  # started by a release of this script that logged into <study> alone
        folder = study.study_name
    else:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        for number in itertools.count(1):
            folder = study.study_name if number == 1 else f"{study.study_name}-{number}"
            try:
                (Path(log_dir) / folder).mkdir()
                break
            except FileExistsError:
                continue
    study.set_user_attr("log_folder", folder)
    return folder


def run_study(
    trials: int,
    config: str = str(REPO / "configs" / "quickstart.yaml"),
    storage: str | None = None,
    study_name: str = "quickstart_sweep",
    log_dir: str = "sweeps",
    seed: int = 0,
    extra: Sequence[str] = (),
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create (or, with ``storage``, continue) the study and run ``trials`` trials.

    Args:
        trials: Number of trials to run.
        config: The ``pdenets`` config each trial trains.
        storage: Optuna storage URL (e.g. ``sqlite:///sweep.db``); None keeps the study in memory.
        study_name: Name of the study, and of its log folder under ``log_dir`` (see :func:`study_folder`).
        log_dir: Folder of the trials' logs and checkpoints.
        seed: Seed of the TPE sampler.
        extra: More ``pdenets`` arguments for every trial (e.g. ``--trainer.max_epochs=3``).
        pruner: Optuna pruner; default a median pruner after two complete trials and one epoch.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"`trials` must be an integer >= 1, got {trials!r}.")
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=storage is not None,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    folder = study_folder(study, log_dir)
    study.optimize(lambda trial: objective(trial, config, log_dir, folder, extra), n_trials=trials)
    return study


def main(argv: Sequence[str] | None = None) -> optuna.Study:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///sweep.db (default: in memory)")
    parser.add_argument("--study", default="quickstart_sweep", help="study name and log folder name")
    parser.add_argument("--log-dir", default="sweeps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    study = run_study(args.trials, args.config, args.storage, args.study, args.log_dir, args.seed, extra)
    states = [t.state.name for t in study.trials]
    print(f"{len(study.trials)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned")
    print(
        f"best: val/acc_top1 {study.best_value:.4f} with {study.best_params} "
        f"(trial {study.best_trial.number}, {study.best_trial.user_attrs.get('best_checkpoint')})"
    )
    return study


if __name__ == "__main__":
    main()
