"""Solver-numerics callbacks of Ott et al. (ICLR 2021): step/tolerance adaptation, solver swap, NFE monitor."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdiffeq import odeint

from lightning_pdenets.blocks import ODEBlock
from lightning_pdenets.callbacks import NFEMonitor, SolverSwapCheck, StepSizeAdaptation, ToleranceAdaptation
from lightning_pdenets.callbacks.solver_adaptation import hairer_initial_step, step_for_test_solver
from lightning_pdenets.data import ConcentricSpheresDataModule
from lightning_pdenets.errors import SolverFailedError
from lightning_pdenets.models import VectorODEClassifierModule
from tests import trainers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def quiet_trainer(**kwargs) -> pl.Trainer:
    return trainers.quiet_trainer(**{"num_sanity_val_steps": 0, **kwargs})


def tiny_spheres(**kwargs) -> ConcentricSpheresDataModule:
    return ConcentricSpheresDataModule(**{"num_train": 64, "num_val": 32, "num_test": 32, "batch_size": 16, **kwargs})


# -- a network and LightningModule from "another project": only the ODESolverBlock protocol is shared ----------
class ForeignODE(nn.Module):
    """Minimal third-party ODE block implementing the protocol with torchdiffeq directly."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim))
        self.options = dict(method="euler", step_size=0.25, rtol=1e-3, atol=1e-3, t0=0.0, t1=1.0, max_num_steps=100)
        self.nfe_forward = 0
        self.nfe_backward = 0

    def vector_field(self, t, y):
        return self.f(y)

    def solver_settings(self):
        return dict(self.options)

    def configure_solver(self, **changes):
        self.options.update(changes)

    def reset_nfe(self):
        self.nfe_forward = self.nfe_backward = 0

    def forward(self, y0):
        def rhs(t, y):
            self.nfe_forward += 1
            return self.f(y)

        o = self.options
        adaptive = o["method"] == "dopri5"
        options = {"max_num_steps": o["max_num_steps"]} if adaptive else {"step_size": o["step_size"]}
        times = torch.tensor([o["t0"], o["t1"]])
        return odeint(rhs, y0, times, rtol=o["rtol"], atol=o["atol"], method=o["method"], options=options)[-1]


