"""DDP on 2 CPU processes (gloo) for every LightningModule and every callback (tests/ddp_cases.py).

Each case trains on 2 ranks with per-process batch 8 and on one process with batch 16. Both ranks
must hold bit-identical parameters, buffers, solver settings, callback state and logged metrics,
and match the single process within the case's tolerance: gradients, BatchNorm statistics
(frozen on CPU, see tests/ddp_cases.py), metrics and NFE are all reduced over the ranks, and evaluation sees every
sample exactly once.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_pdenets import callbacks as callback_package
from lightning_pdenets import models as model_package
from lightning_pdenets.data.loading import check_global_batch_size
from tests.conftest import REPO_ROOT
from tests.ddp_cases import CASES

pytestmark = pytest.mark.ddp
RUNNER = REPO_ROOT / "tests" / "ddp_runner.py"
PER_PROCESS_BATCH = 8
BASE_CLASSES = {"ClassifierModule", "PDECNNModule", "PRNetAlgorithmModule"}


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` free TCP ports, all different (the sockets are held open together while choosing)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case on 2 ranks and on 1 process, launched concurrently.

    The 2-rank cases share one process group per launch; a case that ends with the group closed
    (``breaks_process_group``) gets a 2-rank launch of its own.
    """
    out_dir = tmp_path_factory.mktemp("ddp_matrix")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    breaking = [name for name, case in CASES.items() if case.breaks_process_group]
    plans = [("shared", 2, [name for name in CASES if name not in breaking]), ("single", 1, [])]
    plans += [(name, 2, [name]) for name in breaking]
    launches = []
    for (folder, devices, names), port in zip(plans, _distinct_free_ports(len(plans))):
        (out_dir / folder).mkdir()
        batch = PER_PROCESS_BATCH * (2 // devices)
        launches.append(
            subprocess.Popen(
                [sys.executable, str(RUNNER), str(out_dir / folder), str(devices), str(batch), *names],
                # concurrent launches must not race for the same rendezvous port
                env={**env, "MASTER_PORT": str(port)},
                cwd=out_dir / folder,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results: dict[str, dict[str, Any]] = {"rank0_of_2": {}, "rank1_of_2": {}, "rank0_of_1": {}, "stderr": {}}
    for (folder, _, _), launch in zip(plans, launches):
        _, stderr = launch.communicate(timeout=1200)
        assert launch.returncode == 0, stderr[-5000:]
        results["stderr"][folder] = stderr
        for key in results:
            if (out_dir / folder / f"{key}.pt").exists():
                results[key].update(torch.load(out_dir / folder / f"{key}.pt", weights_only=False))
    return results


def _exported_classes(package: Any, base: type) -> set[str]:
    return {
        name
        for name in package.__all__
        if inspect.isclass(getattr(package, name)) and issubclass(getattr(package, name), base)
    }


def test_every_module_and_callback_has_a_ddp_case() -> None:
    covered = {name for case in CASES.values() for name in case.covers}
    modules = _exported_classes(model_package, pl.LightningModule) - BASE_CLASSES
    callbacks = _exported_classes(callback_package, pl.Callback)
    assert modules - covered == set(), "add a case to tests/ddp_cases.py for these LightningModules"
    assert callbacks - covered == set(), "add a case to tests/ddp_cases.py for these callbacks"


def _close(a: float, b: float, atol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + 1e-4 * abs(b)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if not case.rank_errors])
def test_ranks_agree_and_match_one_process(matrix: dict[str, Any], name: str) -> None:
    case = CASES[name]
    rank0, rank1, single = (matrix[key][name] for key in ("rank0_of_2", "rank1_of_2", "rank0_of_1"))
    assert rank0["error"] == rank1["error"] == single["error"] == case.expect_error
    assert rank0["steps"] == rank1["steps"] == single["steps"] > 0
    # the ranks are bit-identical ...
    assert rank0["state"].keys() == rank1["state"].keys()
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), f"{key} differs between the ranks"
    assert rank0["solver_settings"] == rank1["solver_settings"]
    assert rank0["callback_states"] == rank1["callback_states"]
    assert rank0["metrics"] == rank1["metrics"]
    assert rank0["checkpoints"].keys() == rank1["checkpoints"].keys()
    # ... and equal to one process with the same global batch
    for key, value in rank0["state"].items():
        reference = single["state"][key]
        if value.is_floating_point():
            assert torch.allclose(value, reference, atol=case.atol, rtol=1e-4), (
                f"{key}: max |2 ranks - 1 process| = {(value - reference).abs().max():.2e}"
            )
        else:
            assert torch.equal(value, reference), key
    assert rank0["metrics"].keys() == single["metrics"].keys()
    compared = {k for k in rank0["metrics"] if not any(part in k for part in case.rank_only_metrics)}
    mismatched = {
        k: (rank0["metrics"][k], single["metrics"][k])
        for k in compared
        if not _close(rank0["metrics"][k], single["metrics"][k], case.atol)
    }
    assert not mismatched, f"metrics differ from the single process: {mismatched}"
    assert rank0["checkpoints"].keys() == single["checkpoints"].keys()
    for checkpoint, state in rank0["checkpoints"].items():
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.allclose(value, single["checkpoints"][checkpoint][key], atol=case.atol, rtol=1e-4)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.rank_errors])
def test_a_failure_on_one_rank_stops_every_rank(matrix: dict[str, Any], name: str) -> None:
    case = CASES[name]
    ranks = [matrix[key][name] for key in ("rank0_of_2", "rank1_of_2")]
    assert [rank["error_type"] for rank in ranks] == list(case.rank_errors)
    peer_message = {
        "adjoint_failure_in_backward_on_one_rank": "another DDP process crashed during the backward pass",
        # Lightning's epoch-end metric sync is the first collective after the loop: torch's own message
        "solver_failure_in_validation_on_one_rank": "Connection closed by peer",
    }
    assert peer_message.get(name, "another DDP process stopped at global step") in ranks[0]["error"]
    assert "max_num_steps" in ranks[1]["error"] and "Try" in ranks[1]["error"]
    assert ("in the backward (adjoint) pass" in ranks[1]["error"]) == (
        name == "adjoint_failure_in_backward_on_one_rank"
    )
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between the ranks"
    assert ranks[0]["checkpoints"] == {}, "a model failure must not write an interrupt checkpoint"


