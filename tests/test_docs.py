"""The documentation site: `mkdocs build --strict` passes (and fails on a broken reference), every callback and model
family has its page, the executed notebooks are those of notebooks/, and headless Chromium renders the signatures of
the ODEBlock and SolverSwapCheck pages (screenshots kept). Needs the `docs` extra; the browser check Chromium."""

from __future__ import annotations

import html
import inspect
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.docs

for _module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter", "nbformat"):
    pytest.importorskip(_module, reason="install the docs extra: pip install -e '.[docs]'")

NOTEBOOKS = sorted(path.stem for path in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCREENSHOT_DIR_VARIABLE = "PDENETS_DOCS_SCREENSHOTS"
"""If set, the browser test copies its screenshots into this folder."""


def _mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(REPO_ROOT / "mkdocs.yml", site, REPO_ROOT)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return site


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_site_holds_the_readme_benchmarks_families_and_pretrained_models(site: Path) -> None:
    home = _text(site / "index.html")
    assert "pdenets fit --config configs/quickstart.yaml" in home and "Usage" in home
    assert "mkdocs serve" in home  # the README names the command that serves the site
    assert "MNIST at paper scale" in _text(site / "BENCHMARKS" / "index.html")
    for family, classes in {
        "neural_odes": ["ResNetModule", "RKNetModule", "ODENetModule"],
        "prnet": ["PRNetModule"],
        "pde_cnn": ["ParabolicCNNModule", "HamiltonianCNNModule"],
        "lm_resnet": ["LMResNetModule"],
        "mobilenet": ["IsometricMobileNetModule"],
        "base": ["ClassifierModule"],
    }.items():
        text = _text(site / "models" / family / "index.html")
        assert all(name in text for name in classes), family
    pretrained_page = _text(site / "pretrained" / "index.html")
    from lightning_pdenets.pretrained import PRETRAINED

    for entry in PRETRAINED.values():
        assert entry.name in pretrained_page and entry.sha256[:16] in pretrained_page
    assert "MLFLOW_ALLOW_FILE_STORE" in _text(site / "tracking" / "index.html")


def test_every_exported_callback_has_a_page_with_its_preset(site: Path) -> None:
    hooks = runpy.run_path(str(REPO_ROOT / "docs" / "hooks.py"))
    import lightning_pdenets.callbacks as callbacks

    names = hooks["exported_callbacks"]()
    assert {"SolverSwapCheck", "NFEMonitor", "EMAWeights", "AdversarialEvaluation"} <= set(names)
    assert set(names) == {
        n
        for n in callbacks.__all__
        if inspect.isclass(getattr(callbacks, n))
        and issubclass(getattr(callbacks, n), __import__("lightning").pytorch.Callback)
    }
    for name in names:
        text = _text(site / "callbacks" / name / "index.html")
        assert f"from lightning_pdenets.callbacks import {name}" in text
        assert re.search(rf"class\s+{name}\b|{name}\(", text), f"{name}: no signature"
    assert "callbacks/solver_swap_check.yaml" in _text(site / "callbacks" / "SolverSwapCheck" / "index.html")


def test_the_executed_notebooks_are_those_of_notebooks_and_show_outputs(site: Path) -> None:
    import nbformat

    for name in NOTEBOOKS:
        source = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        executed = nbformat.read(REPO_ROOT / "docs" / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (source, executed)]
        assert code[0] == code[1], f"docs/notebooks/{name}.ipynb is stale: run python docs/execute_notebooks.py {name}"
        outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert [o for o in outputs if "image/png" in o.get("data", {})], f"{name} shows no figure"
        page = (site / "notebooks" / name / "index.html").read_text()
        assert "data:image/png;base64," in page, f"{name}: the site shows no figure"


def test_a_broken_reference_fails_the_strict_build(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(
        "# Broken\n\nSee [the block][lightning_pdenets.blocks.ode.NoSuchBlock].\n\n::: lightning_pdenets.blocks.ode.ODEBlock\n"
    )
    (tmp_path / "mkdocs.yml").write_text(
        json.dumps(
            {
                "site_name": "broken",
                "theme": {"name": "material"},
                "plugins": ["autorefs", {"mkdocstrings": {"handlers": {"python": {"paths": [str(REPO_ROOT)]}}}}],
            }
        )
    )
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    assert result.returncode != 0
    assert "Could not find cross-reference target 'lightning_pdenets.blocks.ode.NoSuchBlock'" in result.stderr


def _chromium() -> str | None:
    return next(
        (
            shutil.which(name)
            for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
            if shutil.which(name)
        ),
        None,
    )


def _signature_text(page: str) -> str:
    """Text of the page's first rendered signature block (mkdocstrings' ``doc-signature``)."""
    match = re.search(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', page, flags=re.S)
    assert match, "no signature block in the rendered page"
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1)))


@pytest.mark.parametrize(
    ("page", "qualified"),
    [
        ("api/ode_block", "lightning_pdenets.blocks.ode.ODEBlock"),
        ("callbacks/SolverSwapCheck", "lightning_pdenets.callbacks.solver_swap.SolverSwapCheck"),
    ],
)
def test_chromium_renders_the_signature(site: Path, tmp_path: Path, page: str, qualified: str) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium (apt-get install -y chromium)")
    url = (site / page / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1600"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    module, _, name = qualified.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    signature = _signature_text(dom)
    assert signature.lstrip().startswith(name + "(")
    parameters = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    assert parameters and all(p in signature for p in parameters), (parameters, signature)

    screenshot = tmp_path / f"{page.replace('/', '_')}.png"
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (1600, 1280)
    assert len({tuple(row) for row in pixels[::8, ::8, :3].reshape(-1, 3).round(2).tolist()}) > 20  # not blank
    if os.environ.get(SCREENSHOT_DIR_VARIABLE):
        target = Path(os.environ[SCREENSHOT_DIR_VARIABLE])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target / screenshot.name)
