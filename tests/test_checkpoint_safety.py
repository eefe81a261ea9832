"""Checkpoints users can trust: loading runs no code, and a checkpoint never stands in for another model."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from lightning_pdenets.cli import build_cli, main
from lightning_pdenets.errors import CheckpointMismatchError, UntrustedCheckpointError
from lightning_pdenets.models import IsometricMobileNetModule
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

QUICK = [
    "--config",
    str(REPO_ROOT / "configs/quickstart.yaml"),
    "--model.init_args.network.width=8",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--test_after_fit=false",
    "--trainer.max_epochs=1",
]


class CreateMarker:
    """A pickled payload: unpickling it creates ``path`` (a stand-in for any code an attacker would run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def crafted(checkpoint: dict, path: Path, marker: Path) -> Path:
    """``checkpoint`` with a code-running payload added, saved at ``path``."""
    torch.save({**checkpoint, "payload": CreateMarker(marker)}, path)
    return path


@pytest.fixture
def quickstart_checkpoint(tmp_path: Path) -> Path:
    build_cli(["fit", *QUICK])
    return tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_a_checkpoint_with_a_pickled_payload_runs_no_code(
    subcommand: str, quickstart_checkpoint: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    evil = crafted(torch.load(quickstart_checkpoint, weights_only=True), tmp_path / "evil.ckpt", marker)
    for weights_only in ([], ["--weights_only=true"]):
        with pytest.raises(UntrustedCheckpointError, match=r"holds pickled Python objects .*--weights_only false"):
            build_cli([subcommand, *QUICK, f"--ckpt_path={evil}", *weights_only])
        assert not marker.exists()


def test_an_untrusted_checkpoint_ends_with_a_short_error_and_exit_code_2(
    quickstart_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    evil = crafted(torch.load(quickstart_checkpoint, weights_only=True), tmp_path / "evil.ckpt", tmp_path / "MARKER")
    with pytest.raises(SystemExit) as stop:
        main(["test", *QUICK, f"--ckpt_path={evil}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.strip().splitlines()[-1].endswith(
        "load it explicitly with --weights_only false."
    )
    assert not (tmp_path / "MARKER").exists()


def test_trusting_a_checkpoint_explicitly_loads_it(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    """The advice of the error works: --weights_only false unpickles the file (here: the marker appears) and tests."""
    marker = tmp_path / "MARKER"
    evil = crafted(torch.load(quickstart_checkpoint, weights_only=True), tmp_path / "evil.ckpt", marker)
    cli = build_cli(["test", *QUICK, f"--ckpt_path={evil}", "--weights_only=false"])
    assert marker.exists() and "test/acc_top1" in cli.trainer.callback_metrics


def test_a_pretrained_checkpoint_with_a_pickled_payload_runs_no_code(tmp_path: Path) -> None:
    tiny = dict(channels=16, expanded_channels=32, num_blocks=2, patch_size=8)
    source = IsometricMobileNetModule(num_classes=7, network=tiny)
    marker = tmp_path / "MARKER"
    checkpoint = {
        "state_dict": {f"network.{k}": v for k, v in source.network.state_dict().items()},
        "hyper_parameters": dict(source.hparams),
    }
    evil = crafted(checkpoint, tmp_path / "evil.ckpt", marker)
    with pytest.raises(UntrustedCheckpointError, match=r"--model\.init_args\.trust_pretrained_checkpoint true"):
        IsometricMobileNetModule(num_classes=3, pretrained_checkpoint=str(evil), network=tiny)
    assert not marker.exists()
    trusted = IsometricMobileNetModule(
        num_classes=3, pretrained_checkpoint=str(evil), trust_pretrained_checkpoint=True, network=tiny
    )
    assert marker.exists()
    assert torch.equal(
        trusted.network.backbone.state_dict()["stem.0.weight"], source.network.backbone.state_dict()["stem.0.weight"]
    )


def test_a_checkpoint_of_another_model_class_is_refused(quickstart_checkpoint: Path) -> None:
    prnet = [
        "--config",
        str(REPO_ROOT / "configs/digits/prnet.yaml"),
        "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    with pytest.raises(
        CheckpointMismatchError,
        match=r"holds a lightning_pdenets\.models\.RKNetModule, but the config "
        r"asks for a lightning_pdenets\.models\.PRNetModule",
    ):
        build_cli(["test", *prnet, f"--ckpt_path={quickstart_checkpoint}"])


def test_load_from_checkpoint_names_what_the_file_is_instead_of_a_key_error(
    quickstart_checkpoint: Path, tmp_path: Path
) -> None:
    from lightning_pdenets.errors import CorruptCheckpointError
    from lightning_pdenets.models import ODENetModule, ResNetModule, RKNetModule

    text, empty, no_state = tmp_path / "notes.ckpt", tmp_path / "empty.ckpt", tmp_path / "dict.ckpt"
    text.write_text("hello")  # was KeyError: 101
    empty.write_bytes(b"")  # was EOFError with no message
    torch.save({"a": 1}, no_state)  # was KeyError: 'pytorch-lightning_version'
    for path, problem in ((text, "is not a checkpoint"), (empty, "the file is empty"), (no_state, "holds no")):
        with pytest.raises(CorruptCheckpointError, match=problem):
            RKNetModule.load_from_checkpoint(path)
    # another class: was "blocked ... import the module that defines the class", which was imported
    with pytest.raises(CheckpointMismatchError, match=r"holds a lightning_pdenets\.models\.RKNetModule, not a Res"):
        ResNetModule.load_from_checkpoint(quickstart_checkpoint)
    assert type(ODENetModule.load_from_checkpoint(quickstart_checkpoint)) is RKNetModule  # a subclass: what it holds
