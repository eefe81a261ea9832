"""The ``pdenets`` CLI under 2-process gloo DDP, as users run it: progress bar on, TensorBoard, default callbacks.

Every run is a subprocess of ``python -m lightning_pdenets`` with the stack-dump hook of tests/hang_dump on
``PYTHONPATH``: a hang ends after ``DUMP_AFTER`` seconds with every rank's stack in the failure message, well
before the test's own timeout. What is run (issue 26): fit, then test/validate/predict from its checkpoint, for
an ODE model and for PR-Net (manual optimization); a fit with every callback preset of callbacks/; SIGTERM
while one rank is stuck in a collective and while an attack runs; torchrun over two "nodes" on this machine;
resuming a SIGTERM-stopped 2-rank run on 2 ranks and on 1.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT
from tests.fakedata import load_all

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(900)]

DUMP_AFTER = 300
"""Seconds after which every process of a run dumps its stacks and exits (a hang)."""

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
PRNET = str(REPO_ROOT / "configs" / "digits" / "prnet.yaml")
DDP_CPU = str(REPO_ROOT / "configs" / "trainer" / "ddp_cpu.yaml")
SHORT = [
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_test_batches",
    "2",
    "--trainer.limit_predict_batches",
    "2",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(port: int | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests" / "hang_dump"), str(REPO_ROOT)]),
        "PDENETS_TEST_DUMP_AFTER": str(DUMP_AFTER),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port or _free_port()),
    }


def start(args: list[str], cwd: Path, command: list[str] | None = None, **environment: str) -> subprocess.Popen:
    """Start ``python -m lightning_pdenets ARGS`` (or ``command``) in its own process group."""
    return subprocess.Popen(
        (command or [sys.executable, "-m", "lightning_pdenets"]) + args,
        cwd=cwd,
        env={**_environment(), **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = DUMP_AFTER + 60) -> subprocess.CompletedProcess:
    """Wait for ``process``; on a time-out kill its whole process group and fail with its output."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"run did not end within {timeout} s:\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def pdenets(args: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    return finish(start(args, cwd, **environment))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-8000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-8000:]
    # the replicated epoch values are logged without a sync: Lightning's advice to sync them must stay silenced
    assert "It is recommended to use `self.log(" not in result.stderr, result.stderr[-4000:]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = DUMP_AFTER) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"run ended (exit {process.returncode}) before {path.name}:\n{process.stderr.read()[-8000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.2)


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- fit, then test/validate/predict from its checkpoint --------------------------------------------------------
MODELS = {"ode": (QUICKSTART, "quickstart"), "prnet": (PRNET, "digits/prnet")}


