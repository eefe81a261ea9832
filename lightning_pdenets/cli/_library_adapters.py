"""What the CLI needs from jsonargparse and Lightning that their public APIs do not give, in one place.

Each function below depends on a behaviour that neither library documents. ``tests/test_library_adapters.py``
checks every one of them against the installed releases, and its failure message names the function here to
update; no other module of the CLI reads error text, exception attributes or tracebacks of these libraries.

* :func:`parse_error`: the wording of jsonargparse's (and argparse's) error messages (they raise no structured
  errors).
* :func:`option_names`: the option strings of a parser (argparse keeps them in ``_option_string_actions``).
* :func:`failing_parser` and :func:`command_name`: the subcommand parser jsonargparse attaches to an error, and
  the `` [options]`` it puts in a subcommand parser's ``prog``.
* :func:`constructor_error`: how jsonargparse (and LightningCLI's instantiator) wrap the exception that a
  class's constructor raised while the classes of a config are instantiated.
* :func:`interrupted_by_ctrl_c`: how Lightning's Trainer ends on Ctrl-C (``SystemExit(1)`` raised while handling
  the ``KeyboardInterrupt``).

The CLI also relies on two behaviours of public methods that their documentation leaves open: LightningCLI merges the
hyperparameters stored in ``--ckpt_path`` into the config after :meth:`LightningCLI.parse_arguments` returns and
before :meth:`LightningCLI.before_instantiate_classes` runs; and jsonargparse reads a config file through
``ArgumentParser.parse_path``, letting the ``UnicodeDecodeError`` of a binary file through (see
``PDENetsArgumentParser.parse_path``). The same test file checks both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

# Lines of jsonargparse's union-type report that say nothing about the user's mistake.
_NOISE = re.compile(
    r"^\s*(- )?(Expected a <class 'NoneType'>|Given value type:|Given value:|Subtypes:|Errors:"
    r"|Does not validate against any of the Union subtypes)"
)

_LIBRARY_MODULES = ("jsonargparse", "lightning.pytorch.cli", "pytorch_lightning.cli")
"""Modules whose frames raise the wrappers around a constructor's error, not the error itself."""


@dataclass(frozen=True)
class ArgumentProblem:
    """What a jsonargparse error message says, as far as the CLI rewrites it.

    Attributes:
        key: The option the message is about, without dashes (``model``, ``trainer.callbacks``), or ``None``.
        class_path: A class path that names no class (``missing_class``) or whose class lacks an argument.
        unknown_argument: The argument name the class of ``class_path`` does not take, or ``None``.
        missing_class: Whether ``class_path`` names no importable class.
        typed_argument: The argument of ``class_path`` (typed by a TypedDict, e.g. ``solver``) given
            ``unexpected_keys``, or ``None``.
        unexpected_keys: The keys of ``typed_argument`` that its TypedDict does not declare.
        unrecognized: Options no parser took: ``--trainer.max_epcohs`` on the command line, ``trainer.max_epcohs`` in
            a config file.
        before_subcommand: The subcommand before which a config (``pdenets --config FILE fit``) set ``option``.
        option: The option given before the subcommand, or given without its value (``--data`` for a
            ``--data.init_args.data_dir`` given last).
        missing_value: Whether ``option`` was given without the value it takes.
        summary: The whole message on one line without jsonargparse's union-type noise, keys written as ``--key:``,
            the value given appended as ``(got '...')``.
    """

    key: str | None
    class_path: str | None = None
    unknown_argument: str | None = None
    missing_class: bool = False
    typed_argument: str | None = None
    unexpected_keys: tuple[str, ...] = ()
    unrecognized: tuple[str, ...] = ()
    before_subcommand: str | None = None
    option: str | None = None
    missing_value: bool = False
    summary: str = ""