class ForeignClassifier(pl.LightningModule):
    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(2) if batch_norm else nn.Identity(), ForeignODE(), nn.Linear(2, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def foreign_loader(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x.norm(dim=1) > 1.0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


# -- algorithms against closed forms ----------------------------------------------------------------------------------
def test_hairer_initial_step_matches_hand_computation_for_linear_field():
    # f(y) = a·y with y0 = c everywhere: d0 = c, d1 = |a|c, h0 = 0.01/|a|, d2 = a²c (exactly, f is linear).
    a, c, order = 2.0, 3.0, 1
    y0 = torch.full((4, 3), c, dtype=torch.float64)
    d1, d2 = a * c, a * a * c
    expected = min(100 * 0.01 / a, (0.01 / max(d1, d2)) ** (1 / (order + 1)))
    assert hairer_initial_step(lambda t, y: a * y, 0.0, y0, order) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.sqrt(0.01 / 12))
    # RK4 (p = 4): h1 = (0.01/12)^(1/5) = 0.245 < 100·h0 = 0.5.
    assert hairer_initial_step(lambda t, y: a * y, 0.0, y0, 4) == pytest.approx((0.01 / 12) ** 0.2)


def test_hairer_initial_step_small_norm_branches():
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    # d0 = d1 = d2 = 0: h0 = 1e-6, h1 = max(1e-6, 1e-9) = 1e-6, min(100·h0, h1) = 1e-6.
    assert hairer_initial_step(lambda t, y: 0 * y, 0.0, zeros, 1) == pytest.approx(1e-6)
    # constant field f = b: d2 = 0, so h1 = (0.01/d1)^(1/2), h0 = 1e-6 (d0 = 0) → min(1e-4, h1) = 1e-4.
    assert hairer_initial_step(lambda t, y: y * 0 + 0.5, 0.0, zeros, 1) == pytest.approx(1e-4)


def test_test_step_size_makes_test_error_50_times_smaller():
    assert step_for_test_solver(0.5, 1, 2) == pytest.approx(math.sqrt(0.5 / 50))  # Euler → midpoint: sqrt(h/50)
    assert step_for_test_solver(0.5, 2, 4) == pytest.approx((0.25 / 50) ** 0.25)  # midpoint → RK4
    h_test = step_for_test_solver(0.3, 2, 4)
    assert h_test**4 == pytest.approx(0.3**2 / 50)
    assert step_for_test_solver(1e-4, 1, 1) == 1e-4 / 50
    assert step_for_test_solver(1e-4, 1, 2) == 1e-4  # sqrt(1e-4/50) = 1.4e-3 would exceed h: capped at h


# -- bad inputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: StepSizeAdaptation(train_solver="eulr"), r"`train_solver` must be one of .*got 'eulr'"),
        (lambda: StepSizeAdaptation(train_solver="euler", test_solver="rk5"), r"`test_solver` must be one of"),
        (
            lambda: StepSizeAdaptation(train_solver="midpoint", test_solver="euler"),
            r"less accurate than `train_solver`",
        ),
        (lambda: StepSizeAdaptation(train_solver="dopri5"), r"fixed-step solvers: `train_solver` must be one of"),
        (lambda: StepSizeAdaptation(threshold=0), r"`threshold` must be an accuracy difference in \(0, 1\], got 0"),
        (lambda: StepSizeAdaptation(threshold=1.5), r"`threshold` .*got 1.5"),
        (lambda: StepSizeAdaptation(threshold=-0.1), r"`threshold`"),
        (lambda: StepSizeAdaptation(interval=0), r"`interval` must be an integer >= 1, got 0"),
        (
            lambda: StepSizeAdaptation(initial_step_size="auto"),
            r"`initial_step_size` must be 'hairer' or a number > 0, got 'auto'",
        ),
        (lambda: ToleranceAdaptation(train_solver="rk4"), r"adaptive solvers: `train_solver` must be one of"),
        (lambda: ToleranceAdaptation(test_solver="rk4"), r"needs an adaptive `test_solver`"),
        (
            lambda: ToleranceAdaptation(train_solver="dopri5", test_solver="bosh3"),
            r"'bosh3' \(order 3\) is less accurate",
        ),
        (lambda: ToleranceAdaptation(threshold=2.0), r"`threshold`"),
        (lambda: ToleranceAdaptation(test_tol_factor=1.5), r"`test_tol_factor` must lie in"),
        (lambda: SolverSwapCheck(solvers=["euler", "rk45"]), r"`solvers` must be one of .*got 'rk45'"),
        (lambda: SolverSwapCheck(step_factors=[1.0, 0.0]), r"`step_factors` must be a finite number > 0, got 0.0"),
        (lambda: SolverSwapCheck(every_n_epochs=0), r"`every_n_epochs` must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_test_solver_checked_against_the_blocks_solver_when_train_solver_is_not_given():
    module = VectorODEClassifierModule(solver=dict(method="midpoint", step_size=0.25), network=dict(hidden_width=8))
    callback = StepSizeAdaptation(test_solver="euler")
    with pytest.raises(ValueError, match=r"'euler' \(order 1\) is less accurate than `train_solver` 'midpoint'"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(module, tiny_spheres())


def test_callbacks_explain_missing_ode_blocks():
    class Plain(ForeignClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"found no ODE block .*configure_solver"):
        quiet_trainer(max_steps=1, callbacks=[StepSizeAdaptation()]).fit(Plain(), foreign_loader())


# -- decision logic with scripted accuracies -----------------------------------------------------------------------
class ScriptedSteps(StepSizeAdaptation):
    """Accuracies come from a script, so each branch of the check is exercised deterministically."""

    def __init__(self, accuracies, **kwargs):
        super().__init__(train_solver="euler", **kwargs)
        self.accuracies = list(accuracies)
        self.calls = []

    def _accuracy(self, trainer, pl_module, blocks, batch, method, step_size=None, tol=None):
        self.calls.append((method, step_size))
        return self.accuracies.pop(0), 1.0, False


def ode_block():
    return VectorODEClassifierModule(
        solver=dict(method="euler", step_size=0.4), network=dict(hidden_width=4)
    ).network.ode


def test_step_check_halves_h_on_disagreement_and_uses_sqrt_h_over_50_for_midpoint():
    callback = ScriptedSteps([0.9, 0.5])
    callback.value = 0.4
    record = callback.check(None, None, [ode_block()], None)
    assert record["decision"] == "shrink" and record["step_size"] == pytest.approx(0.2)
    assert callback.calls == [("euler", 0.4), ("midpoint", pytest.approx(math.sqrt(0.4 / 50)))]


@pytest.mark.parametrize("trial, decision, new_step", [((0.9, 0.88), "grow", 0.44), ((0.9, 0.7), "keep", 0.4)])
def test_step_check_keeps_larger_step_only_if_solvers_still_agree(trial, decision, new_step):
    callback = ScriptedSteps([0.9, 0.85, *trial])
    callback.value = 0.4
    record = callback.check(None, None, [ode_block()], None)
    assert record["decision"] == decision and record["step_size"] == pytest.approx(new_step)
    assert callback.calls[2] == ("euler", pytest.approx(0.44))


def test_step_check_respects_max_step_and_warns_when_max_num_steps_binds():
    capped = ScriptedSteps([0.9, 0.9], max_step_size=0.4)
    capped.value = 0.4
    assert capped.check(None, None, [ode_block()], None)["decision"] == "keep"
    assert len(capped.calls) == 2  # no trial beyond max_step_size
    bounded = ScriptedSteps([0.9, 0.2], max_num_steps=4)
    bounded.value = 0.3
    with pytest.warns(UserWarning, match=r"would exceed max_num_steps=4; h stays at 0.25"):
        record = bounded.check(None, None, [ode_block()], None)
    assert record["step_size"] == pytest.approx(0.25)


class ScriptedTolerances(ToleranceAdaptation):
    def __init__(self, script, **kwargs):
        super().__init__(train_solver="dopri5", **kwargs)
        self.script = script  # (method, tol) -> (accuracy, nfe)
        self.calls = []

    def _accuracy(self, trainer, pl_module, blocks, batch, method, step_size=None, tol=None):
        self.calls.append((method, tol))
        accuracy, nfe = self.script(method, tol)
        return accuracy, nfe, False


def test_tolerance_check_tightens_test_tolerance_until_its_nfe_exceeds_training():
    nfe_at = {1e-4: 20, 1e-5: 14, 1e-6: 26}
    callback = ScriptedTolerances(
        lambda m, tol: (
            0.9 if m == "dopri5" and tol < 1e-4 else 0.5,
            nfe_at[min(nfe_at, key=lambda k: abs(math.log(k / tol)))],
        )
    )
    callback.value = 1e-4
    record = callback.check(None, None, [ode_block()], None)
    assert record["test_tol"] == pytest.approx(1e-6)  # 1e-5 gave 14 NFE <= 20, so tightened once more
    assert record["nfe_test_solver"] == 26 and record["nfe_train_solver"] == 20
    assert record["decision"] == "shrink" and record["tol"] == pytest.approx(5e-5)


def test_tolerance_growth_is_reverted_when_nfe_is_unchanged_over_patience_checks():
    callback = ScriptedTolerances(lambda m, tol: (0.9, 10 if tol >= 1e-5 else 30), nfe_patience=3)
    callback.value = 1e-3
    decisions = []
    for _ in range(4):
        record = callback.check(None, None, [ode_block()], None)
        callback.value = record["tol"]
        decisions.append(record["decision"])
    assert decisions == ["grow", "grow", "keep", "keep"]  # third check: NFE 10 three times in a row
    assert callback.value == pytest.approx(1e-3 * 1.1**2)


def test_tolerance_check_backs_off_when_a_solver_fails():
    class Failing(ScriptedTolerances):
        def _accuracy(self, *args, **kwargs):
            return math.nan, 0.0, True

    callback = Failing(lambda m, tol: (0, 0))
    callback.value = 1e-6
    with pytest.warns(UserWarning, match="loosening tol"):
        record = callback.check(None, None, [ode_block()], None)
    assert record["decision"] == "backoff" and record["tol"] == pytest.approx(2e-6)


# -- on a foreign LightningModule and block -----------------------------------------------------------------------
def test_callbacks_work_on_a_foreign_module_and_block():
    module = ForeignClassifier()
    adaptation = StepSizeAdaptation(interval=2, initial_step_size=0.25)
    monitor = NFEMonitor()
    swap = SolverSwapCheck(solvers=["euler", "rk4"], step_factors=[0.5, 1.0], log_figure=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[adaptation, monitor, swap])
    trainer.fit(module, foreign_loader(), foreign_loader(32, seed=1))
    block = module.net[1]
    checks = [r for r in adaptation.history if r["decision"] != "initial"]
    assert len(checks) == 4  # 4 batches × 2 epochs, a check every 2 steps
    assert block.options["step_size"] == pytest.approx(adaptation.value)
    assert block.options["method"] == "euler"  # restored after the swap check
    assert trainer.callback_metrics["solver/step_size"] == pytest.approx(adaptation.value)
    # Euler over [0, 1] takes ceil(1/h) evaluations per forward: the monitor counts only the training forward,
    # which in the last step used the h chosen at the check before (step 6), not the checks' extra passes.
    assert monitor.last_step["forward"] == math.ceil(1 / adaptation.history[-2]["step_size"] - 1e-9)
    results = swap.results["val"]
    assert set(results["combinations"]) == {("euler", 0.5), ("euler", 1.0), ("rk4", 0.5), ("rk4", 1.0)}
    assert results["combinations"][("euler", 1.0)]["accuracy"] == pytest.approx(results["train_solver_acc"])
    assert results["combinations"][("rk4", 0.5)]["nfe"] == 4 * math.ceil(2 / results["train_step_size"] - 1e-9)


# -- NFE against closed forms ------------------------------------------------------------------------------------
def test_nfe_monitor_counts_rk4_evaluations_and_ignores_solver_checks():
    module = VectorODEClassifierModule(solver=dict(method="rk4", step_size=0.25), network=dict(hidden_width=8))
    monitor = NFEMonitor()
    swap = SolverSwapCheck(solvers=["euler", "dopri5"], log_figure=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[swap, monitor])
    trainer.fit(module, tiny_spheres())
    trainer.test(module, tiny_spheres())
    # 4 steps × 4 stages, each backpropagated; a fixed-step solver accepts each of its 4 steps, and backpropagating
    # through the solver takes no backward steps of its own
    assert monitor.last_step == {
        "forward": 16.0,
        "backward": 16.0,
        "steps_accepted_forward": 4.0,
        "steps_rejected_forward": 0.0,
        "steps_accepted_backward": 0.0,
        "steps_rejected_backward": 0.0,
    }
    by_stage = {e["stage"]: e for e in monitor.epoch_history}
    assert by_stage["train"]["train/nfe_forward_epoch"] == 16.0
    assert by_stage["train"]["train/nfe_backward_epoch"] == 16.0
    assert by_stage["train"]["train/steps_accepted_forward_epoch"] == 4.0
    assert by_stage["val"]["val/nfe_forward"] == 16.0  # the solver-swap grid did not leak in
    assert by_stage["val"]["val/steps_accepted_forward"] == 4.0
    assert by_stage["test"]["test/nfe_forward"] == 16.0
    assert by_stage["test"]["test/steps_rejected_forward"] == 0.0
    assert "solver_swap/test/max_drop" in trainer.callback_metrics


def test_solver_swap_check_keeps_its_results_in_checkpoints(tmp_path: Path) -> None:
    swap = SolverSwapCheck(solvers=["euler"], step_factors=[0.5], log_figure=False)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[swap])
    trainer.fit(ForeignClassifier(), foreign_loader(), foreign_loader(32, seed=1))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert swap.results["val"]["combinations"][("euler", 0.5)]["nfe"] > 0

    restored = SolverSwapCheck(solvers=["euler"], step_factors=[0.5], log_figure=False)
    resumed = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[restored])
    resumed.fit(ForeignClassifier(), foreign_loader(), foreign_loader(32, seed=1), ckpt_path=tmp_path / "model.ckpt")
    assert restored.results == swap.results  # nothing left to train: the results come from the checkpoint


@pytest.mark.parametrize("progress_bar", [True, False])
def test_solver_swap_check_counts_its_passes_in_a_progress_bar(progress_bar: bool, capfd) -> None:
    swap = SolverSwapCheck(solvers=["euler", "rk4"], step_factors=[0.5, 1.0])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, enable_progress_bar=progress_bar)
    module = ForeignClassifier()
    trainer.fit(module, foreign_loader(), foreign_loader(32, seed=1))
    capfd.readouterr()
    swap.measure(trainer, module, foreign_loader(32, seed=2), "val")
    shown = capfd.readouterr().err
    # 1 pass with the training solver + 2 solvers x 2 step factors
    assert ("SolverSwapCheck val" in shown and "0/5" in shown) == progress_bar
    assert bool(shown.strip()) == progress_bar


