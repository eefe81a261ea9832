"""The behaviours of jsonargparse, Lightning, torchmetrics and torchdiffeq that the package's adapters depend on:
``lightning_pdenets/cli/_library_adapters.py`` (jsonargparse, Lightning), ``lightning_pdenets/_compat/torchmetrics.py``
and ``lightning_pdenets/_compat/torchdiffeq.py``.

No library documents them, so a release may change them without notice. Each test drives the library itself
(a LightningCLI over tiny classes defined here, a Trainer, a metric), not the ``pdenets`` CLI, and its failure
message names the function of the adapter to update. Fast: nothing trains, every CLI stops before its Trainer.
"""

from __future__ import annotations

import signal
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torchdiffeq import odeint
from torchmetrics.classification import MulticlassAccuracy

from lightning_pdenets._compat.torchdiffeq import rms_norm, solver_names
from lightning_pdenets._compat.torchmetrics import mark_updated
from lightning_pdenets.cli._library_adapters import (
    command_name,
    constructor_error,
    failing_parser,
    interrupted_by_ctrl_c,
    parse_error,
)
from lightning_pdenets.cli.arguments import PDENetsArgumentParser
from lightning_pdenets.solvers import SOLVERS
from tests.trainers import quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter", "ignore:No seed found")

ADAPTER = "lightning_pdenets/cli/_library_adapters.py"
HERE = __name__


class TinyBase(pl.LightningModule):
    def __init__(self, width: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        if width < 1:  # raised in a base class's __init__: the owner is still the configured class
            raise ValueError("`width` must be >= 1")
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise KeyboardInterrupt  # Ctrl-C during the first step

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyModel(TinyBase):
    pass


class TinyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("`batch_size` must be >= 1")


class Recorded(Exception):
    """What a parser's ``error`` received: the parser, jsonargparse's message and exception."""


class RecordingParser(LightningArgumentParser):
    """Records the error where ``PDENetsArgumentParser`` rewrites it (nested parsers that raise still raise)."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            super().error(message, ex)
        raise Recorded(self, message, ex)


class FitOnlyCLI(LightningCLI):
    """LightningCLI with the ``fit`` subcommand alone (the others are built the same way, and cost time)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}


def run_cli(args: list[str], cli_class: type[LightningCLI] = FitOnlyCLI) -> LightningCLI:
    return cli_class(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=RecordingParser,
        parser_kwargs={"prog": "prog"},
        args=args,
    )


def recorded_error(args: list[str]) -> tuple[Any, str, Any]:
    with pytest.raises(Recorded) as recorded:
        run_cli(args)
    return recorded.value.args


MODEL = [f"--model={HERE}.TinyModel", f"--data={HERE}.TinyData"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model=TinyModul", f"--data={HERE}.TinyData"],
            dict(key="model", class_path="TinyModul", missing_class=True),
        ),
        (
            [f"--model={HERE}.TinyModul", f"--data={HERE}.TinyData"],
            dict(key="model", class_path=f"{HERE}.TinyModul", missing_class=True),
        ),
        (
            [*MODEL, "--model.init_args.widht=3"],
            dict(key="model", class_path=f"{HERE}.TinyModel", unknown_argument="widht"),
        ),
        (
            [*MODEL, "--trainer.callbacks+=EarlyStoping"],
            dict(key="trainer.callbacks", class_path="EarlyStoping", missing_class=True),
        ),
        (
            [*MODEL, "--trainer.max_epochs=x"],
            dict(key="trainer.max_epochs", summary="--trainer.max_epochs: expected int (got 'x')"),
        ),
    ],
    ids=["short-class-name", "dotted-class-path", "unknown-argument", "appended-callback", "bad-int"],
)
def test_parse_error_reads_jsonargparse_messages(args: list[str], expected: dict[str, Any]) -> None:
    parser, message, ex = recorded_error(["fit", *args])
    problem = parse_error(message)
    found = {name: getattr(problem, name) for name in expected}
    assert found == expected, (
        f"jsonargparse words this error differently now; update parse_error in {ADAPTER} so that it reads "
        f"{expected} from the message (read {found}). The message:\n{message}"
    )
    assert command_name(failing_parser(parser, ex)) == "prog fit", (
        f"the parser of a subcommand error is no longer named 'prog [options] fit'; update command_name in {ADAPTER} "
        f"(its prog is {failing_parser(parser, ex).prog!r})"
    )


