"""Stopping a run by signal in one process: what is saved, what is said, and when the watchdog may end it."""

from __future__ import annotations

import errno
import logging
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_pdenets.callbacks import CheckpointOnInterrupt, ResumeAwareProgressBar
from lightning_pdenets.callbacks.sigterm import SigtermFlagOnly, set_received_sigterm
from lightning_pdenets.checkpoints import save_atomically
from lightning_pdenets.cli import entry
from lightning_pdenets.cli.exit_codes import after_ctrl_c_advice, after_sigterm_advice
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import RKNetModule
from tests.test_interruption import sigterm_after_ready
from tests.test_resume_matrix import RecordingLogger


class Stop(pl.Callback):
    """Once, at ``hook`` in ``epoch`` (not in the sanity check unless asked): raise Ctrl-C or mark SIGTERM."""

    def __init__(self, hook: str, epoch: int = 0, kind: str = "sigterm") -> None:
        self.hook, self.epoch, self.kind, self.done = hook, epoch, kind, False

    def _maybe(self, trainer: pl.Trainer, hook: str) -> None:
        if self.done or hook != self.hook or trainer.current_epoch != self.epoch:
            return
        self.done = True
        if self.kind == "ctrl-c":
            raise KeyboardInterrupt
        set_received_sigterm(trainer)  # what SigtermFlagOnly's handler does on SIGTERM

    def on_validation_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._maybe(trainer, "sanity" if trainer.sanity_checking else "validation")

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._maybe(trainer, "train_batch_end")

    def on_test_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._maybe(trainer, "test")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._maybe(trainer, "save_checkpoint")


def fit(
    root: Path,
    callbacks: list[pl.Callback],
    ckpt_path: str | None = None,
    scalars: dict | None = None,
    **settings: Any,
) -> tuple[pl.Trainer, RKNetModule]:
    pl.seed_everything(3, workers=True)
    model = RKNetModule(solver=dict(step_size=0.5), network=dict(width=4, num_downsamples=1))
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        deterministic=True,
        default_root_dir=root,
        logger=RecordingLogger({} if scalars is None else scalars),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(settings)
    trainer = pl.Trainer(
        **options,
        callbacks=[
            ModelCheckpoint(dirpath=root / "ckpt", filename="last", enable_version_counter=False),
            CheckpointOnInterrupt(),
            SigtermFlagOnly(),
            *callbacks,
        ],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
    return trainer, model


def test_sigterm_in_a_validation_inside_the_epoch_resumes_with_the_same_logged_steps(tmp_path: Path) -> None:
    """The stop waits for the validation's end, after the batch's logger step was counted: Lightning counted it once
    more when resuming, and every later scalar was logged one step late."""
    settings = dict(val_check_interval=2, num_sanity_val_steps=0)
    reference_scalars: dict = {}
    _, reference = fit(tmp_path / "reference", [], scalars=reference_scalars, **settings)
    scalars: dict = {}
    with pytest.raises(SIGTERMException):
        fit(tmp_path / "run", [Stop("validation")], scalars=scalars, **settings)
    checkpoint = tmp_path / "run" / "ckpt" / "interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2  # right after the mid-epoch validation
    _, resumed = fit(tmp_path / "run", [], ckpt_path=str(checkpoint), scalars=scalars, **settings)
    for key, value in reference.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.state_dict()[key], value), key
    assert scalars == reference_scalars


@pytest.mark.parametrize("hook", ["validation", "save_checkpoint"])
def test_ctrl_c_in_an_epoch_end_validation_or_save_keeps_last_ckpt_as_the_resume_point(
    hook: str, tmp_path: Path
) -> None:
    """A checkpoint written there resumed as if the validation (or the epoch's end) had completed: its metrics were
    lost in silence. Ctrl-C stops at once, without it, and the advice names last.ckpt."""
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
        fit(tmp_path, [Stop(hook, epoch=1, kind="ctrl-c")], num_sanity_val_steps=0)
    assert not (tmp_path / "ckpt" / "interrupted.ckpt").exists()
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # epoch 0's
    advice = after_ctrl_c_advice("fit")
    assert advice.endswith(
        f"so no interrupted.ckpt was written. The fit resumes with the same command and --ckpt_path last. It finds "
        f"the last checkpoint, {str(last)!r}."
    ), advice


def test_after_sigterm_in_the_sanity_check_the_advice_says_nothing_was_written(tmp_path: Path) -> None:
    with pytest.raises(SIGTERMException):
        fit(tmp_path, [Stop("sanity")])
    assert not list(tmp_path.rglob("*.ckpt"))
    advice = after_sigterm_advice("fit")
    assert advice == (
        "No checkpoint of this fit was written, so there is nothing to resume: run the same command again "
        "without --ckpt_path."
    )
    assert after_ctrl_c_advice("fit").startswith("No checkpoint of this fit was written")


def test_after_sigterm_the_advice_names_the_interrupt_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SIGTERMException):
        fit(tmp_path, [Stop("train_batch_end", epoch=1)])
    written = tmp_path / "ckpt" / "interrupted.ckpt"
    assert written.is_file()
    # --ckpt_path last looks in the log folder (here the Trainer's root folder), where the file is
    assert after_sigterm_advice("fit") == (
        "The fit resumes with the same command and --ckpt_path last (on any number of processes). It finds the "
        f"interrupt checkpoint, {str(written)!r}."
    )
    from lightning_pdenets.interruption import RUN_RECORD

    RUN_RECORD.log_root = str(tmp_path / "elsewhere")  # `last` would not find it: the advice gives its path
    assert after_sigterm_advice("fit") == (
        f"The fit resumes with the same command and --ckpt_path {written} (on any number of processes), the "
        f"interrupt checkpoint (--ckpt_path last would not find it)."
    )