# -- solver swap check has no side effects --------------------------------------------------------------------------
def test_solver_swap_check_keeps_batch_norm_statistics_gradients_and_solver(tmp_path):
    module = ForeignClassifier(batch_norm=True)
    swap = SolverSwapCheck(log_figure=True)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="swap")
    trainer = quiet_trainer(max_epochs=1, logger=logger, limit_train_batches=1, callbacks=[swap])
    trainer.fit(module, foreign_loader(), foreign_loader(32, seed=1))
    module.train()
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    norm = module.net[0]
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    settings = module.net[1].solver_settings()
    result = swap.measure(trainer, module, foreign_loader(32, seed=2))
    assert len(result["combinations"]) == 3 * 5 + 3  # euler/midpoint/rk4 × 5 step factors, dopri5 × 3 tolerances
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert int(norm.num_batches_tracked) == before[2]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in module.parameters())
    assert module.training and norm.training
    assert module.net[1].solver_settings() == settings
    assert result["max_drop"] == pytest.approx(
        max(result["train_solver_acc"] - c["accuracy"] for c in result["combinations"].values())
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(logger.log_dir))).Reload()
    assert "solver_swap/val" in events.Tags()["images"]


# -- failures of adaptive solvers ----------------------------------------------------------------------------------
class StiffenAtEpoch(Callback):
    """Make dopri5 fail from ``epoch`` on: a tolerance it cannot meet within a few steps."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for block in pl_module.network.modules():
                if hasattr(block, "configure_solver"):
                    block.configure_solver(rtol=1e-12, atol=1e-12, max_num_steps=5)


def test_without_tolerance_adaptation_a_solver_failure_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    module = VectorODEClassifierModule(
        solver=dict(method="dopri5", step_size=None, rtol=1e-3, atol=1e-3), network=dict(hidden_width=8)
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_epochs=3, callbacks=[checkpoint, StiffenAtEpoch(1)], enable_checkpointing=True)
    with pytest.raises(SolverFailedError, match=r"max_num_steps.*ToleranceAdaptation callback"):
        trainer.fit(module, tiny_spheres())
    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    restored = VectorODEClassifierModule.load_from_checkpoint(last)
    assert restored.network.ode.solver_settings()["rtol"] == 1e-3  # the settings of the good epoch
    assert torch.isfinite(restored(torch.randn(3, 2))).all()


class RecordSolverDuringFit(Callback):
    """The block's settings as the training step saw them, and whether anything replaced its ``forward``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.settings = pl_module.network.ode.solver_settings()
        self.patched = "forward" in vars(pl_module.network.ode)


