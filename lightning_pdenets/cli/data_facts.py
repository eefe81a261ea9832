"""The datamodule's data facts (``DATA_FACTS``: ``image_size``, ``num_classes``, ...) reach the model's arguments
by LightningCLI argument linking; a config or checkpoint value that contradicts them is refused, not dropped."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from lightning_pdenets.architectures.registry import DATA_FACTS
from lightning_pdenets.errors import ConfigurationError


def link_data_to_model(parser: LightningArgumentParser) -> None:
    """Link the datamodule's data facts (``DATA_FACTS``) to the model's arguments of the same name.

    LightningCLI argument linking, applied when the classes are instantiated, so configs never repeat them. Every
    model takes them (an architecture that does not use one ignores it); a datamodule without such an attribute
    leaves the model's argument alone.
    """
    for name in DATA_FACTS:
        parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def stored_facts(checkpoint: dict) -> dict[str, Any]:
    """The data facts (``image_size``, ...) a checkpoint's model was trained with."""
    stored = checkpoint.get("hyper_parameters") or {}
    return {name: stored[name] for name in DATA_FACTS if isinstance(stored, dict) and stored.get(name) is not None}


def check_linked_values(
    model_config: Any, datamodule: Any, ckpt_path: str | None = None, checkpoint_facts: dict[str, Any] | None = None
) -> None:
    """Refuse a config value that contradicts the datamodule: linking would drop it silently.

    A value that came from ``ckpt_path`` (Lightning merges the checkpoint's arguments into the config) is the
    trained model's, so the message says so instead of advising to edit the config.
    """
    init_args: Any = model_config.get("init_args") if hasattr(model_config, "get") else None
    if datamodule is None or not hasattr(init_args, "get"):
        return
    facts = checkpoint_facts or {}
    for name in DATA_FACTS:
        given, expected = init_args.get(name), getattr(datamodule, name, None)
        if given is None or expected is None or _same_fact(given, expected):
            continue
        if name in facts and _same_fact(given, facts[name]):
            raise ConfigurationError(
                f"checkpoint {ckpt_path!r} holds a model trained with `{name}` {facts[name]!r}, but "
                f"{type(datamodule).__name__} gives {expected!r}, which it cannot take. Use data with {name} "
                f"{facts[name]!r} (the datamodule it was trained on), or train a model for this data: a "
                f"fresh run without --ckpt_path."
            )
        raise ConfigurationError(
            f"`model.init_args.{name}` is {given!r}, but {type(datamodule).__name__} gives {expected!r}: it is taken "
            f"from the datamodule, so remove it from the model's config."
        )


def _same_fact(given: Any, expected: Any) -> bool:
    """Whether two values of a data fact agree (a square ``image_size`` may be one side or a pair)."""

    def as_pair(value: Any) -> tuple[Any, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    return as_pair(given) == as_pair(expected)
