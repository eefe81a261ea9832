"""callbacks/ema.yaml: an ODE model (the quickstart RK-Net) trains and tests with an exponential moving average of its
weights; the average is what the checkpoints hold and what validation and the test after fit evaluate. PR-Net refuses it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_pdenets.callbacks import EMAWeights
from lightning_pdenets.cli import build_cli, main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

pytest.importorskip("lightning.pytorch.callbacks.weight_averaging")

DECAY = 0.5  # far from 1, so the average and the raw weights differ after a few steps
TINY = [
    "--trainer.enable_progress_bar=false",
    "--model.init_args.network.width=8",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    f"--trainer.callbacks.decay={DECAY}",
]
QUICKSTART_EMA = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--config",
    str(REPO_ROOT / "callbacks/ema.yaml"),
]


class RawWeights(pl.Callback):
    """Records the raw parameters after every training batch (each is one optimizer step here)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({name: p.detach().clone() for name, p in pl_module.named_parameters()})


def _parameters(state: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    return {name: state[name] for name in names}


def test_the_saved_and_evaluated_weights_are_the_moving_average(tmp_path: Path) -> None:
    cli = build_cli([*QUICKSTART_EMA, *TINY], run=False)
    ema = [c for c in cli.trainer.callbacks if isinstance(c, EMAWeights)]
    assert len(ema) == 1 and ema[0].decay == DECAY
    raw = RawWeights()
    cli.trainer.callbacks.append(raw)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    names = [name for name, _ in cli.model.named_parameters()]

    # The exponential moving average of the raw weights, computed here: AveragedModel copies the first step's weights.
    expected = dict(raw.steps[0])
    for step in raw.steps[1:]:
        expected = {name: DECAY * expected[name] + (1 - DECAY) * step[name] for name in names}
    assert len(raw.steps) == 6

    checkpoints = cli.trainer.checkpoint_callbacks
    last = torch.load(
        next(c.last_model_path or c.best_model_path for c in checkpoints if getattr(c, "filename", None) == "last"),
        weights_only=True,
    )
    for name in names:  # saved: the average in state_dict, the raw weights of the last step in current_model_state
        torch.testing.assert_close(last["state_dict"][name], expected[name])
        torch.testing.assert_close(last["current_model_state"][name], raw.steps[-1][name], rtol=0, atol=0)
    assert any(not torch.equal(expected[name], raw.steps[-1][name]) for name in names)
    for name, p in cli.model.named_parameters():  # after fit the module holds the average (Lightning's on_train_end)
        torch.testing.assert_close(p.detach(), expected[name])

    best_path = next(c.best_model_path for c in checkpoints if getattr(c, "monitor", None) == "val/acc_top1")
    best = torch.load(best_path, weights_only=True)
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best_path, verbose=False)[0]
    for name, p in cli.model.named_parameters():  # evaluated: the checkpoint's averaged weights, not its raw ones
        torch.testing.assert_close(p.detach(), best["state_dict"][name], rtol=0, atol=0)
    assert any(not torch.equal(best["state_dict"][name], best["current_model_state"][name]) for name in names)

    # The same accuracy from a model built from the checkpoint alone, without the callback.
    fresh = type(cli.model).load_from_checkpoint(best_path, weights_only=True)
    alone = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_test_batches=2)
    assert alone.test(fresh, datamodule=cli.datamodule, verbose=False)[0]["test/acc_top1"] == tested["test/acc_top1"]

    validated = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best_path, verbose=False)
    assert validated and all(torch.equal(p.detach(), best["state_dict"][n]) for n, p in cli.model.named_parameters())


def test_pdenets_fit_with_the_preset_tests_the_averaged_weights(tmp_path: Path) -> None:
    cli = build_cli(["fit", *QUICKSTART_EMA, *TINY])
    best_path = next(
        c.best_model_path for c in cli.trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/acc_top1"
    )
    best = torch.load(best_path, weights_only=True)
    assert "test/acc_top1" in cli.trainer.callback_metrics
    for name, p in cli.model.named_parameters():  # the CLI's test after fit ran on the averaged weights
        assert torch.equal(p.detach(), best["state_dict"][name]), name
    tested = float(cli.trainer.callback_metrics["test/acc_top1"])
    again = build_cli(["test", *QUICKSTART_EMA, *TINY, "--ckpt_path", best_path])  # a later `pdenets test`, too
    assert float(again.trainer.callback_metrics["test/acc_top1"]) == tested


def test_prnet_refuses_weight_averaging_saying_why(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "--config",
                str(REPO_ROOT / "configs/digits/prnet.yaml"),
                "--config",
                str(REPO_ROOT / "callbacks/ema.yaml"),
                "--trainer.enable_progress_bar=false",
                "--trainer.limit_train_batches=1",
                "--trainer.limit_val_batches=1",
                "--trainer.max_epochs=1",
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert "PRNetModule cannot train with EMAWeights" in message
    assert "optimizer steps per batch" in message and "alpha" in message and "callbacks/ema.yaml" in message
    assert not list(Path("logs").glob("**/*.ckpt"))  # refused before any training step


@pytest.mark.parametrize("decay", [1.5, -0.1, "0.9", True])
def test_the_decay_is_checked(decay) -> None:
    with pytest.raises(ValueError, match=r"`decay` must be a number in \[0, 1\], got"):
        EMAWeights(decay=decay)


def test_without_lightning_26_the_package_imports_and_ema_says_what_it_needs() -> None:
    """setup.cfg allows Lightning 2.4, which has no EMAWeightAveraging: only building the callback fails."""
    import subprocess
    import sys

    code = (
        "import lightning.pytorch.callbacks as c; del c.EMAWeightAveraging\n"
        "import lightning_pdenets.callbacks as p, lightning_pdenets.models\n"
        "try:\n    p.EMAWeights()\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "EMAWeights (callbacks/ema.yaml) needs Lightning >= 2.6" in result.stdout