def test_tolerance_adaptation_backs_off_on_solver_failure_and_finishes_training():
    module = VectorODEClassifierModule(
        solver=dict(method="dopri5", step_size=None, max_num_steps=6), network=dict(hidden_width=8)
    )
    adaptation = ToleranceAdaptation(interval=1000, initial_tol=1e-12, backoff_factor=10.0, max_backoffs=12)
    probe = RecordSolverDuringFit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1, callbacks=[adaptation, probe]).fit(module, tiny_spheres())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("ODE solver failed" in m and "loosening tol 1e-12 -> 1e-11" in m for m in messages)
    backoffs = [r for r in adaptation.history if r["decision"] == "backoff"]
    assert backoffs and adaptation.value == pytest.approx(backoffs[-1]["tol"])
    assert [r["tol"] for r in backoffs] == pytest.approx([1e-12 * 10**k for k in range(1, len(backoffs) + 1)])
    assert len(messages) == len(backoffs)  # one warning per retry
    assert adaptation.value > 1e-12
    assert module.network.ode.solver_settings()["rtol"] == pytest.approx(adaptation.value)
    # the block retried through its own solver configuration, with nothing patched; restored after fit
    assert not probe.patched
    assert {k: probe.settings[k] for k in ("failure_retries", "failure_tol_factor", "failure_max_tol")} == dict(
        failure_retries=12, failure_tol_factor=10.0, failure_max_tol=1.0
    )
    assert module.network.ode.solver_settings()["failure_retries"] == 0


