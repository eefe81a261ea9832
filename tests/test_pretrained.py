"""Named pretrained models: every file matches its recorded SHA-256, loads with weights_only, and the quickstart
model reproduces its recorded test accuracy on the bundled digits, from Python and from `--ckpt_path pretrained:`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_pdenets import pretrained
from lightning_pdenets.cli import build_cli, main
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.errors import CheckpointNotFoundError, CorruptCheckpointError
from tests.conftest import REPO_ROOT
from tests.trainers import quiet_trainer

PARAMETERS = {
    "resnet_mnist": 576_778,
    "rknet_mnist": 208_266,
    "odenet_mnist": 208_266,
    "prnet_mnist": 210_578,
    "prnet_mnist_seed1": 210_578,
}
"""Parameter counts recorded in BENCHMARKS.md ("MNIST at paper scale")."""
DIGITS_TEST_IMAGES = 270


def test_the_issue_names_are_registered_with_their_configs_and_files() -> None:
    assert pretrained.list_models() == sorted([*PARAMETERS, "quickstart_digits"])
    for name in pretrained.list_models():
        entry = pretrained.info(name)
        assert (REPO_ROOT / entry.config).is_file(), entry.config
        assert pretrained.checkpoint_path(name) == REPO_ROOT / entry.file  # verified: exists, hash matches
        assert 0.9 < entry.test_accuracy <= 1.0 and (entry.url is None or entry.url.startswith("https://"))


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_each_mnist_model_loads_as_its_class_in_eval_mode(name: str) -> None:
    model = pretrained.load(name)
    entry = pretrained.info(name)
    assert f"{type(model).__module__}.{type(model).__name__}".endswith(entry.model.rsplit(".", 1)[-1])
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _digits_accuracy(model: pl.LightningModule) -> float:
    return quiet_trainer().test(model, datamodule=DigitsDataModule(), verbose=False)[0]["test/acc_top1"]


def test_the_quickstart_model_reproduces_its_recorded_accuracy_on_digits() -> None:
    entry = pretrained.info("quickstart_digits")
    accuracy = _digits_accuracy(pretrained.load("quickstart_digits"))
    assert round(accuracy * DIGITS_TEST_IMAGES) == round(entry.test_accuracy * DIGITS_TEST_IMAGES), accuracy


def test_the_cli_tests_a_pretrained_model_by_name() -> None:
    cli = build_cli(
        [
            "test",
            "--config",
            str(REPO_ROOT / "configs/quickstart.yaml"),
            "--trainer.enable_progress_bar=false",
            "--ckpt_path",
            "pretrained:quickstart_digits",
        ]
    )
    accuracy = float(cli.trainer.callback_metrics["test/acc_top1"])
    assert round(accuracy * DIGITS_TEST_IMAGES) == round(
        pretrained.info("quickstart_digits").test_accuracy * DIGITS_TEST_IMAGES
    )
    assert cli.config.test.ckpt_path == str(REPO_ROOT / "bench/checkpoints/digits/quickstart.ckpt")
    assert cli.config.test.weights_only is True


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_the_cli_refuses_an_unknown_name_listing_the_valid_ones(capsys) -> None:
    message = _cli_error(
        ["test", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--ckpt_path", "pretrained:prnet"], capsys
    )
    assert "no pretrained model 'prnet'" in message and "prnet_mnist, prnet_mnist_seed1" in message


def test_the_cli_refuses_a_pretrained_model_of_another_class_than_the_config(capsys) -> None:
    message = _cli_error(
        ["test", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--ckpt_path", "pretrained:prnet_mnist"],
        capsys,
    )
    assert "holds a lightning_pdenets.models.PRNetModule" in message and "RKNetModule" in message


def test_an_unknown_name_is_a_value_error_listing_the_names() -> None:
    with pytest.raises(
        ValueError, match=r"no pretrained model 'mnist'; valid names: odenet_mnist, .*quickstart_digits"
    ):
        pretrained.load("mnist")


def _copy_of(name: str, root: Path) -> Path:
    entry = pretrained.info(name)
    target = root / entry.file
    target.parent.mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / entry.file, target)
    return target


def test_a_changed_file_is_refused_naming_it_and_both_hashes(tmp_path: Path) -> None:
    target = _copy_of("quickstart_digits", tmp_path)
    data = bytearray(target.read_bytes())
    data[-100] ^= 1  # one bit inside the tensors: the file still unpickles, the hash does not match
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as error:
        pretrained.load("quickstart_digits", root=tmp_path)
    message = str(error.value)
    assert str(target) in message and pretrained.info("quickstart_digits").sha256 in message
    assert pretrained.sha256_of(bytes(data)) in message and "git checkout -- bench/checkpoints/digits/" in message


def test_a_missing_file_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pretrained.ROOT_VARIABLE, str(tmp_path))  # as a wheel without the repository would see it
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"'.*bench/checkpoints/mnist/odenet.ckpt' does not exist.*"
        r"no download URL is registered.*pip install -e \.",
    ):
        pretrained.load("odenet_mnist")
    monkeypatch.setenv(pretrained.ROOT_VARIABLE, str(REPO_ROOT))
    assert pretrained.checkpoint_path("odenet_mnist").is_file()


def test_a_url_entry_downloads_once_into_the_hub_cache_and_checks_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL plan: the same load(name) call, the file fetched by torch.hub with the recorded SHA-256 as hash prefix."""
    entry = pretrained.info("quickstart_digits")
    monkeypatch.setitem(pretrained.PRETRAINED, entry.name, dataclasses.replace(entry, url="https://example.org/q.ckpt"))
    monkeypatch.setenv(pretrained.ROOT_VARIABLE, str(tmp_path / "no-clone"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    calls = []

    def fake_download(url: str, dst: str, hash_prefix: str, progress: bool) -> None:
        calls.append((url, hash_prefix))
        shutil.copyfile(REPO_ROOT / entry.file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert isinstance(pretrained.load(entry.name), pl.LightningModule)
    assert pretrained.checkpoint_path(entry.name).parent == tmp_path / "hub" / "checkpoints" / "lightning_pdenets"
    assert calls == [("https://example.org/q.ckpt", entry.sha256)]  # the second call used the cached file


@pytest.mark.slow  # one full quickstart fit: 30-200 s on 2 cores, depending on the load
def test_the_documented_quickstart_command_retrains_the_pretrained_quickstart_model_bit_for_bit(tmp_path: Path) -> None:
    """`quickstart_digits` claims to be what `pdenets fit --config configs/quickstart.yaml` trains (1 thread).

    A change to the training arithmetic (a solver backend's order of operations, an initialization, the data split)
    changes the weights and breaks that claim: retrain the checkpoint and record its accuracy again.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_pdenets", "fit", "--config", str(REPO_ROOT / "configs/quickstart.yaml")]
    command += ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    subprocess.run(command, cwd=tmp_path, env=environment, check=True, capture_output=True, timeout=900)

    (best,) = tmp_path.rglob("best-*.ckpt")
    retrained = torch.load(best, map_location="cpu", weights_only=True)
    recorded = torch.load(REPO_ROOT / pretrained.info("quickstart_digits").file, map_location="cpu", weights_only=True)
    assert retrained["epoch"] == recorded["epoch"]
    assert retrained["hyper_parameters"] == recorded["hyper_parameters"]
    differing = [
        name
        for name, value in recorded["state_dict"].items()
        if torch.is_tensor(value) and not torch.equal(value, retrained["state_dict"][name])
    ]
    assert not differing, f"retrained weights differ from the pretrained checkpoint in {differing}"
