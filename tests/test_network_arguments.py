"""One way from model to architecture: a `network` dict checked against the registered factory's signature."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_pdenets.models as models
from lightning_pdenets.architectures.registry import (
    ARCHITECTURES,
    DATA_FACTS,
    MODEL_SUPPLIED_ARGUMENTS,
    architecture_parameters,
    create_architecture,
)
from lightning_pdenets.cli import build_cli
from lightning_pdenets.errors import ConfigurationError
from lightning_pdenets.migration import (
    UPGRADED_FROM_KEY,
    VERSION_KEY,
    LegacyCheckpointError,
    check_layout,
    upgrade_checkpoint,
)
from lightning_pdenets.models import ClassifierModule, LMResNetModule, ODENetModule, PRNetModule, ResNetModule

REPO_ROOT = Path(__file__).resolve().parents[1]

MODEL_CLASSES = sorted(
    (
        cls
        for cls in vars(models).values()
        if inspect.isclass(cls) and issubclass(cls, ClassifierModule) and getattr(cls, "architecture", None)
    ),
    key=lambda cls: cls.__name__,
)
SUPPLIED = MODEL_SUPPLIED_ARGUMENTS


def _own_init_parameters(cls: type) -> set[str]:
    """Names of the parameters of every ``__init__`` written in the model classes of ``cls``'s hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass.__module__.startswith("lightning_pdenets.models"):
            names.update(inspect.signature(vars(klass)["__init__"]).parameters)
    return names


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_no_model_repeats_its_architectures_arguments(cls: type) -> None:
    architecture_only = set(architecture_parameters(cls.architecture)) - set(DATA_FACTS) - set(SUPPLIED)
    assert not architecture_only & _own_init_parameters(cls), "architecture arguments belong in `network`"


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_defaults_are_the_factorys_and_are_stored_complete(cls: type) -> None:
    parameters = architecture_parameters(cls.architecture)
    model = cls(network=_tiny_network(cls))
    expected = {name: p.default for name, p in parameters.items() if name not in DATA_FACTS and name not in SUPPLIED}
    expected.update(_tiny_network(cls))
    stored = model.hparams.network
    assert set(stored) == set(expected)
    for name, value in expected.items():
        assert stored[name] == (list(value) if isinstance(value, tuple) else value), name
    for fact in DATA_FACTS:
        if fact in parameters and fact != "image_size":
            assert model.hparams[fact] == parameters[fact].default  # resolved, so the checkpoint says what was built


def _tiny_network(cls: type) -> dict:
    """Small settings of the model's architecture (the registry's tiny configuration, less data facts and solver)."""
    tiny = ARCHITECTURES[cls.architecture].tiny_kwargs
    return {k: v for k, v in tiny.items() if k not in DATA_FACTS and k not in SUPPLIED}