class StiffInValidation(Callback):
    def on_validation_start(self, trainer, pl_module):
        pl_module.network.ode.configure_solver(max_num_steps=2)  # dopri5 fails at tight tolerances


def test_tolerance_adaptation_adopts_a_back_off_made_during_validation():
    module = VectorODEClassifierModule(solver=dict(method="dopri5", step_size=None), network=dict(hidden_width=8))
    adaptation = ToleranceAdaptation(interval=1000, initial_tol=1e-6, backoff_factor=10.0)
    with pytest.warns(RuntimeWarning, match="loosening tol 1e-06 -> 1e-05"):
        quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[StiffInValidation(), adaptation]).fit(
            module, tiny_spheres()
        )
    backoffs = adaptation.history[1:]  # no training step came after validation: only on_validation_end saw them
    assert backoffs and all(r["decision"] == "backoff" and r["step"] == 1 for r in backoffs)
    assert adaptation.value == backoffs[-1]["tol"] == module.network.ode.solver_settings()["atol"]


def test_block_retries_loosen_up_to_exactly_the_maximum_tolerance():
    """A retry that would pass failure_max_tol uses it instead (ToleranceAdaptation's max_tol is reachable)."""

    class Oscillation(nn.Module):  # dy/dt = 30 cos(30 t): dopri5 needs ~15 steps even at rtol 1e-2
        def forward(self, t, y):
            return 30 * torch.cos(30 * t) * torch.ones_like(y)

    block = ODEBlock(
        Oscillation(),
        method="dopri5",
        rtol=1e-5,
        atol=1e-5,
        max_num_steps=2,
        failure_retries=10,
        failure_tol_factor=10.0,
        failure_max_tol=3e-3,
    )
    with pytest.raises(SolverFailedError, match=r"rtol=0\.003"):
        block(torch.zeros(1, dtype=torch.float64))
    assert block.solver_settings()["rtol"] == block.solver_settings()["atol"] == 3e-3


