"""Every bench script starts: ``python bench/NAME.py --help`` prints its usage and exits 0.

The bench scripts are run by hand (BENCHMARKS.md gives each command), so nothing else would notice a script that no
longer starts; ``bench_identification.py --help`` did not (a bare % in a help string) until this test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

BENCH = REPO_ROOT / "bench"
# scripts run in a bench-only virtual environment with a peer library (BENCHMARKS.md says which)
NEEDS = {"bench_torchode.py": "torchode"}
# run by bench_identification.py on a file it writes, in the PySINDy venv; it has no options of its own
NO_COMMAND_LINE = {"pysindy_reference.py"}
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in NO_COMMAND_LINE)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_prints_its_usage(script: str) -> None:
    needed = NEEDS.get(script)
    if needed is not None and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{script} needs {needed} (bench-only venv)")
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]