def test_an_error_found_by_the_main_parser_names_the_subcommand_parser(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("fit:\n  trainer:\n    max_epochz: 3\n")
    parser, _message, ex = recorded_error([f"--config={config}", "fit", *MODEL])
    assert command_name(failing_parser(parser, ex)) == "prog fit", (
        f"jsonargparse no longer attaches the subcommand's parser to an error about a subcommand's option as "
        f"`subcommand_parser`; update failing_parser in {ADAPTER} (the error: {ex!r}, raised by {parser.prog!r})"
    )


@pytest.mark.parametrize(
    ("args", "owner", "text"),
    [
        (["--model.init_args.width=0"], "TinyModel", "`width` must be >= 1"),
        (["--data.init_args.batch_size=0"], "TinyData", "`batch_size` must be >= 1"),
    ],
    ids=["model", "datamodule"],
)
def test_constructor_error_finds_the_constructors_exception(args: list[str], owner: str, text: str) -> None:
    with pytest.raises(Exception) as raised:
        run_cli(["fit", *MODEL, *args])
    found = constructor_error(raised.value)
    assert found is not None and (found[0], str(found[1])) == (owner, text), (
        f"jsonargparse or LightningCLI wrap a constructor's exception differently now; update constructor_error in "
        f"{ADAPTER} (found {found!r} in {raised.value!r})"
    )


def test_checkpoint_hyperparameters_are_merged_between_parse_arguments_and_before_instantiate_classes(
    tmp_path: Path,
) -> None:
    """What ``PDENetsCLI`` relies on: it checks the checkpoint and reads this run's learning rates in
    ``parse_arguments``, and puts them back over the checkpoint's in ``before_instantiate_classes``."""
    seen = {}

    class Stop(Exception):
        pass

    class RecordingCLI(FitOnlyCLI):
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            super().parse_arguments(parser, args)
            seen["after parse_arguments"] = self.config.fit.model.init_args.lr

        def before_instantiate_classes(self) -> None:
            seen["in before_instantiate_classes"] = self.config.fit.model.init_args.lr
            raise Stop

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"_class_path": f"{HERE}.TinyModel", "width": 1, "lr": 0.5}}, checkpoint)
    with pytest.raises(Stop):
        run_cli(["fit", *MODEL, "--model.init_args.lr=0.01", f"--ckpt_path={checkpoint}"], RecordingCLI)
    assert seen == {"after parse_arguments": 0.01, "in before_instantiate_classes": 0.5}, (
        f"LightningCLI no longer merges the hyperparameters of --ckpt_path into the config between parse_arguments "
        f"and before_instantiate_classes (values of lr seen: {seen}). PDENetsCLI (lightning_pdenets/cli/app.py) "
        f"checks the checkpoint and reads the given learning rates and solver in parse_arguments, and puts them back "
        f"in before_instantiate_classes: move them to the hooks around the new merge point."
    )


def test_ctrl_c_in_a_fit_ends_as_system_exit_1_after_the_interrupt() -> None:
    trainer = quiet_trainer(max_steps=1)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(BaseException) as stopped:
            trainer.fit(TinyModel())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT while it shuts down
    assert interrupted_by_ctrl_c(stopped.value), (
        f"Lightning's Trainer ends a Ctrl-C otherwise than with SystemExit(1) raised while handling the "
        f"KeyboardInterrupt (it raised {stopped.value!r}, context {stopped.value.__context__!r}); update "
        f"interrupted_by_ctrl_c in {ADAPTER}"
    )
    assert isinstance(stopped.value, SystemExit)  # the adapter's first case (a bare KeyboardInterrupt) is not this one


def test_a_metric_with_restored_states_computes_as_updated() -> None:
    """``lightning_pdenets/_compat/torchmetrics.py``: the epoch-metric resume of ``ClassifierModule``."""
    source = MulticlassAccuracy(num_classes=3, average="micro")
    source.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    restored = MulticlassAccuracy(num_classes=3, average="micro")
    for name, value in source.metric_state.items():
        setattr(restored, name, value.clone())
    mark_updated(restored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns when compute() comes before any counted update
        try:
            value = restored.compute()
        except UserWarning as warning:
            pytest.fail(
                f"torchmetrics no longer counts updates in Metric._update_count ({warning}); update "
                f"mark_updated in lightning_pdenets/_compat/torchmetrics.py"
            )
    assert restored.update_called and value == source.compute()


def test_torchdiffeq_offers_every_method_of_the_framework() -> None:
    """``lightning_pdenets/_compat/torchdiffeq.py``: the check of ``lightning_pdenets.solvers`` at import."""
    names = solver_names()
    assert names is not None and set(SOLVERS) <= names, (
        f"torchdiffeq's method table is no longer torchdiffeq._impl.odeint.SOLVERS or lacks methods the framework "
        f"offers ({sorted(set(SOLVERS) - (names or set()))}); update solver_names in lightning_pdenets/_compat/torchdiffeq.py"
    )


def test_rms_norm_is_torchdiffeqs_default_error_norm() -> None:
    """An adaptive solve of y alone (torchdiffeq's default norm) and of (y, an integral) with the norm of y alone
    take the same steps: what an ODE block's RNODE integrals rely on."""

    def decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -2.0 * y * torch.cos(3.0 * t)

    def decay_and_integral(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return decay(t, state[0]), state[0].pow(2).sum().reshape(1) * 50.0  # an integral the norm must ignore

    y0, times = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    alone = odeint(decay, y0, times, method="dopri5", rtol=1e-4, atol=1e-6)
    together = odeint(
        decay_and_integral,
        (y0, torch.zeros(1, dtype=torch.float64)),
        times,
        method="dopri5",
        rtol=1e-4,
        atol=1e-6,
        options={"norm": lambda tensors: rms_norm(tensors[0])},
    )
    assert torch.equal(alone[-1], together[0][-1]), (
        "torchdiffeq's default error norm is no longer the root mean square of the state; update rms_norm in "
        "lightning_pdenets/_compat/torchdiffeq.py to the new default"
    )


class RecordingPDENetsParser(PDENetsArgumentParser):
    """The CLI's parser (its ``parse_path``), recording errors as :class:`RecordingParser` does."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            super().error(message, ex)
        raise Recorded(self, message, ex)


def test_a_config_that_is_not_text_reaches_parse_path_as_a_decode_error(tmp_path: Path) -> None:
    """``PDENetsArgumentParser.parse_path`` (lightning_pdenets/cli/arguments.py) refuses a binary ``--config`` in one
    line: jsonargparse reads every config file through ``parse_path`` and lets the ``UnicodeDecodeError`` through."""
    image = tmp_path / "image.yaml"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(Recorded) as recorded:
        FitOnlyCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=RecordingPDENetsParser,
            args=["fit", f"--config={image}"],
        )
    message = recorded.value.args[1]
    assert "is not a text file (byte 0 is b'\\x89')" in message, (
        f"jsonargparse no longer reads a config file through parse_path, or wraps its UnicodeDecodeError; update "
        f"PDENetsArgumentParser.parse_path in lightning_pdenets/cli/arguments.py (the message: {message!r})"
    )
