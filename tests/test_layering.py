"""The package's layers: no module imports from a layer above its own, and no import cycle.

Read from the source with :mod:`ast` (every ``import``, also inside functions and under ``TYPE_CHECKING``), so a
lazy import that breaks the layering is caught too. A new top-level module or package needs a line in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_pdenets"

LAYERS = {
    # foundations: imported by every layer, importing none of the layers above
    "lightning_pdenets": 0,  # the package's __init__ (its version) only
    "lightning_pdenets._compat": 0,
    "lightning_pdenets._discovery": 0,
    "lightning_pdenets.checkpoints": 0,
    "lightning_pdenets.errors": 0,
    "lightning_pdenets.interruption": 0,
    "lightning_pdenets.metric_logging": 0,
    "lightning_pdenets.protocols": 0,
    "lightning_pdenets.validation": 0,
    # numerics and data
    "lightning_pdenets.data": 1,
    "lightning_pdenets.dynamics": 1,
    "lightning_pdenets.solvers": 1,
    "lightning_pdenets.blocks": 2,
    "lightning_pdenets.evaluation": 2,  # the toolkit of models and callbacks, below both
    "lightning_pdenets.architectures": 3,  # plain nn.Modules, no Lightning
    "lightning_pdenets.migration": 4,  # reads the architecture registry
    "lightning_pdenets.pretrained": 4,
    "lightning_pdenets.callbacks": 5,
    "lightning_pdenets.models": 5,  # thin LightningModules
    "lightning_pdenets.cli": 6,
    "lightning_pdenets.__main__": 6,
    "lightning_pdenets._console": 6,  # the console script, importing the CLI once Ctrl-C can be answered
}

CALLBACK_IMPORTS = (
    "lightning_pdenets._compat",
    "lightning_pdenets._discovery",
    "lightning_pdenets.callbacks",
    "lightning_pdenets.checkpoints",
    "lightning_pdenets.errors",
    "lightning_pdenets.evaluation",
    "lightning_pdenets.interruption",
    "lightning_pdenets.metric_logging",
    "lightning_pdenets.protocols",
    "lightning_pdenets.solvers",
    "lightning_pdenets.validation",
)
"""What callbacks may import from the package: the protocols and low-level modules, never a model, architecture
or block (they reach blocks through :mod:`lightning_pdenets.protocols`)."""

EVALUATION_IMPORTS = (
    "lightning_pdenets.errors",
    "lightning_pdenets.evaluation",
    "lightning_pdenets.interruption",
    "lightning_pdenets.protocols",
    "lightning_pdenets.solvers",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (``from package import submodule`` names the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "lightning_pdenets" or name.startswith("lightning_pdenets."))
    return found - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> tuple[str, int]:
    """The entry of ``LAYERS`` that ``module`` belongs to: the longest prefix, the package root only exactly."""
    matches = [key for key in LAYERS if module == key or (key != "lightning_pdenets" and module.startswith(key + "."))]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    key = max(matches, key=len)
    return key, LAYERS[key]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module: str) -> None:
    group, rank = _layer(module)
    upward = sorted(target for target in GRAPH[module] if _layer(target)[1] > rank)
    assert not upward, f"{module} (layer {rank}, {group}) imports from higher layers: {upward}"
    if group == "lightning_pdenets.callbacks":
        outside = sorted(target for target in GRAPH[module] if not _within(target, CALLBACK_IMPORTS))
        assert not outside, f"callback module {module} imports {outside}; callbacks use protocols and the toolkit only"
    if group == "lightning_pdenets.evaluation":
        outside = sorted(target for target in GRAPH[module] if not _within(target, EVALUATION_IMPORTS))
        assert not outside, f"{module} imports {outside}; the evaluation toolkit sits below models and callbacks"
    if group == "lightning_pdenets.models":
        callbacks = sorted(target for target in GRAPH[module] if _within(target, ("lightning_pdenets.callbacks",)))
        assert not callbacks, f"model module {module} imports callbacks {callbacks}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target in GRAPH and target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checks_see_a_violation() -> None:
    """The graph is read right: known edges are present, so an empty list of violations means something."""
    assert "lightning_pdenets.evaluation" in GRAPH["lightning_pdenets.models.prnet"]
    assert "lightning_pdenets.blocks.lasso" in GRAPH["lightning_pdenets.models.optim"]
    assert _layer("lightning_pdenets.models.prnet")[1] > _layer("lightning_pdenets.evaluation.figures")[1]
