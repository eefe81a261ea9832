"""The advice after a non-finite loss names a checkpoint and a learning rate that work when followed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.cli import build_cli
from lightning_pdenets.errors import NonFiniteLossError
from lightning_pdenets.models import RKNetModule
from lightning_pdenets.models.base import SAFE_LEARNING_RATE, lower_learning_rate
from tests.test_cli_runs import DIVERGING
from tests.trainers import quiet_trainer


def test_the_lower_learning_rate_is_a_tenth_or_the_safe_rate_from_absurd_ones() -> None:
    assert lower_learning_rate(0.003) == pytest.approx(0.0003)
    assert lower_learning_rate(10 * SAFE_LEARNING_RATE) == pytest.approx(SAFE_LEARNING_RATE)
    assert lower_learning_rate(1e30) == SAFE_LEARNING_RATE  # a tenth, 1e29, would fail the same way


@pytest.mark.cli
def test_the_advice_names_a_kept_checkpoint_outside_the_runs_folder_by_its_path(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError):
        build_cli(["fit", *DIVERGING])  # epoch 0 trains and writes last.ckpt; epoch 1 diverges
    saved = tmp_path / "elsewhere" / "epoch0.ckpt"
    saved.parent.mkdir()
    shutil.copy(next(tmp_path.rglob("last.ckpt")), saved)
    shutil.rmtree(tmp_path / "logs")

    with pytest.raises(NonFiniteLossError) as failure:  # resumed at epoch 1, diverges before writing anything
        build_cli(["fit", *DIVERGING, f"--ckpt_path={saved}"])
    message = str(failure.value)
    advice = re.search(r"run the same command with (--ckpt_path \S+ --model\.init_args\.lr \S+)", message)
    assert advice and f"--ckpt_path {saved} " in advice.group(0), message  # `last` finds nothing in this run's folder

    resumed = build_cli(["fit", *DIVERGING, *advice.group(1).split()])  # the advice, followed to the letter
    assert resumed.trainer.global_step == 9


def test_nan_inputs_are_named_as_the_cause_instead_of_the_learning_rate(tmp_path: Path) -> None:
    images = torch.rand(16, 1, 8, 8)
    images[3, 0, 2, 2] = float("nan")
    loader = DataLoader(TensorDataset(images, torch.randint(0, 10, (16,))), batch_size=8)
    model = RKNetModule(num_classes=10, in_channels=1, image_size=8, network=dict(width=8, num_downsamples=1))
    with pytest.raises(NonFiniteLossError) as failure:
        quiet_trainer(max_epochs=1, default_root_dir=tmp_path).fit(model, loader)
    message = str(failure.value)
    assert "'inputs'" in message and "check the data" in message and "--model.init_args.lr" not in message