@pytest.fixture(scope="module", params=list(MODELS))
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A 2-epoch 2-rank fit (then its automatic test) of each model, through the CLI's defaults."""
    config, experiment = MODELS[request.param]
    workdir = tmp_path_factory.mktemp(f"fit_{request.param}")
    result = pdenets(["fit", "--config", config, "--config", DDP_CPU, "--trainer.max_epochs", "2", *SHORT], workdir)
    assert_ok(result)
    assert "test/acc_top1" in result.stdout
    assert (workdir / "logs" / experiment / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return config, workdir


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluation_from_the_checkpoint_of_a_ddp_fit(fitted: tuple[str, Path], subcommand: str) -> None:
    config, workdir = fitted
    result = pdenets([subcommand, "--config", config, "--config", DDP_CPU, "--ckpt_path", "last", *SHORT], workdir)
    assert_ok(result)
    if subcommand == "predict":
        written = {path.name for path in workdir.glob("logs/**/predictions*.csv")}
        assert {"predictions_rank0.csv", "predictions_rank1.csv"} <= written, written  # one file per rank
    else:
        assert f"{'val' if subcommand == 'validate' else 'test'}/acc_top1" in result.stdout


# -- every callback preset -----------------------------------------------------------------------------------
PARABOLIC = str(REPO_ROOT / "configs" / "stl10" / "parabolic.yaml")
PRESET_GROUPS = {
    # RK-Net (fixed step) on digits: the evaluation presets, then the training ones
    "rknet_evaluation": (
        QUICKSTART,
        ["adversarial", "autoattack", "inference_timer", "ood", "solver_swap_check"],
        ["--data.batch_size", "4"],
    ),
    "rknet_training": (
        QUICKSTART,
        ["device_stats", "early_stopping", "ema", "progress_bar", "step_size_adaptation"],
        [],
    ),
    # the same network with an adaptive solver
    "adaptive": (QUICKSTART, ["tolerance_adaptation"], ["--model.init_args.solver.method", "dopri5"]),
    # the parabolic PDE-CNN, which has time-dependent weights and time-stepping blocks (fabricated STL-10)
    "pde_cnn": (PARABOLIC, ["box_projection", "multilevel", "time_tv"], ["--data.batch_size", "4"]),
}
CHEAP = {
    "pgd_steps": 2,
    "spsa_steps": 2,
    "spsa_samples": 4,
    "autoattack_steps": 2,
    "autoattack_queries": 10,
    "num_batches": 1,
}
"""The attack presets' cost settings, lowered for the test; their callbacks and every other setting stay."""


def _cheap_copy(preset: Path, folder: Path) -> Path:
    content = yaml.safe_load(preset.read_text())
    for entry in content["trainer"]["callbacks+"]:
        init_args = entry.get("init_args") or {}
        init_args.update({key: value for key, value in CHEAP.items() if key in init_args})
        if isinstance(init_args.get("epsilons"), list):
            init_args["epsilons"] = init_args["epsilons"][:1]
        if "refine_epochs" in init_args:  # refine after the first epoch; DDP refines the depth only (the preset's
            init_args.update(refine_epochs=[1], refine_weights=False)  # refine_weights says so under DDP)
    copy = folder / preset.name
    copy.write_text(yaml.safe_dump(content))
    return copy


def _without_callbacks(config: str, folder: Path) -> Path:
    """``config`` without its own callbacks, so that the presets that add them again do not duplicate them."""
    content = yaml.safe_load(Path(config).read_text())
    content["trainer"].pop("callbacks+", None)
    copy = folder / Path(config).name
    copy.write_text(yaml.safe_dump(content))
    return copy


def test_every_callback_preset_is_in_a_ddp_group() -> None:
    presets = {path.stem for path in (REPO_ROOT / "callbacks").glob("*.yaml")}
    grouped = {name for _, names, _ in PRESET_GROUPS.values() for name in names}
    assert presets - grouped == set(), "add the new preset to a group of PRESET_GROUPS"


@pytest.mark.parametrize("group", list(PRESET_GROUPS))
def test_short_ddp_fit_with_callback_presets(group: str, tmp_path: Path) -> None:
    config, presets, extra = PRESET_GROUPS[group]
    data_class = yaml.safe_load(Path(config).read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    config = str(_without_callbacks(config, tmp_path))
    args = ["fit", "--config", config, "--config", DDP_CPU, "--trainer.max_epochs", "2", *SHORT, *extra]
    if data_class != "DigitsDataModule":
        args += [f"--data.{key}={value}" for key, value in load_all()[data_class](tmp_path / "data").items()]
    for name in presets:
        if name == "autoattack" and importlib.util.find_spec("torchattacks") is None:
            continue  # the optional extra is not installed (README, "Set up")
        args += ["--config", str(_cheap_copy(REPO_ROOT / "callbacks" / f"{name}.yaml", tmp_path))]
    assert_ok(pdenets(args, tmp_path))


# -- SIGTERM -------------------------------------------------------------------------------------------------
def test_sigterm_ends_a_ddp_job_with_a_rank_stuck_in_a_collective(tmp_path: Path) -> None:
    """Rank 0 waits in a barrier rank 1 never joins; SIGTERM to rank 0 alone ends both within 30 s."""
    process = start(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--config",
            DDP_CPU,
            "--trainer.max_epochs",
            "3",
            *SHORT,
            "--trainer.callbacks+=tests.ddp_faults.SkipCollectiveOnRank1",
        ],
        tmp_path,
    )
    wait_for(tmp_path / "blocked_rank0", process)
    wait_for(tmp_path / "blocked_rank1", process)
    time.sleep(1)
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)  # as `kill PID` would: the watchdog forwards it to rank 1
    result = finish(process, timeout=60)
    assert time.monotonic() - sent < 30
    assert result.returncode == 143, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if "did not stop within" in line]
    assert lines and "--ckpt_path last" in lines[0], result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    deadline = time.monotonic() + 30  # rank 1 is a child: it ends on its own watchdog
    while _pids_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pids_in_group(process.pid), "a rank outlived SIGTERM"
    last = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["epoch"] == 0  # the last good checkpoint, intact and readable
    assert not list(tmp_path.rglob("*.tmp*"))