def test_interrupted_ddp_run_leaves_one_checkpoint_with_the_trained_weights(matrix: dict[str, Any]) -> None:
    result = matrix["rank0_of_2"]["checkpoint_on_interrupt"]
    assert list(result["checkpoints"]) == ["interrupted.ckpt"]
    saved = result["checkpoints"]["interrupted.ckpt"]
    assert all(torch.equal(saved[key], value) for key, value in result["state"].items() if key in saved)


def test_box_projection_keeps_weights_in_the_box_on_every_rank(matrix: dict[str, Any]) -> None:
    for key in ("rank0_of_2", "rank1_of_2"):
        state = matrix[key]["box_projection"]["state"]
        projected = [value for name, value in state.items() if name.endswith("control_points")]
        assert projected and all(value.abs().max() <= 0.05 + 1e-7 for value in projected)


def test_stochastic_depth_case_dropped_blocks(matrix: dict[str, Any]) -> None:
    # same seed and initialization as the "lm_resnet" case: the weights differ only if a branch was dropped
    with_drops = matrix["rank0_of_2"]["lm_resnet_stochastic_depth"]["state"]
    without = matrix["rank0_of_2"]["lm_resnet"]["state"]
    assert with_drops.keys() == without.keys()
    assert any(not torch.equal(value, without[key]) for key, value in with_drops.items())


def test_no_epoch_metric_is_logged_rank_local(matrix: dict[str, Any]) -> None:
    # Lightning's warning for epoch-level values logged without sync_dist under DDP
    assert "It is recommended to use `self.log(" not in matrix["stderr"]["shared"]


def test_global_batch_size_must_divide_by_the_number_of_processes() -> None:
    assert check_global_batch_size(256, 4) == 64
    assert check_global_batch_size(None, 4) is None
    with pytest.raises(ValueError, match="`global_batch_size`=100 is not divisible by the 3 processes"):
        check_global_batch_size(100, 3)


def test_predictions_of_the_ranks_cover_every_sample_once_and_match_one_process(matrix: dict[str, Any]) -> None:
    shares = [matrix[key]["prediction_writer"]["predictions"] for key in ("rank0_of_2", "rank1_of_2")]
    # both ranks write into one folder, each its own file
    assert all(
        f"predictions_rank{rank}.pt" in share and "predictions.pt" not in share for rank, share in enumerate(shares)
    )
    merged = {
        name: torch.cat([share[f"predictions_rank{rank}.pt"][name] for rank, share in enumerate(shares)])
        for name in ("sample_index", "probabilities", "labels")
    }
    single = matrix["rank0_of_1"]["prediction_writer"]["predictions"]["predictions.pt"]
    order = merged["sample_index"].argsort()
    assert torch.equal(merged["sample_index"][order], torch.arange(len(single["sample_index"])))
    assert torch.equal(single["sample_index"], torch.arange(len(single["sample_index"])))
    assert torch.allclose(merged["probabilities"][order], single["probabilities"], atol=1e-5)
    assert torch.equal(merged["labels"][order], single["labels"])