def parse_error(message: str) -> ArgumentProblem:
    """Read jsonargparse's error ``message`` (the text it passes to ``ArgumentParser.error``)."""
    key_match = re.search(r'Parser key "([^"]+)"', message)
    key = key_match.group(1) if key_match else None
    class_problem = re.search(r"Problem with given class_path '([^']+)':\s*\n?\s*(.+)", message)
    if key and class_problem:
        class_path, detail = class_problem.group(1), class_problem.group(2).strip()
        detail_and_rest = message[class_problem.start(2) :]
        unknown_option = re.match(r"Option '([^']+)' is not accepted", detail) or re.match(
            r"unrecognized arguments: --([A-Za-z_]\w*)", detail
        )  # a nested key under an unknown name
        if unknown_option:
            return ArgumentProblem(key, class_path, unknown_argument=unknown_option.group(1))
        if "has no attribute" in detail or "No module named" in detail:
            return ArgumentProblem(key, class_path, missing_class=True)
        # a TypedDict argument of the class (``solver``) given keys it does not declare
        typed = re.search(r'Parser key "(\w+)":.*?Unexpected keys: \{([^}]*)\}', detail_and_rest, flags=re.S)
        if typed:
            keys = tuple(re.findall(r"'([^']*)'", typed.group(2)))
            return ArgumentProblem(key, class_path, typed_argument=typed.group(1), unexpected_keys=keys)
    unrecognized = re.match(r"unrecognized arguments: (.*)", message)  # on the command line, values among them
    if unrecognized:
        options = tuple(word.split("=", 1)[0] for word in unrecognized.group(1).split() if word.startswith("--"))
        return ArgumentProblem(None, unrecognized=options, summary=message.strip())
    in_config = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", message)  # a config file's key
    if in_config:
        return ArgumentProblem(None, unrecognized=(in_config.group(1),), summary=message.strip())
    before = re.match(r"Option '([^']+)' is not accepted before subcommand '(\w+)'", message)
    if before:
        return ArgumentProblem(None, option=before.group(1), before_subcommand=before.group(2), summary=message)
    no_value = re.match(r"argument (--\S+): expected one argument", message)
    if no_value:
        return ArgumentProblem(None, option=no_value.group(1), missing_value=True, summary=message)
    bad_name = re.search(r"Expected a dot import path string: (\S+)", message)
    if key and bad_name:
        return ArgumentProblem(key, bad_name.group(1), missing_class=True)
    lines = [line.strip() for line in message.splitlines() if line.strip() and not _NOISE.match(line)]
    given = re.search(r"^\s*Given value: (?!NestedArg)(.*)$", message, flags=re.M)
    if given:
        lines.append(f"(got {given.group(1)!r})")
    summary = re.sub(r'Parser key "([^"]+)":', r"--\1:", " ".join(lines))
    return ArgumentProblem(key, summary=re.sub(r"- Expected a <class '([^']+)'>", r"expected \1", summary))


def option_names(parser: Any) -> list[str]:
    """The long option strings ``parser`` takes (``--trainer.max_epochs``, ``--model``, ...)."""
    return [name for name in getattr(parser, "_option_string_actions", {}) if name.startswith("--")]


def failing_parser(parser: Any, error: BaseException | None) -> Any:
    """The parser an error belongs to: the subcommand's parser jsonargparse attached to ``error``, else ``parser``."""
    return getattr(error, "subcommand_parser", None) or parser


def command_name(parser: Any) -> str:
    """The command a parser reads as typed: ``pdenets fit`` (jsonargparse's prog: ``pdenets [options] fit``)."""
    return parser.prog.replace(" [options]", "")


def constructor_error(error: BaseException | None) -> tuple[str | None, BaseException] | None:
    """The exception a class's constructor raised behind jsonargparse's wrapping, with the name of that class.

    Follows ``error``'s chain (``__cause__``, else ``__context__``) to the first exception raised outside
    jsonargparse and LightningCLI; its class is that of the ``self`` of the outermost ``__init__`` in its
    traceback (the class the config names, also when a base class's ``__init__`` raised). ``None`` when every
    exception of the chain is the libraries' own (a bad value that parsing did not catch).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = list(_traceback_frames(error))
        raised_in = str(frames[-1].f_globals.get("__name__", "")) if frames else ""
        if not any(raised_in == module or raised_in.startswith(f"{module}.") for module in _LIBRARY_MODULES):
            owner = next(
                (
                    type(frame.f_locals["self"]).__name__
                    for frame in frames
                    if frame.f_code.co_name == "__init__" and "self" in frame.f_locals
                ),
                None,
            )
            return owner, error
        error = error.__cause__ or error.__context__
    return None


def _traceback_frames(error: BaseException) -> Iterator[FrameType]:
    traceback = error.__traceback__
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


def interrupted_by_ctrl_c(stop: BaseException) -> bool:
    """Whether ``stop`` ends a run that Ctrl-C interrupted.

    Lightning's Trainer catches the ``KeyboardInterrupt``, tears the run down and calls ``sys.exit(1)``, so the
    ``SystemExit`` carries the interrupt as its context; outside the Trainer the interrupt arrives as itself.
    """
    if isinstance(stop, KeyboardInterrupt):
        return True
    return isinstance(stop, SystemExit) and stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt)
