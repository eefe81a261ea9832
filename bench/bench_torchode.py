"""ODE-Net MNIST inference with torchode (per-sample step control) against torchdiffeq, side by side (issue 19).

torchode (Lienen & Günnemann 2022) controls the step size of every sample on its own, so one hard sample no
longer shrinks the steps of the whole batch; torchdiffeq controls one RMS error over the batch. This script
loads the weights of a trained ODE-Net (``bench/bench_rnode.py`` writes them to ``bench/rnode_runs/NAME.pt``),
and classifies the same 1,000 test images with the model's own dopri5 (torchdiffeq, rtol = atol = 1e-3) and
with torchode's Dopri5 and integral controller at the same tolerances and the same initial step, alternating
the two, each run once for warm-up. It reports accuracy, the NFE per sample (torchdiffeq: the batch's NFE,
which every sample pays; torchode: each sample's own, and the batch's largest, which is what the batch
waits for) and the wall time. torchode is not a dependency of the package: run this with an environment
that has it, e.g. a venv that reuses the project's packages through a ``.pth`` file.

    python bench/bench_torchode.py --weights bench/rnode_runs/plain.pt --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import missing_data_exits, positive_int  # noqa: E402

from bench.bench_rnode import build  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402


def import_torchode():
    """torchode, a bench-only peer library (not a dependency of the package): imported when the run starts, so that
    ``--help`` works without it."""
    try:
        import torchode
    except ModuleNotFoundError:
        raise SystemExit(
            "bench_torchode.py: error: torchode is not installed here; run this script in the bench-only environment "
            "that has it (BENCHMARKS.md, 'torchode against torchdiffeq')"
        ) from None
    return torchode


def torchode_features(block, y0: torch.Tensor, first_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y(t1) of every sample with torchode's Dopri5 at the block's tolerances, and each sample's NFE."""
    torchode = import_torchode()
    settings = block.solver_settings()
    shape = y0.shape[1:]

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        images = y.view(-1, *shape)
        # torchode passes one time per sample; ODE-Net's field appends t as a channel, which broadcasts per sample
        return block.vector_field(t.view(-1, 1, 1, 1).to(y.dtype), images).flatten(1)

    term = torchode.ODETerm(field)
    controller = torchode.IntegralController(atol=settings["atol"], rtol=settings["rtol"], term=term)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller, max_steps=settings["max_num_steps"])
    n = len(y0)
    problem = torchode.InitialValueProblem(
        y0=y0.flatten(1), t_start=torch.full((n,), settings["t0"]), t_end=torch.full((n,), settings["t1"])
    )
    solution = solver.solve(problem, dt0=torch.full((n,), first_step))
    return solution.ys[:, -1].view(-1, *shape), solution.stats["n_f_evals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args()
    if not args.weights.is_file():
        parser.error(f"--weights {str(args.weights)!r}: no such file")
    import_torchode()
    args.override = []
    with missing_data_exits(args.data_dir):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    model, datamodule = build(args, [])
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    network = model.network
    (block,) = find_ode_blocks(network)
    datamodule.setup("test")
    images = torch.stack([datamodule.test_set[i][0] for i in range(args.images)])
    labels = torch.tensor([datamodule.test_set[i][1] for i in range(args.images)])
    times: dict[str, list[float]] = {"torchdiffeq": [], "torchode": [], "field": []}
    with torch.no_grad():
        y0 = network.stem(images)
        block(y0)
        first_step = float(block.last_step_sizes[0])  # torchdiffeq's initial step, given to torchode alike
        for round_index in range(args.rounds + 1):
            before = block.nfe_forward
            start = time.perf_counter()
            logits = network(images)
            elapsed_diffeq = time.perf_counter() - start
            nfe_diffeq = block.nfe_forward - before
            start = time.perf_counter()
            features, nfe_per_sample = torchode_features(block, network.stem(images), first_step)
            logits_ode = network.head(features)
            elapsed_ode = time.perf_counter() - start
            start = time.perf_counter()  # the vector field alone, as often as torchdiffeq evaluates it
            for _ in range(nfe_diffeq):
                block.vector_field(torch.tensor(0.5), y0)
            elapsed_field = time.perf_counter() - start
            if round_index:  # the first round warms up
                times["torchdiffeq"].append(elapsed_diffeq)
                times["torchode"].append(elapsed_ode)
                times["field"].append(elapsed_field)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    accuracy_ode = (logits_ode.argmax(1) == labels).float().mean().item()
    agreement = (logits.argmax(1) == logits_ode.argmax(1)).float().mean().item()
    nfe = nfe_per_sample.double()
    print(
        f"weights {args.weights}, {args.images} test images in one batch, rtol = atol = {block.solver.rtol:g}, "
        f"{torch.get_num_threads()} thread(s), median of {args.rounds} alternating rounds\n"
    )
    print(
        f"| backend | accuracy | NFE per sample: mean (min–max) | NFE the batch runs | time, {args.images:,} images |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| torchdiffeq dopri5 (batch error norm) | {accuracy:.4f} | {nfe_diffeq} (every sample) | {nfe_diffeq} | "
        f"{statistics.median(times['torchdiffeq']) * 1000:.0f} ms |"
    )
    print(
        f"| torchode Dopri5 (per-sample control) | {accuracy_ode:.4f} | {nfe.mean():.1f} ({nfe.min():.0f}–{nfe.max():.0f}) | "
        f"{nfe.max():.0f} | {statistics.median(times['torchode']) * 1000:.0f} ms |"
    )
    print(
        f"\n{nfe_diffeq} evaluations of the vector field alone on the same batch take "
        f"{statistics.median(times['field']) * 1000:.0f} ms (the rest of torchdiffeq's time is its own work and the "
        f"stem and head)."
    )
    print(
        f"\nPredictions agree on {agreement:.4f} of the images. Command: python bench/bench_torchode.py "
        + " ".join(sys.argv[1:])
    )


if __name__ == "__main__":
    main()