def test_the_model_builds_exactly_the_factorys_network() -> None:
    torch.manual_seed(0)
    model = ResNetModule(network={"width": 8, "num_downsamples": 1, "num_blocks": 2}, in_channels=3, num_classes=7)
    torch.manual_seed(0)
    direct = create_architecture("resnet_chen", in_channels=3, num_classes=7, width=8, num_downsamples=1, num_blocks=2)
    assert model.network.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.network.state_dict().values(), direct.state_dict().values()))


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            {"widht": 8},
            r"unknown `network` setting\(s\) 'widht' \(did you mean 'width'\?\); valid names are \['width', 'num_downsamples', 'activation'\]",
        ),
        ({"width": "wide"}, r"`network.width` expected int, got 'wide'"),
        ({"in_channels": 3}, r"'in_channels' describes the data; set `model.init_args.in_channels` instead"),
        ({"solver": {"method": "rk4"}}, r"'solver' is set by its own model argument `solver`"),
    ],
)
def test_bad_network_settings_name_the_key_and_the_fix(network: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ODENetModule(network=network)


def test_image_size_pairs_must_be_square_for_architectures_that_take_it() -> None:
    assert (
        PRNetModule(network={"width": 4, "num_downsamples": 0}, image_size=(8, 8), in_channels=1).hparams.image_size
        == 8
    )
    with pytest.raises(ConfigurationError, match=r"needs square images, but `image_size` is 8x6"):
        PRNetModule(network={"width": 4, "num_downsamples": 0}, image_size=(8, 6), in_channels=1)
    ResNetModule(network={"width": 4}, image_size=(8, 6))  # takes no image_size: any shape


def test_network_settings_from_the_command_line_and_yaml_reach_the_architecture(tmp_path: Path) -> None:
    cli = build_cli(
        ["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.width", "6"], run=False
    )
    assert cli.model.hparams.network == {
        "width": 6,
        "num_downsamples": 1,
        "activation": "relu",
    }  # the config's num_downsamples kept
    assert cli.model.network.head[-1].in_features == 6
    assert (cli.model.hparams.in_channels, cli.model.hparams.num_classes, cli.model.hparams.image_size) == (
        1,
        10,
        (8, 8),
    )

    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    network: {width: 5, num_downsamples: 0}\n")
    cli = build_cli(["--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--config", str(override)], run=False)
    assert cli.model.hparams.network == {"width": 5, "num_downsamples": 0, "activation": "relu"}


def test_a_misspelled_network_setting_on_the_command_line_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        build_cli(
            ["fit", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--model.init_args.network.widht", "6"]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown `network` setting(s) 'widht' (did you mean 'width'?)" in err and "Traceback" not in err


def _flat_checkpoint(tmp_path: Path, with_class_path: bool) -> tuple[Path, LMResNetModule]:
    """A checkpoint in 0.2.0's layout: the architecture's arguments flat among the hyperparameters."""
    model = LMResNetModule(network={"depth": 20, "base_width": 4, "k_mode": "channel"})
    hparams = {k: v for k, v in model.hparams.items() if k != "network"}
    hparams.update(model.hparams.network)
    if with_class_path:  # as LightningCLI records them
        hparams.update(
            _class_path="lightning_pdenets.models.LMResNetModule",
            _instantiator="lightning.pytorch.cli.instantiate_module",
        )
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            VERSION_KEY: "0.2.0",
            "pytorch-lightning_version": "2.6.0",
        },
        path,
    )
    return path, model


def test_a_checkpoint_with_flat_architecture_arguments_names_its_release_and_upgrades(tmp_path: Path) -> None:
    old, model = _flat_checkpoint(tmp_path, with_class_path=True)
    with pytest.raises(
        LegacyCheckpointError,
        match=r"written by lightning_pdenets 0\.2\.0, whose models took flat "
        r"architecture arguments .*python -m lightning_pdenets\.migration",
    ):
        LMResNetModule.load_from_checkpoint(old)

    new = tmp_path / "new.ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pdenets.migration", str(old), str(new)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    upgraded = torch.load(new, weights_only=True)
    assert upgraded["hyper_parameters"]["network"] == model.hparams.network
    assert (upgraded[VERSION_KEY], upgraded[UPGRADED_FROM_KEY]) == ("0.3.0", "0.2.0")
    assert "depth" not in upgraded["hyper_parameters"] and upgraded["hyper_parameters"]["in_channels"] == 3
    check_layout(upgraded, new)
    restored = LMResNetModule.load_from_checkpoint(new).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(restored(x), model.eval()(x))
    assert upgrade_checkpoint(upgraded)["hyper_parameters"] == upgraded["hyper_parameters"]  # idempotent


def test_a_flat_checkpoint_without_its_model_class_asks_for_it(tmp_path: Path) -> None:
    old, model = _flat_checkpoint(tmp_path, with_class_path=False)
    with pytest.raises(LegacyCheckpointError, match=r"--model lightning_pdenets\.models\.lm_resnet\.LMResNetModule"):
        LMResNetModule.load_from_checkpoint(old)  # the command names the class it was loaded into

    new = tmp_path / "new.ckpt"
    refused = subprocess.run(
        [sys.executable, "-m", "lightning_pdenets.migration", str(old), str(new)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "pass the model class of the run" in refused.stderr and not new.exists()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_pdenets.migration",
            str(old),
            str(new),
            "--model",
            "lightning_pdenets.models.LMResNetModule",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert LMResNetModule.load_from_checkpoint(new).hparams.network == model.hparams.network


@pytest.mark.parametrize(
    ("argument", "hint"),
    [
        (
            "--model.init_args.width=6",
            "has no argument 'width'. Did you mean network.width? Architecture arguments go in "
            "`network` since lightning_pdenets 0.3.0 (`--model.init_args.network.width VALUE`",
        ),
        ("--model.init_args.netwrk.width=6", "has no argument 'netwrk'. Closest valid arguments: network."),
    ],
)
def test_an_architecture_argument_outside_network_points_to_it(argument: str, hint: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        build_cli(["fit", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), argument])
    assert stop.value.code == 2
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize(
    ("architecture", "kwargs", "images", "message"),
    [
        # a bare "Calculated padded input size per channel: (3 x 3). Kernel size: (4 x 4)" before
        ("resnet_chen", dict(width=4, num_downsamples=3, num_blocks=1), (1, 8, 8), r"`num_downsamples`=3: .* <= 2\."),
        ("odenet_chen", dict(width=4, num_downsamples=3), (1, 8, 8), r"`num_downsamples`=3: .* <= 2\."),
        # "Kernel size can't be greater than actual input size" before
        (
            "mobilenetv3_isometric",
            dict(channels=8, expanded_channels=16, num_blocks=1, patch_size=16),
            (3, 8, 8),
            r"images of 8x8 pixels are smaller than the stem's patches \(`patch_size` 16\); use `patch_size` <= 8",
        ),
    ],
)
def test_images_too_small_for_the_stem_are_a_configuration_error_naming_the_fix(
    architecture: str, kwargs: dict, images: tuple[int, ...], message: str
) -> None:
    network = create_architecture(architecture, in_channels=images[0], num_classes=3, **kwargs)
    with pytest.raises(ConfigurationError, match=message):
        network(torch.zeros(2, *images))


def test_a_bottleneck_without_channels_is_refused_at_construction() -> None:
    # a bare "weight of size [0, 3, 1, 1]" RuntimeError at the first batch before
    with pytest.raises(ValueError, match=r"`hidden_channels` must be an integer >= 1, got 0"):
        create_architecture("image_odenet", hidden_channels=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(network=[1, 2]), r"`network` must be a mapping of architecture 'odenet_chen'.s settings"),
        (dict(network="width=8"), r"`network` must be a mapping"),  # was "cannot convert dictionary update sequence"
        (dict(image_size=-1), r"`image_size` must be a positive side or a \(height, width\) pair of them, got -1"),
        (dict(image_size="28"), r"`image_size` must be a positive side"),  # was accepted and stored
        (dict(num_classes=1), r"`num_classes` must be an integer >= 2, got 1"),  # failed inside torchmetrics
        (dict(in_channels=0), r"`in_channels` must be an integer >= 1, got 0"),
    ],
)
def test_data_facts_and_network_of_the_wrong_kind_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ODENetModule(**kwargs)


@pytest.mark.parametrize(
    ("inputs", "fix"),
    [
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.float64),
            r"torch\.float64 inputs; convert them with x\.to\(torch\.float32",
        ),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), r"torch\.uint8 inputs; convert them to floats first"),
    ],
)
def test_inputs_of_another_dtype_than_the_weights_are_named(inputs: torch.Tensor, fix: str) -> None:
    # a bare "Input type (double) and bias type (float) should be the same" before
    with pytest.raises(TypeError, match=r"ResNetModule has torch\.float32 weights but got " + fix):
        ResNetModule(network={"width": 4, "num_blocks": 1})(inputs)
