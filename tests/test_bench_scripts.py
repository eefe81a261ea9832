"""The bench scripts start, and refuse bad arguments before any work: ``python bench/NAME.py --help`` prints its
usage and exits 0; a bad count, an unwritable output, a report with no input is an argparse error (exit status 2).

The bench scripts are run by hand (BENCHMARKS.md gives each command), so nothing else would notice a script that no
longer starts; ``bench_identification.py --help`` did not (a bare % in a help string) until this test. None of these
tests reads MNIST: the argument errors come before any data, and the one full run uses synthetic data.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cli

BENCH = REPO_ROOT / "bench"
# run by bench_identification.py on a file it writes, in the PySINDy venv; it has no options of its own
NO_COMMAND_LINE = {"pysindy_reference.py"}
# _common.py: the helpers the scripts share, not a script
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in NO_COMMAND_LINE and not p.name.startswith("_"))
CHECKPOINTS = BENCH / "checkpoints" / "mnist"


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run a bench script's ``__main__`` in this process (argument errors need no fresh interpreter): its exit
    status and stderr."""

    def run(script: str, *args: str) -> tuple[int | str | None, str]:
        monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
        monkeypatch.syspath_prepend(str(BENCH))  # what `python bench/NAME.py` puts first on sys.path
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        return exited.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_prints_its_usage(script: str) -> None:
    # bench_torchode.py imports torchode (bench-only venv) when it runs, so its usage prints without it
    result = run_script(str(BENCH / script), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]


BAD_COUNTS = [
    ("bench_autoattack.py", "--images", "0"),
    ("bench_autoattack.py", "--images", "-3"),
    ("bench_autoattack.py", "--batch-size", "0"),
    ("bench_autoattack.py", "--pgd-steps", "0"),
    ("bench_autoattack.py", "--threads", "0"),
    ("bench_ddp.py", "--steps", "0"),
    ("bench_identification.py", "--seeds", "0"),
    ("bench_inference_threads.py", "--rounds", "1"),  # the first round is a warm-up: no median without a second
    ("bench_inference_threads.py", "--threads", "0"),
    ("bench_lm_resnet.py", "--batch-size", "0"),
    ("bench_lm_resnet.py", "--rounds", "0"),
    ("bench_mnist.py", "--epochs", "0"),
    ("bench_mnist.py", "--batch-size", "-1"),
    ("bench_mnist.py", "--train-fraction", "0"),
    ("bench_mnist.py", "--test-fraction", "1.5"),
    ("bench_ott_mnist.py", "--test-size", "0"),
    ("bench_ott_mnist.py", "--test-size", "-5"),
    ("bench_ott_mnist.py", "--batch-size", "0"),
    ("bench_overhead.py", "--threads", "0"),
    ("bench_overhead.py", "--rounds", "0"),
    ("bench_paper_scale.py", "--rounds", "0"),
    ("bench_paper_scale.py", "--pgd-steps", "0"),
    ("bench_pde_cnn.py", "--steps", "0"),
    ("bench_pretrained.py", "--threads", "-2"),
    ("bench_prnet.py", "--repeats", "0"),
    ("bench_prnet.py", "--steps", "0"),
    ("bench_prnet_speed.py", "--images", "0"),
    ("bench_rnode.py", "--swap-batches", "0"),
    ("bench_robustness.py", "--rounds", "0"),
    ("bench_same_training.py", "--steps", "-1"),
    ("bench_solve_speed.py", "--rounds", "0"),
    ("bench_solve_speed.py", "--threads", "0"),
    ("bench_solver_adaptation.py", "--epochs", "0"),
    ("bench_torchode.py", "--images", "0"),
    ("check_stl10_lr.py", "--steps", "0"),
    ("check_stl10_lr.py", "--batch-size", "-1"),
]


@pytest.mark.parametrize(("script", "option", "value"), BAD_COUNTS)
def test_a_bad_count_is_an_argument_error(run_main, script: str, option: str, value: str) -> None:
    code, stderr = run_main(script, option, value)
    assert code == 2, stderr
    assert f"argument {option}:" in stderr, stderr


@pytest.mark.parametrize(
    ("script", "option"),
    [
        ("bench_lm_resnet.py", "--output"),
        ("bench_mnist.py", "--output"),
        ("bench_solver_adaptation.py", "--out"),
        ("bench_ott_mnist.py", "--out"),
        ("bench_ott_mnist.py", "--figure"),
        ("check_stl10_lr.py", "--output"),
    ],
)
def test_an_output_in_a_missing_folder_is_refused_before_the_work(
    run_main, tmp_path: Path, script: str, option: str
) -> None:
    target = tmp_path / "no_such_folder" / "out.md"
    code, stderr = run_main(script, option, str(target))
    assert code == 2, stderr
    assert option in stderr and "does not exist" in stderr, stderr