def test_sigterm_in_a_test_run_says_nothing_about_an_interrupt_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, model = fit(tmp_path, [], max_epochs=1, num_sanity_val_steps=0)
    trainer.callbacks.append(Stop("test", epoch=1))  # after the fit's one epoch
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        trainer.test(model, datamodule=DigitsDataModule(batch_size=16), verbose=False)
    assert "CheckpointOnInterrupt" not in caplog.text


def test_a_failed_checkpoint_write_is_one_error_naming_the_file_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_pdenets.errors import CheckpointWriteError

    target = tmp_path / "last.ckpt"
    save_atomically({"step": 1}, target)

    def full(obj: Any, file: Any) -> None:
        file.write(b"half")
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError as error:  # torch's zip writer reports a failed write so
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64") from error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as failure:
        save_atomically({"step": 2}, target)
    assert str(failure.value) == (
        f"could not write checkpoint {str(target)!r}: [Errno 27] File too large; the previous file of that name is "
        f"kept, and no partial file was left."
    )
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    def failing_cli(args: Any) -> None:
        raise failure.value

    monkeypatch.setattr(entry, "build_cli", failing_cli)
    with pytest.raises(SystemExit) as stop:
        entry.main(["test"])
    assert stop.value.code == 1


def test_sigterm_while_setting_up_ends_with_one_line_and_exit_143(monkeypatch, capsys) -> None:
    """Before any trainer stage handles SIGTERM (a long dataset preparation), the process ended with 143 silently."""

    def setting_up(args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in between

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh process
    monkeypatch.setattr(entry, "build_cli", setting_up)
    try:
        with pytest.raises(SystemExit) as stop:
            entry.main(["fit", "--config", "configs/quickstart.yaml"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143
    assert capsys.readouterr().err == (
        "pdenets: fit stopped by SIGTERM before the run started (exit code 143); nothing was written, so there is "
        "nothing to resume: run the same command again.\n"
    )


def test_watchdog_spares_a_process_that_makes_progress_after_sigterm(tmp_path: Path) -> None:
    """A validation or a training step longer than the grace period, batch after batch: alive until it stops by
    itself. Before, the watchdog ended it after the grace period, saving nothing."""
    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent("""
        import signal, time
        from lightning_pdenets.interruption import StopWatchdog, beat
        signal.signal(signal.SIGTERM, lambda *_: None)   # like Lightning's: marks, does not exit
        watchdog = StopWatchdog(grace_seconds=3.0).start()
        beat()
        print("ready", flush=True)
        for _ in range(16):   # batches of 0.4 s, 6.4 s in all after SIGTERM
            time.sleep(0.4)
            beat()
        watchdog.stop()
        print("stopped by itself", flush=True)
    """)
    )
    process, _ = sigterm_after_ready(script)
    stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stdout.strip(), stderr) == (0, "stopped by itself", "")


def test_every_batch_end_is_a_beat() -> None:
    from lightning_pdenets import interruption

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback = SigtermFlagOnly()
    for hook in ("on_train_batch_end", "on_validation_batch_end", "on_test_batch_end", "on_predict_batch_end"):
        interruption._BEATS["last"] = None
        getattr(callback, hook)(trainer, None, None, None, 0)
        assert interruption._BEATS["last"] is not None, hook


def test_watchdog_waits_a_few_times_the_longest_interval_between_beats(tmp_path: Path) -> None:
    script = tmp_path / "slow_steps.py"
    script.write_text(
        textwrap.dedent("""
        import signal, time
        from lightning_pdenets.interruption import StopWatchdog, beat
        signal.signal(signal.SIGTERM, lambda *_: None)
        StopWatchdog(grace_seconds=0.5).start()
        beat(); time.sleep(1.0); beat()   # one step of 1 s seen: 3 s without a beat are tolerated
        print("ready", flush=True)
        while True:
            time.sleep(0.1)   # blocked: no beat any more
    """)
    )
    process, sent = sigterm_after_ready(script)
    _, stderr = process.communicate(timeout=60)
    assert 2.5 < time.monotonic() - sent < 15
    assert process.returncode == 143 and "did not stop within 3 s of SIGTERM and made no progress" in stderr


def test_the_epoch_after_a_mid_epoch_resume_shows_no_negative_rate(tmp_path: Path) -> None:
    """The resumed epoch's bar starts at the batches already done (tqdm's ``initial``); tqdm's reset at the next
    epoch keeps ``initial``, so that epoch's first refresh showed a rate below zero (``-45100.04it/s``)."""
    with pytest.raises(SIGTERMException):
        fit(tmp_path, [Stop("train_batch_end", epoch=0)], max_epochs=3, num_sanity_val_steps=0)

    class WatchRefreshes(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            bar = trainer.progress_bar_callback.train_progress_bar
            if getattr(bar, "_watched", False):
                return
            original = bar.refresh

            def refresh(*a: Any, **k: Any) -> Any:
                self.seen.append((bar.n, bar.initial))
                return original(*a, **k)

            bar.refresh, bar._watched = refresh, True

    watch = WatchRefreshes()
    fit(
        tmp_path,
        [watch, ResumeAwareProgressBar()],
        ckpt_path=str(tmp_path / "ckpt" / "interrupted.ckpt"),
        max_epochs=2,
        enable_progress_bar=True,
    )
    assert watch.seen and all(n >= initial for n, initial in watch.seen), watch.seen
