"""mkdocs hooks: one generated page per callback class exported by ``lightning_pdenets.callbacks`` (with its preset
from ``callbacks/*.yaml``), listed under the "Callbacks" section of the navigation, so a new callback gets its page
without editing ``mkdocs.yml``; and the repository files that README.md and BENCHMARKS.md link to (figures, result
tables), published at the same relative paths so that those links work on the site."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
SECTION = "Callbacks"
INCLUDED = ("README.md", "BENCHMARKS.md")
"""Repository files included whole into pages at the top of docs/ (index.md, BENCHMARKS.md)."""
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def exported_callbacks() -> dict[str, str]:
    """``{class name: module}`` of every public callback class of ``lightning_pdenets.callbacks``."""
    import lightning.pytorch as pl

    import lightning_pdenets.callbacks as callbacks

    found = {}
    for name in callbacks.__all__:
        value = getattr(callbacks, name)
        if inspect.isclass(value) and issubclass(value, pl.Callback) and not name.startswith("_"):
            found[name] = value.__module__
    return dict(sorted(found.items()))


def presets(name: str) -> list[Path]:
    """The preset files of ``callbacks/`` that add the callback ``name``."""
    line = f"class_path: lightning_pdenets.callbacks.{name}"
    return sorted(
        path
        for path in (REPO / "callbacks").glob("*.yaml")
        if any(text.strip().removeprefix("- ") == line for text in path.read_text().splitlines())
    )


def page(name: str, module: str) -> str:
    lines = [f"# {name}", "", f"`from lightning_pdenets.callbacks import {name}`", ""]
    for preset in presets(name):
        relative = preset.relative_to(REPO)
        lines += [f"Preset `{relative}`:", "", "```yaml", preset.read_text().rstrip(), "```", ""]
    lines += [f"::: {module}.{name}", ""]
    return "\n".join(lines)


def pretrained_table() -> str:
    """Markdown table of :data:`lightning_pdenets.pretrained.PRETRAINED`."""
    from lightning_pdenets.pretrained import PRETRAINED

    rows = ["| name | model | data | test accuracy | config | file | SHA-256 |", "|---|---|---|---|---|---|---|"]
    for entry in PRETRAINED.values():
        config = " ".join([f"`{entry.config}`", *(f"`{argument}`" for argument in entry.fit_arguments)])
        rows.append(
            f"| `{entry.name}` | {entry.model.rsplit('.', 1)[-1]} | {entry.dataset} | {entry.test_accuracy:.4f} "
            f"| {config} | `{entry.file}` | `{entry.sha256[:16]}…` |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "{{ pretrained_table }}" in markdown:
        markdown = markdown.replace("{{ pretrained_table }}", pretrained_table())
    return markdown


def on_config(config: Any) -> Any:
    for entry in config.nav:
        if isinstance(entry, dict) and SECTION in entry:
            entry[SECTION] = [{name: f"callbacks/{name}.md"} for name in exported_callbacks()]
    return config


def linked_repository_files(docs_files: set[str]) -> list[str]:
    """Relative paths of the repository files README.md and BENCHMARKS.md link to, other than documentation pages."""
    found = set()
    for name in INCLUDED:
        for target in LINK.findall((REPO / name).read_text()):
            if "://" in target or target.startswith(("/", "..", "mailto:")) or target in docs_files:
                continue
            if (REPO / target).is_file():
                found.add(target)
    return sorted(found)


def on_files(files: Any, config: Any) -> Any:
    for name, module in exported_callbacks().items():
        files.append(File.generated(config, f"callbacks/{name}.md", content=page(name, module)))
    for target in linked_repository_files({file.src_uri for file in files}):
        files.append(File.generated(config, target, abs_src_path=str(REPO / target)))
    return files