def test_a_missing_data_folder_is_one_line_naming_it(run_main, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    code, stderr = run_main("bench_inference_threads.py", "--data-dir", str(missing), "--threads", "1")
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and str(missing) in stderr and "--data-dir" in stderr, stderr
    assert "--data.download" not in stderr  # the CLI's advice: these scripts have no such option


def test_autoattack_refuses_a_report_without_records(run_main, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    output = tmp_path / "table.md"
    code, stderr = run_main("bench_autoattack.py", "--report", str(empty), "--output", str(output))
    assert code == 2 and "no records" in stderr, stderr
    assert not output.exists()
    code, stderr = run_main("bench_autoattack.py", "--report", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "no such file" in stderr, stderr


def test_autoattack_checkpoint_needs_a_name_of_its_model(run_main, tmp_path: Path) -> None:
    raw = str(tmp_path / "raw.jsonl")
    code, stderr = run_main("bench_autoattack.py", "--checkpoint", str(CHECKPOINTS / "resnet.ckpt"), "--raw", raw)
    assert code == 2, stderr
    assert "NAME=PATH" in stderr and "resnet, rknet, odenet, prnet" in stderr, stderr
    code, stderr = run_main("bench_autoattack.py", "--checkpoint", f"prnet={CHECKPOINTS / 'resnet.ckpt'}", "--raw", raw)
    assert code == 2 and "ResNetModule, not the PRNetModule" in stderr, stderr
    assert not Path(raw).exists()


def test_paper_scale_refuses_tables_without_input(run_main, tmp_path: Path) -> None:
    figure = BENCH / "mnist_paper_scale_val_accuracy.png"
    before = figure.stat().st_mtime_ns if figure.exists() else None
    output = tmp_path / "tables.md"
    code, stderr = run_main("bench_paper_scale.py", "--output", str(output))
    assert code == 2 and "--checkpoint NAME=PATH" in stderr, stderr
    code, stderr = run_main("bench_paper_scale.py", "--tables", "curves", "--output", str(output))
    assert code == 2 and "--curve NAME=PATH" in stderr, stderr
    # a checkpoint without TensorBoard logs next to it: the folder and --curve named, before any work
    checkpoint = tmp_path / "run" / "checkpoints" / "resnet.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes((CHECKPOINTS / "resnet.ckpt").read_bytes())
    code, stderr = run_main(
        "bench_paper_scale.py", "--checkpoint", f"resnet={checkpoint}", "--tables", "curves", "--output", str(output)
    )
    assert code == 2, stderr
    assert str(tmp_path / "run") in stderr and "--curve resnet=PATH" in stderr, stderr
    assert not output.exists()
    assert (figure.stat().st_mtime_ns if figure.exists() else None) == before  # the committed figure untouched


def test_ott_mnist_refuses_unknown_runs_and_partial_batches(run_main) -> None:
    code, stderr = run_main("bench_ott_mnist.py", "--runs", "euler_h1", "eulr_h1")
    assert code == 2 and "'eulr_h1'" in stderr and "euler_h1_2" in stderr, stderr
    # SolverSwapCheck evaluates whole batches: 1 image of a 500-image batch would measure 500 and record 1
    code, stderr = run_main("bench_ott_mnist.py", "--test-size", "1", "--batch-size", "500")
    assert code == 2 and "--test-size 1" in stderr and "multiple of --batch-size" in stderr, stderr
    code, stderr = run_main("bench_ott_mnist.py", "--full-check", "700")
    assert code == 2 and "--full-check 700" in stderr, stderr


def test_mnist_refuses_a_missing_config_and_fails_when_every_config_fails(run_main, tmp_path: Path) -> None:
    code, stderr = run_main("bench_mnist.py", "--configs", str(tmp_path / "typo.yaml"))
    assert code == 2 and "typo.yaml" in stderr, stderr
    code, stderr = run_main("bench_mnist.py", "--configs", "--inference-only")
    assert code == 2 and "--configs" in stderr, stderr
    bad = []
    for name in ("first", "second"):  # no data section: the CLI rejects the script's --data.init_args.data_dir
        bad.append(tmp_path / f"{name}.yaml")
        bad[-1].write_text("model:\n  class_path: lightning_pdenets.models.ResNetModule\n")
    result = run_script(str(BENCH / "bench_mnist.py"), "--configs", *map(str, bad), "--output", str(tmp_path / "t.md"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "2 of 2 config(s) failed" in result.stderr and "first.yaml" in result.stderr, result.stderr[-2000:]


def test_torchode_without_torchode_says_so_in_one_line(tmp_path: Path) -> None:
    if importlib.util.find_spec("torchode") is not None:
        pytest.skip("torchode is installed here")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    result = run_script(str(BENCH / "bench_torchode.py"), "--weights", str(weights))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "BENCHMARKS.md" in result.stderr, result.stderr


def test_solver_adaptation_runs(tmp_path: Path) -> None:
    """The whole script at its smallest scale (one seed, one epoch; 2-D concentric spheres, generated): every
    setup builds its model (the 0.2 ``solver={...}`` form) and trains."""
    output = tmp_path / "table.md"
    result = run_script(
        str(BENCH / "bench_solver_adaptation.py"), "--seeds", "0", "--epochs", "1", "--out", str(output), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| Euler", "| dopri5"))]
    assert len(rows) == 7, output.read_text()
