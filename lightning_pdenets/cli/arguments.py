"""Bad arguments as the user sees them: a hint and one short message, exit code 2, never the whole usage.

A misspelled class, argument, option or settings key gets the closest valid ones; an architecture argument given
where 0.3.0 moved it (``network``) gets the new place. Options are never abbreviated (``--trainer.max_epoch`` is
refused with ``--trainer.max_epochs`` suggested, not taken for it). The text of jsonargparse's messages is read by
:mod:`lightning_pdenets.cli._library_adapters`, not here.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from lightning_pdenets._discovery import import_class
from lightning_pdenets.architectures.registry import ARCHITECTURES, DATA_FACTS, architecture_parameters
from lightning_pdenets.cli._library_adapters import command_name, failing_parser, option_names, parse_error
from lightning_pdenets.cli.exit_codes import EXIT_USAGE, SUBCOMMANDS

CLASS_PACKAGES = {
    "model": ("lightning_pdenets.models",),
    "data": ("lightning_pdenets.data",),
    "callbacks": ("lightning_pdenets.callbacks", "lightning.pytorch.callbacks"),
    "logger": ("lightning.pytorch.loggers",),
}
"""Where a misspelled class_path of each argument finds its closest valid classes."""

_GIVEN_ARGS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("pdenets_given_args", default=())
"""The command-line arguments being parsed, to name the option an error is about as the user typed it."""


class PDENetsArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are a hint and the message (exit code 2), not the whole usage; it takes
    no abbreviated options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # argparse took the misspelled --trainer.max_epoch as max_epochs
        super().__init__(*args, **kwargs)

    @override
    def parse_args(self, args: Any = None, *more: Any, **kwargs: Any) -> Namespace:  # type: ignore[override]
        """jsonargparse's (whose signature is not argparse's overloads), remembering ``args`` for error messages."""
        given = _GIVEN_ARGS.set(tuple(str(arg) for arg in (sys.argv[1:] if args is None else args)))
        try:
            return super().parse_args(args, *more, **kwargs)
        finally:
            _GIVEN_ARGS.reset(given)

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = failing_parser(self, ex)
        command = command_name(parser)
        subcommand = parse_error(message).before_subcommand
        usage_error(f"{command} {subcommand}" if subcommand else command, short_message(message, parser))

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
    """Write the hint to ``command --help`` and ``message`` to stderr; exit with :data:`EXIT_USAGE`.

    ``pdenets --help`` lists the subcommands alone: without a subcommand the hint names ``pdenets fit --help``.
    """
    where = f"`{command} --help`"
    if " " not in command:
        where = f"`{command} {SUBCOMMANDS[0]} --help` (or {', '.join(SUBCOMMANDS[1:])})"
    sys.stderr.write(f"tip: {where} lists every option and its default.\nerror: {message}\n")
    sys.exit(EXIT_USAGE)


def debugging() -> bool:
    """Whether ``JSONARGPARSE_DEBUG=true`` asks for full tracebacks instead of short messages."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("true", "yes", "on")


def short_message(message: str, parser: Any = None) -> str:
    """jsonargparse's message without its union-type noise; a bad class, argument, option or key name gets the
    closest valid ones (an option's from ``parser``, the parser that failed)."""
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
    if problem.key and problem.class_path and problem.typed_argument:
        return f"--{problem.key}: {problem.class_path}: " + unknown_keys(
            problem.class_path, problem.typed_argument, problem.unexpected_keys
        )
    if problem.unrecognized:
        options = option_names(parser) if parser is not None else []
        hints = [(given, closest_options(given, options)) for given in problem.unrecognized]
        hints = [(given, close) for given, close in hints if close]
        if len(problem.unrecognized) == 1 and hints:
            return f"{problem.summary}. Did you mean {' or '.join(hints[0][1])}?"
        if hints:
            return (
                f"{problem.summary}. Did you mean "
                + "; ".join(f"{' or '.join(close)} (for {given})" for given, close in hints)
                + "?"
            )
    if problem.before_subcommand:
        prog = command_name(parser) if parser is not None else "pdenets"
        return (
            f"the --config given before the subcommand sets {problem.option!r}, which only the subcommand takes. Put "
            f"--config after the subcommand: `{prog} {problem.before_subcommand} --config FILE`."
        )
    if problem.missing_value and problem.option:
        typed = _typed_option(problem.option)
        return f"{typed} expects a value: `{typed} VALUE` or `{typed}=VALUE`."
    return problem.summary


def _typed_option(option: str) -> str:
    """The argument the user typed that gave ``option`` no value: ``--data.init_args.data_dir`` for ``--data``."""
    given = _GIVEN_ARGS.get()
    for index, arg in enumerate(given):
        typed = arg == option or arg.startswith(f"{option}.")
        if typed and (index + 1 == len(given) or given[index + 1].startswith("--")):
            return arg
    return option


def closest_options(given: str, options: Iterable[str]) -> list[str]:
    """The option closest to ``given`` (``--trainer.max_epochs`` for ``--trainer.max_epcohs``), among its siblings
    (the options of its group) first; a config file's key (``trainer.max_epcohs``) gets a key."""
    dashes = "--" if given.startswith("--") else ""
    valid = [option for option in options if not option.endswith("+")]  # ``--trainer.callbacks+`` appends
    group, _, name = f"--{given.removeprefix('--')}".rpartition(".")
    siblings = {option.rpartition(".")[2]: option for option in valid if option.rpartition(".")[0] == group}
    close = [siblings[match] for match in difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.7)]
    if not siblings:  # a misspelled group (``--trainr.max_epochs``)
        close = difflib.get_close_matches(f"--{given.removeprefix('--')}", valid, n=1, cutoff=0.8)
    return [dashes + option.removeprefix("--") for option in close]


def unknown_keys(class_path: str, argument: str, keys: Iterable[str]) -> str:
    """What to say about ``keys`` given to ``argument`` of ``class_path``, which its TypedDict does not declare."""
    cls = import_class(class_path)
    valid = sorted(_typed_dict_keys(_hints(cls).get(argument))) if cls is not None else []
    keys = list(keys)
    close = sorted({match for key in keys for match in difflib.get_close_matches(key, valid, n=2, cutoff=0.6)})
    said = f"unknown `{argument}` key(s) {', '.join(repr(key) for key in keys)}"
    if close:
        said += f" (did you mean {' or '.join(repr(key) for key in close)}?)"
    return f"{said}; valid keys are {', '.join(valid)}." if valid else f"{said}."


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
            if given.startswith(f"{name}_") and given[len(name) + 1 :] in _typed_dict_keys(hint):
                return name, given[len(name) + 1 :]
    return None


def _hints(cls: type) -> dict[str, Any]:
    """The type hints of the ``__init__`` arguments of ``cls`` and its bases (a subclass's first)."""
    hints: dict[str, Any] = {}
    for klass in inspect.getmro(cls):
        if "__init__" in vars(klass):
            try:
                found = typing.get_type_hints(vars(klass)["__init__"])
            except (NameError, TypeError):  # an annotation that does not resolve: no hint from this class
                continue
            hints = {**found, **hints}
    return hints


def _typed_dict_keys(hint: Any) -> set[str]:
    """The keys of the TypedDict ``hint`` is, or is a union with (``SolverOptions | None``); empty for other types."""
    return {
        key
        for option in (hint, *typing.get_args(hint))
        if typing.is_typeddict(option)
        for key in getattr(option, "__annotations__", {})
    }


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