def _pids_in_group(group: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == group:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def test_sigterm_stops_an_attack_within_seconds_and_says_what_stopped(fitted: tuple[str, Path], tmp_path: Path) -> None:
    config, workdir = fitted
    if config != QUICKSTART:
        pytest.skip("one model is enough")
    last = next(workdir.glob("logs/quickstart/version_0/checkpoints/last.ckpt"))
    process = start(
        [
            "test",
            "--config",
            QUICKSTART,
            "--config",
            str(REPO_ROOT / "callbacks" / "adversarial.yaml"),
            "--ckpt_path",
            str(last),
            "--trainer.callbacks+=tests.ddp_faults.TouchWhenStarted",
            "--trainer.enable_progress_bar",
            "false",
        ],
        tmp_path,
    )
    wait_for(tmp_path / "started_test_rank0", process)
    time.sleep(2)  # inside the attacks of the first batch
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    result = finish(process, timeout=60)
    assert time.monotonic() - sent < 10
    assert result.returncode == 143
    message = result.stderr.strip().splitlines()[-1]
    assert "test stopped by SIGTERM during AdversarialEvaluation's" in message, result.stderr[-3000:]
    assert "run the same command again" in message and "--ckpt_path last" not in message


# -- several nodes on one machine ------------------------------------------------------------------------------
def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = checkpoint(next(folder.glob("logs/quickstart/version_0/checkpoints/last.ckpt")))["state_dict"]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def test_torchrun_two_nodes_matches_two_processes_on_one_node(tmp_path: Path) -> None:
    fit = ["fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", *SHORT, "--test_after_fit", "false"]
    one_node = tmp_path / "one_node"
    one_node.mkdir()
    assert_ok(pdenets([*fit, "--config", DDP_CPU], one_node))
    port = _free_port()
    nodes = []
    for rank in range(2):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "lightning_pdenets",
        ]
        nodes.append(
            start(
                [
                    *fit,
                    "--trainer.accelerator",
                    "cpu",
                    "--trainer.devices",
                    "1",
                    "--trainer.num_nodes",
                    "2",
                    "--trainer.strategy",
                    "ddp",
                ],
                folder,
                command=torchrun,
            )
        )
    for node in nodes:
        # exit codes only: torchrun's agents print a traceback of their own when the other node's agent, which
        # hosts their store, has already exited (its "exit barrier"), after the training ended well
        result = finish(node)
        assert result.returncode == 0, result.stderr[-8000:]
    reference, multinode = _final_weights(one_node), _final_weights(tmp_path / "node0")
    assert reference.keys() == multinode.keys()
    for name in reference:
        torch.testing.assert_close(multinode[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def _epoch_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The epoch-level TensorBoard scalars of a run's version folder (every event file, resumed runs included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "logs" / "quickstart" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("val/") or tag.endswith("_epoch")
    }


# -- resume across world sizes ---------------------------------------------------------------------------------
def test_sigterm_stopped_ddp_fit_resumes_on_two_ranks_and_on_one(tmp_path: Path) -> None:
    fit = ["fit", "--config", QUICKSTART, "--trainer.max_epochs", "3", *SHORT, "--test_after_fit", "false"]
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    assert_ok(pdenets([*fit, "--config", DDP_CPU], reference))

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    process = start(
        [
            *fit,
            "--config",
            DDP_CPU,
            "--trainer.callbacks+=tests.ddp_faults.TouchWhenStarted",
            "--trainer.callbacks.stage=fit",
            "--trainer.callbacks.epoch=1",
            "--trainer.callbacks.batch=0",
        ],
        stopped,
    )
    wait_for(stopped / "started_fit_rank0", process)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    result = finish(process, timeout=90)
    assert result.returncode == 143, result.stderr[-4000:]
    interrupted = checkpoint(stopped / "logs" / "quickstart" / "version_0" / "checkpoints" / "interrupted.ckpt")
    assert interrupted["epoch"] == 1

    on_one = tmp_path / "on_one"
    shutil.copytree(stopped, on_one)
    resumed = pdenets([*fit, "--config", DDP_CPU, "--ckpt_path", "last"], stopped)
    assert_ok(resumed)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    # the default bar names the epoch it resumed in and its total (Lightning's own read "Training: 0/?" there)
    assert re.search(r"Epoch 1: +\d+%\|[^|]*\| \d/3 ", resumed.stdout), resumed.stdout[-2000:]
    finals, expected = _final_weights(stopped), _final_weights(reference)
    for name in expected:
        torch.testing.assert_close(finals[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    logged, uninterrupted = _epoch_curves(stopped), _epoch_curves(reference)
    assert logged.keys() == uninterrupted.keys() and "val/acc_top1" in logged
    for tag, points in uninterrupted.items():  # the same values at the same steps, none twice
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value in logged[tag]] == pytest.approx(
            [value for _, value in points], rel=1e-4, abs=1e-6
        ), tag

    single = pdenets([*fit, "--trainer.devices", "1", "--trainer.strategy", "auto", "--ckpt_path", "last"], on_one)
    assert_ok(single)
    final = checkpoint(on_one / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert final["epoch"] == 2 and final["global_step"] > interrupted["global_step"]
