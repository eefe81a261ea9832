"""SIGTERM handling: the watchdog that ends a blocked process, the flag-only handler, rank-symmetric metric sync."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp

from lightning_pdenets.callbacks.sigterm import SigtermFlagOnly, set_received_sigterm
from lightning_pdenets.evaluation import accuracy_metrics, compute_on_every_rank
from lightning_pdenets.interruption import RunInterrupted, StopWatchdog, raise_if_stop_requested
from tests.conftest import REPO_ROOT


def test_setting_the_stop_flag_reaches_lightnings_loops() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not trainer.received_sigterm
    set_received_sigterm(trainer)
    assert trainer.received_sigterm, (
        "Lightning moved the flag behind Trainer.received_sigterm: update "
        "lightning_pdenets.callbacks.sigterm.set_received_sigterm"
    )
    with pytest.raises(RunInterrupted, match="the grid, at step 3"):
        raise_if_stop_requested(trainer, lambda: "the grid, at step 3")
    set_received_sigterm(trainer, False)
    raise_if_stop_requested(trainer, lambda: "never")


def test_flag_only_handler_marks_the_trainer_and_runs_no_collective() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback = SigtermFlagOnly()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        callback.on_test_start(trainer, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert trainer.received_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("grace", [0, -1, "5", True])
def test_watchdog_grace_must_be_a_positive_number(grace) -> None:
    with pytest.raises(ValueError, match="`grace_seconds` must be a positive number of seconds"):
        StopWatchdog(grace_seconds=grace)


def test_watchdog_grace_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDENETS_STOP_GRACE_SECONDS", "soon")
    with pytest.raises(
        ValueError, match=r"\$PDENETS_STOP_GRACE_SECONDS must be a positive number of seconds, got 'soon'"
    ):
        StopWatchdog()


def sigterm_after_ready(script: Path) -> tuple[subprocess.Popen, float]:
    """Run ``script`` (which prints "ready" when it is set up), send it SIGTERM then; the process and the time sent."""
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    return process, sent


def test_watchdog_ends_a_process_that_ignores_sigterm_with_one_line(tmp_path: Path) -> None:
    """A handler that only sets a flag, and a main thread that never looks at it: ended after the grace."""
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent("""
        import signal, sys, time
        from lightning_pdenets.interruption import StopWatchdog
        signal.signal(signal.SIGTERM, lambda *_: None)   # like Lightning's: marks, does not exit
        StopWatchdog(grace_seconds=1.0, describe=lambda: "Resume with --ckpt_path last.").start()
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
    """)
    )
    process, sent = sigterm_after_ready(script)
    _, stderr = process.communicate(timeout=30)
    assert 0.9 < time.monotonic() - sent < 10
    assert process.returncode == 143
    assert stderr.strip().splitlines() == [
        "pdenets: rank 0 did not stop within 1 s of SIGTERM and made no progress (blocked, e.g. in a collective "
        "operation another process never joined); ended with exit code 143. Resume with --ckpt_path last."
    ]


def test_watchdog_stopped_after_a_handled_sigterm_leaves_the_process_alone(tmp_path: Path) -> None:
    """``pdenets`` called in-process (tests, notebooks) stops the watchdog when it returns; the caller lives on."""
    script = tmp_path / "handled.py"
    script.write_text(
        textwrap.dedent("""
        import os, signal, time
        from lightning_pdenets.interruption import StopWatchdog
        signal.signal(signal.SIGTERM, lambda *_: None)
        watchdog = StopWatchdog(grace_seconds=0.5).start()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        watchdog.stop()          # the run stopped cleanly within the grace period
        time.sleep(1.5)
        print("alive", flush=True)
    """)
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "alive", "")


def test_watchdog_stop_restores_the_default_handler() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        watchdog = StopWatchdog(grace_seconds=5).start()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        watchdog.stop()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_compute_on_every_rank_in_one_process() -> None:
    metrics = {
        "clean": accuracy_metrics(3, device=torch.device("cpu")),
        "fgsm": accuracy_metrics(3, device=torch.device("cpu")),
    }
    metrics["clean"].update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]))
    assert compute_on_every_rank(None, metrics, torch.device("cpu")) == {"clean": {"top1": 0.5}}
    assert compute_on_every_rank(None, {}, torch.device("cpu")) == {}


def _rank_with_and_rank_without_batches(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    trainer = type("FakeTrainer", (), {"world_size": 2})()
    metrics = {}
    if rank == 0:  # rank 1 evaluated no batch at all (fewer evaluation batches than ranks)
        metrics["fgsm_eps25"] = accuracy_metrics(10, device=torch.device("cpu"))
        metrics["fgsm_eps25"].update(torch.eye(10)[:4], torch.tensor([0, 1, 2, 0]))
    results = compute_on_every_rank(trainer, metrics, torch.device("cpu"))
    torch.save(results, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_compute_on_every_rank_when_one_rank_saw_no_batch(tmp_path: Path) -> None:
    """Before issue 26 a rank without batches skipped compute(), and the other waited in its all-gather forever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_with_and_rank_without_batches, args=(port, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first == second and list(first) == ["fgsm_eps25"] and first["fgsm_eps25"]["top1"] == 0.75


def test_ood_evaluation_stops_before_a_batch_and_names_itself() -> None:
    from lightning_pdenets.callbacks import OODEvaluation

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    set_received_sigterm(trainer)
    batch = (torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(RunInterrupted, match=r"^OODEvaluation \(test batch 3\)$"):
        OODEvaluation().on_test_batch_end(trainer, None, None, batch, 3)


def test_solver_check_interrupted_under_an_adaptive_solver_names_its_tolerance_not_a_stale_step() -> None:
    """After a fixed-step setting, dopri5 keeps the (ignored) step_size; the message must name dopri5's tolerance."""
    from torch import nn

    from lightning_pdenets.blocks import ODEBlock
    from lightning_pdenets.evaluation import configure_blocks, evaluate_batches

    class Field(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -y

    block = ODEBlock(Field(), method="rk4", step_size=0.25)
    configure_blocks([block], "dopri5", tol=1e-4)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    set_received_sigterm(trainer)
    batch = (torch.rand(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RunInterrupted, match=r"^SolverSwapCheck \(evaluating with dopri5, tol 0\.0001\)$"):
        evaluate_batches(trainer, nn.Sequential(block), [block], iter([batch]), owner="SolverSwapCheck")


@pytest.mark.parametrize("outcome", ["success", "usage error"])
def test_pdenets_leaves_its_process_group_before_the_interpreter_shuts_down(
    outcome: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DDP process that exits with its gloo group alive was sometimes aborted at shutdown (exit status -6, "terminate
    called without an active exception", after a fit that succeeded: seen in CI). ``main`` destroys the group on
    every way out; here a one-process gloo group stands in for the group Lightning creates."""
    from lightning_pdenets.cli import entry
    from lightning_pdenets.errors import ConfigurationError

    def run(args):
        assert torch.distributed.is_initialized()
        if outcome == "usage error":
            raise ConfigurationError("a bad setting")

    monkeypatch.setattr(entry, "build_cli", run)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if outcome == "success":
            entry.main(["fit"])
        else:
            with pytest.raises(SystemExit):
                entry.main(["fit"])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_ctrl_c_before_the_run_starts_ends_with_one_line_and_exit_130(monkeypatch, capsys) -> None:
    # a KeyboardInterrupt while the config was parsed or the model built was a traceback of some 40 frames
    from lightning_pdenets.cli import entry

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "build_cli", interrupted)
    with pytest.raises(SystemExit) as stop:
        entry.main(["fit", "--config", "configs/quickstart.yaml"])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "pdenets: fit interrupted by Ctrl-C before it started (exit code 130).\n"