def test_tolerance_adaptation_keeps_the_blocks_own_retry_settings_across_a_resume(tmp_path):
    data = tiny_spheres()
    solver = dict(method="dopri5", step_size=None, failure_retries=1, failure_tol_factor=3.0)
    module = VectorODEClassifierModule(solver=solver, network=dict(hidden_width=8))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(
        max_epochs=1, callbacks=[ToleranceAdaptation(interval=1000), checkpoint], enable_checkpointing=True
    ).fit(module, data)
    assert module.network.ode.solver_settings()["failure_retries"] == 1
    stored = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["network.ode._extra_state"]
    assert (stored["solver_settings"]["failure_retries"], stored["solver_settings"]["failure_tol_factor"]) == (1, 3.0)
    resumed = VectorODEClassifierModule(solver=solver, network=dict(hidden_width=8))
    probe = RecordSolverDuringFit()
    quiet_trainer(max_epochs=2, callbacks=[ToleranceAdaptation(interval=1000), probe]).fit(
        resumed, data, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert probe.settings["failure_retries"] == 10  # the callback's max_backoffs while it is active ...
    settings = resumed.network.ode.solver_settings()
    assert (settings["failure_retries"], settings["failure_tol_factor"]) == (1, 3.0)  # ... the model's own after


def test_tolerance_adaptation_says_which_blocks_cannot_back_off():
    class Foreign(ForeignClassifier):
        def forward(self, x):
            return self.net(x)

    adaptation = ToleranceAdaptation(interval=1000, train_solver="dopri5", initial_tol=1e-3)
    with pytest.warns(UserWarning, match=r"cannot back off on solver failures in \['ForeignODE'\].*failure_retries"):
        quiet_trainer(max_steps=1, callbacks=[adaptation]).fit(Foreign(), foreign_loader())


def test_tolerance_adaptation_in_training_tightens_the_test_solver_and_logs_tol():
    module = VectorODEClassifierModule(solver=dict(method="bosh3", step_size=None), network=dict(hidden_width=8))
    adaptation = ToleranceAdaptation(interval=2, initial_tol=1e-3)
    trainer = quiet_trainer(max_epochs=1, callbacks=[adaptation])
    trainer.fit(module, tiny_spheres())
    checks = [r for r in adaptation.history if r["decision"] in ("grow", "keep", "shrink")]
    assert [r["step"] for r in checks] == [2, 4]
    for record in checks:
        assert record["nfe_test_solver"] > record["nfe_train_solver"]  # tightened until it costs more
        assert record["test_tol"] < record["tol"]  # <= 0.1·old tol < 0.5·old tol <= new tol
    assert module.network.ode.solver_settings()["method"] == "bosh3"
    assert module.network.ode.solver_settings()["rtol"] == pytest.approx(adaptation.value)
    assert trainer.callback_metrics["solver/tol"] == pytest.approx(adaptation.value)


def test_every_adaptation_check_reaches_the_logger_whatever_log_every_n_steps(tmp_path):
    """Lightning drops step values logged off its logging steps: the checks at steps 2 and 4 must still be written."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = VectorODEClassifierModule(solver=dict(method="bosh3", step_size=None), network=dict(hidden_width=8))
    adaptation = ToleranceAdaptation(interval=2, initial_tol=1e-3)
    trainer = quiet_trainer(max_epochs=1, callbacks=[adaptation], logger=CSVLogger(tmp_path), log_every_n_steps=50)
    trainer.fit(module, tiny_spheres())
    with open(tmp_path / "lightning_logs/version_0/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("solver/tol")]
    checks = [r for r in adaptation.history if r["decision"] in ("grow", "keep", "shrink")]
    assert [int(row["step"]) for row in rows] == [r["step"] for r in checks] == [2, 4]
    assert [float(row["solver/tol"]) for row in rows] == pytest.approx([r["tol"] for r in checks])


# -- checkpointing and resume ---------------------------------------------------------------------------------------
class RecordAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step_size = pl_module.network.ode.solver_settings()["step_size"]


def test_step_size_and_history_survive_resume(tmp_path):
    data = tiny_spheres()
    module = VectorODEClassifierModule(solver=dict(method="euler", step_size=0.5), network=dict(hidden_width=8))
    first = StepSizeAdaptation(interval=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(module, data)
    assert len(first.history) == 3  # Hairer + checks at steps 2 and 4
    resumed = StepSizeAdaptation(interval=2)
    probe = RecordAtTrainStart()
    fresh = VectorODEClassifierModule(solver=dict(method="euler", step_size=0.5), network=dict(hidden_width=8))
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed, probe])
    trainer.fit(fresh, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert probe.step_size == pytest.approx(first.value)  # restored before the first resumed step
    assert resumed.history[:3] == first.history
    assert [r["step"] for r in resumed.history[3:]] == [6, 8]
    assert not any(r["decision"] == "initial" for r in resumed.history[1:])  # no second Hairer estimate


# -- DDP: every rank keeps identical solver settings ------------------------------------------------------------------
class DumpSettings(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        adaptation = next(c for c in trainer.callbacks if isinstance(c, StepSizeAdaptation))
        monitor = next(c for c in trainer.callbacks if isinstance(c, NFEMonitor))
        record = {
            "settings": pl_module.network.ode.solver_settings(),
            "history": adaptation.history,
            "nfe": monitor.last_step,
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.ddp
def test_ddp_two_processes_keep_identical_solver_settings(tmp_path):
    module = VectorODEClassifierModule(solver=dict(method="euler", step_size=0.5), network=dict(hidden_width=8))
    callbacks = [StepSizeAdaptation(interval=1, threshold=0.01), NFEMonitor(), DumpSettings(str(tmp_path))]
    trainer = quiet_trainer(max_steps=3, devices=2, strategy="ddp_spawn", callbacks=callbacks)
    trainer.fit(module, tiny_spheres(num_train=96))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["settings"] == rank1["settings"]
    assert rank0["history"] == rank1["history"]  # same accuracies (all-reduced), same decisions
    assert len(rank0["history"]) == 4  # Hairer (min over ranks) + checks at steps 1, 2, 3
    assert rank0["settings"]["step_size"] == pytest.approx(rank0["history"][-1]["step_size"])
    assert rank0["nfe"] == rank1["nfe"]  # averaged over ranks


# -- the paper's effect (item 7) ----------------------------------------------------------------------------------
def train_spheres(adapt: bool, epochs: int, interval: int) -> dict:
    pl.seed_everything(0)
    data = ConcentricSpheresDataModule(dim=2, variant="ott", batch_size=128, num_val=500)
    module = VectorODEClassifierModule(
        solver=dict(method="euler", step_size=0.5), network=dict(hidden_width=32), lr=1e-2
    )
    swap = SolverSwapCheck(solvers=["rk4"], step_factors=[0.02], log_figure=False)
    callbacks = [swap] + ([StepSizeAdaptation(interval=interval, initial_step_size=0.5)] if adapt else [])
    quiet_trainer(max_epochs=epochs, check_val_every_n_epoch=epochs, callbacks=callbacks).fit(module, data)
    return swap.results["val"]


def test_euler_trained_model_loses_accuracy_under_rk4_unless_step_size_is_adapted():
    fixed = train_spheres(adapt=False, epochs=15, interval=2)
    # With two Euler steps the model separates the three shells by crossing trajectories ...
    assert fixed["train_solver_acc"] > 0.9
    # ... which an accurate solver (RK4 at h = 0.01) does not reproduce: the paper's effect.
    assert fixed["max_drop"] > 0.25
    adapted = train_spheres(adapt=True, epochs=15, interval=2)
    assert adapted["max_drop"] < 0.1  # StepSizeAdaptation's threshold
    assert adapted["train_step_size"] < 0.5


@pytest.mark.slow
def test_step_adaptation_with_paper_interval_on_longer_training():
    adapted = train_spheres(adapt=True, epochs=30, interval=5)
    assert adapted["max_drop"] < 0.1
    assert adapted["train_solver_acc"] > 0.75


# -- the callbacks' evaluation toolkit ------------------------------------------------------------------------------
def test_split_batch_reads_tuples_dicts_and_bare_inputs_and_names_the_caller_when_targets_are_missing():
    from lightning_pdenets.evaluation import split_batch

    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y, "extra")) == (x, y)
    assert split_batch({"inputs": x, "targets": y}) == (x, y)
    assert split_batch(x, need_targets=False) == (x, None)
    assert split_batch([x], need_targets=False) == (x, None)
    with pytest.raises(
        TypeError, match=r"OODEvaluation needs batches of the form \(inputs, targets, \.\.\.\) .*got Tensor"
    ):
        split_batch(x, "OODEvaluation")


def test_configured_solvers_restores_exactly_also_when_a_block_rejects_the_change():
    from lightning_pdenets.evaluation import configured_solvers

    adaptive = VectorODEClassifierModule(solver=dict(method="dopri5", rtol=1e-5), network=dict(hidden_width=4))
    blocks = [ode_block(), adaptive.network.ode]
    before = [b.solver_settings() for b in blocks]
    with configured_solvers(blocks, method="rk4", step_size=0.001):
        assert [b.solver_settings()["method"] for b in blocks] == ["rk4", "rk4"]
        assert all(b.solver_settings()["max_num_steps"] >= 1000 for b in blocks)  # room for the 1,000 steps
    assert [b.solver_settings() for b in blocks] == before
    with pytest.raises(ValueError, match="step_size"), configured_solvers(blocks, method="rk4", step_size=-1.0):
        pass
    assert [b.solver_settings() for b in blocks] == before


def test_nfe_monitor_counts_accepted_and_rejected_dopri5_steps_and_their_nfe():
    # a first step of the whole interval on a fast-decaying field: the first attempt is rejected
    module = VectorODEClassifierModule(
        solver=dict(method="dopri5", rtol=1e-6, atol=1e-6, first_step=1.0, adjoint=True), network=dict(hidden_width=8)
    )
    monitor = NFEMonitor()
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(module, tiny_spheres())
    step = monitor.last_step
    assert step["steps_rejected_forward"] >= 1 and step["steps_accepted_forward"] >= 1
    # dopri5: one evaluation at t0 (first_step given: no initial-step estimate), then 6 per attempted step (FSAL)
    assert step["forward"] == 1 + 6 * (step["steps_accepted_forward"] + step["steps_rejected_forward"])
    assert step["backward"] == 1 + 6 * (step["steps_accepted_backward"] + step["steps_rejected_backward"])
    assert step["steps_accepted_backward"] >= 1
    train = next(e for e in monitor.epoch_history if e["stage"] == "train")
    assert train["train/nfe_forward_epoch"] == 1 + 6 * (
        train["train/steps_accepted_forward_epoch"] + train["train/steps_rejected_forward_epoch"]
    )
    assert "train/steps_rejected_backward_step" in trainer.callback_metrics
    assert {"val/steps_accepted_forward", "val/steps_rejected_forward"} <= set(trainer.callback_metrics)


def test_nfe_monitor_logs_no_step_statistics_for_blocks_without_counters():
    monitor = NFEMonitor()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[monitor])
    trainer.fit(ForeignClassifier(), foreign_loader(), foreign_loader(32, seed=1))
    assert set(monitor.last_step) == {"forward", "backward"}
    assert not [name for name in trainer.callback_metrics if "steps_" in name]


def test_nfe_monitor_resumes_from_a_state_written_before_solver_statistics():
    monitor = NFEMonitor()
    monitor.load_state_dict(
        {"epoch_history": [], "last_step": {"forward": 16.0, "backward": 16.0}, "train_sums": [32.0, 30.0, 2]}
    )
    assert monitor.state_dict()["train_sums"] == {"nfe_forward": 32.0, "nfe_backward": 30.0, "count": 2}


def test_nfe_monitor_rejects_a_bad_histogram_interval():
    with pytest.raises(ValueError, match="histogram_every_n_steps"):
        NFEMonitor(histogram_every_n_steps=0)


@pytest.mark.parametrize("limit", [2, 0.25])
def test_solver_swap_check_reads_the_batches_the_trainer_validates(limit: float) -> None:
    # it read every validation batch, whatever limit_val_batches said: accuracy on another set than val's, and slow
    class CountingLoader(DataLoader):
        batches_read = 0

        def __iter__(self):
            for batch in super().__iter__():
                CountingLoader.batches_read += 1
                yield batch

    validation = CountingLoader(foreign_loader(128, seed=1).dataset, batch_size=16)  # 8 batches
    swap = SolverSwapCheck(solvers=["euler"], step_factors=[1.0], log_figure=False)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=limit, callbacks=[swap])
    trainer.fit(ForeignClassifier(), foreign_loader(), validation)
    passes = 1 + 1 + 1  # the trainer's validation, the training solver, euler x1
    assert CountingLoader.batches_read == 2 * passes
