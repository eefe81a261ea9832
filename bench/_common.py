"""Helpers the bench scripts share: argparse types for counts, checks of --output and --data-dir, named checkpoints.

Not a script: the bench scripts import it (``from _common import ...``; ``python bench/NAME.py`` puts ``bench/`` first
on ``sys.path``). A bad count, an unwritable output or a checkpoint of the wrong model is refused before the work
starts, as an argparse error (exit status 2) that names the option.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

MODEL_CLASSES = {
    "resnet": "ResNetModule",
    "rknet": "RKNetModule",
    "odenet": "ODENetModule",
    "prnet": "PRNetModule",
    "prnet_seed1": "PRNetModule",
}
"""The model class (its name) of each trained MNIST checkpoint that the scripts take as NAME=PATH."""


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def fraction(text: str) -> float:
    """An argparse ``type``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def check_output(parser: argparse.ArgumentParser, path: str | Path | None, option: str = "--output") -> None:
    """``parser.error`` unless ``path`` (when given) can be written: its folder exists and is writable, and it is
    not a folder itself."""
    if path is None:
        return
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        parser.error(f"{option} {str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        parser.error(f"{option} {str(path)!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"{option} {str(path)!r} is not writable")


@contextlib.contextmanager
def missing_data_exits(data_dir: str | Path, option: str = "--data-dir") -> Iterator[None]:
    """Turn the library's :class:`DatasetNotFoundError` (whose advice, ``--data.download true``, is the CLI's)
    into one line that names the folder and ``option``, and exit status 2."""
    from lightning_pdenets.errors import DatasetNotFoundError

    try:
        yield
    except DatasetNotFoundError as error:
        what = str(error).split(". ", 1)[0]  # "MNIST was not found under '/x' (expected MNIST/raw/ with ...)"
        prog = Path(sys.argv[0]).name
        print(
            f"{prog}: error: {option} {str(data_dir)!r}: {what}. Point {option} at the folder that holds it "
            "(the bench scripts never download).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def named_path(
    parser: argparse.ArgumentParser, option: str, item: str, names: Sequence[str] = tuple(MODEL_CLASSES)
) -> tuple[str, Path]:
    """``NAME=PATH`` → (NAME, PATH); ``parser.error`` unless NAME is one of ``names``."""
    name, separator, path = item.partition("=")
    if not separator or name not in names or not path:
        parser.error(f"{option} takes NAME=PATH with NAME one of {', '.join(names)}; got {item!r}")
    return name, Path(path)


def load_model(path: str | Path):
    """The LightningModule saved in ``path`` (the class LightningCLI recorded), in eval mode, on the CPU."""
    from lightning_pdenets.checkpoints import checkpoint_class_path, load_checkpoint

    class_path = checkpoint_class_path(load_checkpoint(path))
    if class_path is None:
        raise ValueError(f"{path} records no model class; pass a checkpoint written by `pdenets fit`.")
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).load_from_checkpoint(path, map_location="cpu").eval()


def check_named_checkpoint(parser: argparse.ArgumentParser, option: str, name: str, path: Path) -> None:
    """``parser.error`` unless ``path`` is a readable checkpoint of the model class that ``name`` stands for."""
    from lightning_pdenets.checkpoints import checkpoint_class_path, load_checkpoint

    if not path.is_file():
        parser.error(f"{option} {name}={path}: no such file")
    try:
        class_path = checkpoint_class_path(load_checkpoint(path))
    except Exception as error:  # corrupt, truncated, untrusted: the library's error says which
        parser.error(f"{option} {name}={path}: {error}")
    if class_path is None:
        parser.error(
            f"{option} {name}={path}: the checkpoint records no model class; pass one written by `pdenets fit`"
        )
    expected = MODEL_CLASSES.get(name)
    found = class_path.rpartition(".")[2]
    if expected is not None and found != expected:
        parser.error(f"{option} {name}={path}: the checkpoint holds a {found}, not the {expected} of {name!r}")


def named_checkpoints(
    parser: argparse.ArgumentParser, option: str, items: Sequence[str], names: Sequence[str] = tuple(MODEL_CLASSES)
) -> dict[str, Path]:
    """Every ``NAME=PATH`` of ``items`` checked by :func:`named_path` and :func:`check_named_checkpoint`."""
    paths = dict(named_path(parser, option, item, names) for item in items)
    for name, path in paths.items():
        check_named_checkpoint(parser, option, name, path)
    return paths
