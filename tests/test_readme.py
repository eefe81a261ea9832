"""README's set-up commands are the ones CI and users run."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("## Usage", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("pdenets fit --config configs/quickstart.yaml")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "rm -rf .ci/venv" in ci
    assert readme_commands()[1] in ci.splitlines()
