"""The README's "Reusing a callback in your own Lightning project" example runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from tests.conftest import REPO_ROOT

HEADING = "## Reusing a callback in your own Lightning project"


def readme_example(readme: Path = REPO_ROOT / "README.md") -> str:
    """The first ```python block under :data:`HEADING` (before the next second-level heading)."""
    text = readme.read_text()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    section = re.split(r"\n## ", text.split(HEADING, 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no ```python block under {HEADING!r}"
    return blocks[0]


def test_readme_callback_example_runs_and_uses_only_public_api(tmp_path: Path, capsys) -> None:
    code = readme_example()
    assert "from tests" not in code and "lightning_pdenets.models" not in code  # the reader's own model
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    namespace = runpy.run_path(str(script), run_name="__main__")
    swap, nfe = namespace["swap"], namespace["nfe"]
    combinations = swap.results["val"]["combinations"]
    assert {solver for solver, _ in combinations} == {"euler", "rk4", "dopri5"}
    assert all(0.0 <= combo["accuracy"] <= 1.0 for combo in combinations.values())
    assert nfe.last_step["forward"] == 16.0  # rk4: 4 evaluations per step, 4 steps of 0.25 over [0, 1]
    assert "tested with dopri5" in capsys.readouterr().out
    assert not list(tmp_path.glob("lightning_logs")), "the example must not write logs"
