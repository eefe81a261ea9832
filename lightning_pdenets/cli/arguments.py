"""Bad arguments as the user sees them: a hint and one short message, exit code 2, never the whole usage.

A misspelled class or argument name gets the closest valid ones; an architecture argument given where
0.3.0 moved it (``network``) gets the new place. The text of jsonargparse's messages is read by
:mod:`lightning_pdenets.cli._library_adapters`, not here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import typing
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import ARCHITECTURES, DATA_FACTS, architecture_parameters
from lightning_pdenets.cli._library_adapters import command_name, failing_parser, parse_error
from lightning_pdenets.cli.exit_codes import EXIT_USAGE

CLASS_PACKAGES = {
    "model": ("lightning_pdenets.models",),
    "data": ("lightning_pdenets.data",),
    "callbacks": ("lightning_pdenets.callbacks", "lightning.pytorch.callbacks"),
    "logger": ("lightning.pytorch.loggers",),
}
"""Where a misspelled class_path of each argument finds its closest valid classes."""


class PDENetsArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are a hint and the message (exit code 2), not the whole usage."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        usage_error(command_name(failing_parser(self, ex)), short_message(message))

    @override
    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse's, with a file that is not text (an image, a checkpoint) refused in one line."""
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError as error:
            raise TypeError(
                f'Parser key "config": {str(path)!r} is not a text file (byte {error.start} is '
                f"{error.object[error.start : error.start + 1]!r}), so not a YAML or JSON config; pass a "
                f".yaml config file (a checkpoint goes to --ckpt_path)."
            ) from None


def usage_error(command: str, message: str) -> NoReturn:
    """Write the hint to ``command --help`` and ``message`` to stderr; exit with :data:`EXIT_USAGE`."""
    sys.stderr.write(f"tip: `{command} --help` lists every option and its default.\nerror: {message}\n")
    sys.exit(EXIT_USAGE)


def debugging() -> bool:
    """Whether ``JSONARGPARSE_DEBUG=true`` asks for full tracebacks instead of short messages."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("true", "yes", "on")


def short_message(message: str) -> str:
    """jsonargparse's message without its union-type noise; a bad class or argument name gets the closest valid ones."""
    problem = parse_error(message)
    if problem.key and problem.class_path and problem.unknown_argument:
        return (
            f"--{problem.key}: {problem.class_path} has no argument {problem.unknown_argument!r}. "
            f"{closest_arguments(problem.class_path, problem.unknown_argument)}"
        )
    if problem.key and problem.class_path and problem.missing_class:
        return (
            f"--{problem.key}: there is no class {problem.class_path!r}. "
            f"{closest_classes(problem.key, problem.class_path)}"
        )
    return problem.summary


def closest_arguments(class_path: str, given: str) -> str:
    """The arguments of ``class_path`` closest to ``given``, or where an argument of that name moved."""
    cls = import_class(class_path)
    if cls is None:
        return ""
    initializers = [vars(klass)["__init__"] for klass in inspect.getmro(cls) if "__init__" in vars(klass)]
    arguments = {
        p for init in initializers for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")
    }
    architecture = getattr(cls, "architecture", None)
    if architecture in ARCHITECTURES and given in set(architecture_parameters(architecture)) - set(DATA_FACTS):
        return (
            f"Did you mean network.{given}? Architecture arguments go in `network` since lightning_pdenets 0.3.0 "
            f"(`--model.init_args.network.{given} VALUE`, or `network: {{{given}: VALUE}}` in YAML)"
        )
    nested = _nested_setting(initializers, given)
    if nested:
        group, key = nested
        return (
            f"Did you mean {group}.{key}? (`--model.init_args.{group}.{key} VALUE`, or `{group}: {{{key}: VALUE}}` "
            f"in YAML)"
        )
    close = difflib.get_close_matches(given, sorted(arguments), n=3, cutoff=0.5)
    return (
        f"Closest valid arguments: {', '.join(close)}."
        if close
        else f"Valid arguments: {', '.join(sorted(arguments))}."
    )


def _nested_setting(initializers: list[Any], given: str) -> tuple[str, str] | None:
    """``('theta', 'lr')`` for ``given='theta_lr'`` when ``theta`` is an argument typed by a TypedDict with ``lr``."""
    for init in initializers:
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):  # an annotation that does not resolve: no hint from this class
            continue
        for name, hint in hints.items():
            keys = {
                key
                for option in (hint, *typing.get_args(hint))
                for key in getattr(option, "__annotations__", {})
                if typing.is_typeddict(option)
            }
            if given.startswith(f"{name}_") and given[len(name) + 1 :] in keys:
                return name, given[len(name) + 1 :]
    return None


def closest_classes(key: str, given: str) -> str:
    """The classes valid for option ``key`` whose names are closest to ``given``."""
    packages = next((names for suffix, names in CLASS_PACKAGES.items() if key.split(".")[-1] == suffix), ())
    classes: dict[str, str] = {}
    for package in packages:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", dir(module)):
            if inspect.isclass(getattr(module, name, None)) and not name.startswith("_"):
                classes.setdefault(name, f"{package}.{name}")
    if not classes:
        return "Give a full import path (package.module.Class)."
    close = difflib.get_close_matches(given.rsplit(".", 1)[-1], list(classes), n=3, cutoff=0.5)
    if close:
        return f"Closest valid classes: {', '.join(classes[name] for name in close)}."
    return f"Valid classes: {', '.join(sorted(classes.values()))}."
