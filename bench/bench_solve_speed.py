"""Issue 27: how close an ODE block's solve comes to the cost of its vector field, per backend, side by side.

Loads the committed trained ODE-Net and RK-Net (``bench/checkpoints/mnist``), takes the stem's output of the
first ``--images`` MNIST test images, and times in interleaved rounds (order rotated each round, median reported):

* ``inference``: ODE-Net (dopri5, rtol = atol = 1e-3) and RK-Net (rk4, h = 0.25) under ``no_grad``: the block's
  solve with each backend (``native``, ``torchdiffeq``; torchode's Dopri5 with one batch-wide error norm, eager and
  under ``torch.compile``, when torchode is importable), and NFE evaluations of the vector field on the same state
  (``f × NFE``), the yardstick.
* ``training``: one forward and backward pass of the ODE block on a training batch (``--batch``), with the
  adjoint and with backpropagation through the solver, against its parts: the NFE evaluations of f of the forward
  pass, and the f evaluations plus vector-Jacobian products its backward needs, each timed alone.

torchode is not a dependency: run with an environment that has it (a bench-only venv whose ``.pth`` file points at
the project's site-packages), e.g.

    OMP_NUM_THREADS=1 /tmp/benchvenv27/bin/python bench/bench_solve_speed.py --data-dir /work/shared/data --threads 1 2
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets.checkpoints import checkpoint_class_path, load_checkpoint  # noqa: E402
from lightning_pdenets.data import MNISTDataModule  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402

try:
    import torchode
except ImportError:  # pragma: no cover - bench-only dependency
    torchode = None


def load_model(path: Path):
    class_path = checkpoint_class_path(load_checkpoint(path))
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).load_from_checkpoint(path, map_location="cpu").eval()


def test_images(data_dir: str, count: int) -> torch.Tensor:
    data = MNISTDataModule(data_dir=data_dir, download=False)
    data.setup("test")
    return next(iter(torch.utils.data.DataLoader(data.test_set, batch_size=count)))[0]


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant over ``rounds`` rounds (one warm-up), the order rotated every round."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        variants[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def torchode_solver(block, compiled: bool):
    """torchode's Dopri5 with one error norm over the batch (as torchdiffeq and the native loop control it)."""
    settings = block.solver_settings()
    shape = None

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return block.vector_field(t[0], y.view(shape)).view(1, -1)

    term = torchode.ODETerm(field)
    controller = torchode.IntegralController(atol=settings["atol"], rtol=settings["rtol"], term=term)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller, max_steps=settings["max_num_steps"])
    run = torch.compile(solver.solve) if compiled else solver.solve  # compiling the module would leave .solve eager

    def solve(y0: torch.Tensor) -> torch.Tensor:
        nonlocal shape
        shape = y0.shape
        problem = torchode.InitialValueProblem(y0=y0.reshape(1, -1), t_start=torch.zeros(1), t_end=torch.ones(1))
        solution = run(problem)
        solve.nfe = int(solution.stats["n_f_evals"].max())
        return solution.ys[:, -1].view(shape)

    return solve


def field_times(block, y0: torch.Tensor, count: int) -> Callable[[], object]:
    times = [torch.tensor(i / max(count - 1, 1), dtype=y0.dtype) for i in range(count)]
    return lambda: [block.vector_field(t, y0) for t in times]


def inference(models: dict, y0s: dict, rounds: int, with_torchode: bool, torchode_compile: bool) -> list[str]:
    lines = ["| model | what | NFE | time (median) | vs f × NFE |", "|---|---|---|---|---|"]
    for name, model in models.items():
        (block,) = find_ode_blocks(model)
        y0 = y0s[name]
        variants: dict[str, Callable[[], object]] = {}
        nfe: dict[str, int] = {}
        for backend in ("native", "torchdiffeq"):
            def run(backend=backend):
                block.configure_solver(backend=backend)
                before = block.nfe_forward
                block(y0)
                nfe[backend] = block.nfe_forward - before
            variants[backend] = run
        with torch.no_grad():
            for run in list(variants.values()):
                run()
        variants["f × NFE"] = field_times(block, y0, nfe["native"])
        nfe["f × NFE"] = nfe["native"]
        if with_torchode and block.solver.is_adaptive:
            for compiled in (False, True) if torchode_compile else (False,):
                label = "torchode" + (" + torch.compile" if compiled else "")
                try:
                    solve = torchode_solver(block, compiled)
                    with torch.no_grad():
                        solve(y0)
                    variants[label] = lambda solve=solve: solve(y0)
                    nfe[label] = solve.nfe
                except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    lines.append(f"| {name} | {label} | failed: {type(error).__name__}: {str(error).splitlines()[0][:120]} | | |")
        with torch.no_grad():
            median = interleaved(variants, rounds)
        block.configure_solver(backend="native")
        base = median["f × NFE"]
        for label, seconds in median.items():
            lines.append(f"| {name} | {label} | {nfe.get(label, '')} | {seconds * 1e3:.0f} ms | {seconds / base:.2f}× |")
    return lines


def training(model, y0: torch.Tensor, rounds: int) -> list[str]:
    """Forward + backward of the ODE block with the adjoint and through the solver, against its parts."""
    (block,) = find_ode_blocks(model)
    block.train()
    params = tuple(block.field.parameters())
    weight = torch.randn_like(y0)
    lines = ["| mode | backend | NFE fwd / bwd | step (median) | parts: f fwd + bwd work | step / parts |",
             "|---|---|---|---|---|---|"]
    variants: dict[str, Callable[[], object]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for adjoint in (True, False):
        for backend in ("native", "torchdiffeq"):
            label = f"{'adjoint' if adjoint else 'backprop'} / {backend}"

            def step(adjoint=adjoint, backend=backend, label=label):
                block.configure_solver(backend=backend, adjoint=adjoint)
                f0, b0 = block.nfe_forward, block.nfe_backward
                out = block(y0)
                grads = torch.autograd.grad((out * weight).sum(), params)
                counts[label] = (block.nfe_forward - f0, block.nfe_backward - b0)
                return grads
            variants[label] = step
    for run in variants.values():
        run()
    nfe_f, nfe_b = counts["adjoint / native"]
    bp_f, bp_b = counts["backprop / native"]
    t = torch.tensor(0.5)
    cotangent = torch.randn_like(y0)

    def adjoint_parts():
        with torch.no_grad():
            for _ in range(nfe_f):
                block.vector_field(t, y0)
        for _ in range(nfe_b):  # each backward evaluation: f, then its VJP with respect to y and the parameters
            y = y0.detach().requires_grad_(True)
            out = block.vector_field(t, y)
            torch.autograd.grad(out, (y,) + params, cotangent)

    def backprop_parts():
        outs = [block.vector_field(t, y0) for _ in range(bp_f)]
        for out in outs[:bp_b]:  # the backward of each evaluation whose output reaches the loss
            torch.autograd.grad(out, params, cotangent, retain_graph=False)

    variants["adjoint parts"] = adjoint_parts
    variants["backprop parts"] = backprop_parts
    y0.requires_grad_(False)
    median = interleaved(variants, rounds)
    block.configure_solver(backend="native", adjoint=True)
    for label in [k for k in variants if "/" in k]:
        parts = "adjoint parts" if label.startswith("adjoint") else "backprop parts"
        f, b = counts[label]
        lines.append(f"| {label.split(' / ')[0]} | {label.split(' / ')[1]} | {f} / {b} | {median[label] * 1e3:.0f} ms | "
                     f"{median[parts] * 1e3:.0f} ms | {median[label] / median[parts]:.2f}× |")
    lines.append("")
    lines.append(f"Parts: adjoint = {nfe_f} f (no_grad) + {nfe_b} × (f + VJP); backprop = {bp_f} f recording the graph "
                 f"+ {bp_b} backward passes of f.")
    return lines


def accuracy(models: dict, data_dir: str) -> list[str]:
    """Test accuracy of the committed checkpoints on the 10,000 MNIST test images with each backend."""
    data = MNISTDataModule(data_dir=data_dir, download=False)
    data.setup("test")
    loader = torch.utils.data.DataLoader(data.test_set, batch_size=1000)
    lines = ["| model | backend | test accuracy | forward NFE per 1,000-image batch | predictions agree |", "|---|---|---|---|---|"]
    for name, model in models.items():
        (block,) = find_ode_blocks(model)
        predictions: dict[str, torch.Tensor] = {}
        for backend in ("torchdiffeq", "native"):
            block.configure_solver(backend=backend)
            correct, nfe, batches, preds = 0, 0, 0, []
            with torch.no_grad():
                for images, labels in loader:
                    before = block.nfe_forward
                    pred = model(images).argmax(1)
                    nfe += block.nfe_forward - before
                    batches += 1
                    correct += int((pred == labels).sum())
                    preds.append(pred)
            predictions[backend] = torch.cat(preds)
            agree = (predictions[backend] == predictions["torchdiffeq"]).float().mean().item()
            lines.append(f"| {name} | {backend} | {correct / len(data.test_set):.4f} | {nfe / batches:.1f} | {agree:.4f} |")
        block.configure_solver(backend="native")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parts", nargs="+", default=["inference", "training"], choices=["inference", "training", "accuracy"])
    parser.add_argument("--no-torchode", action="store_true")
    parser.add_argument("--torchode-compile", action="store_true",
                        help="also torchode under torch.compile (minutes of compilation on a CPU)")
    args = parser.parse_args()
    checkpoints = REPO / "bench" / "checkpoints" / "mnist"
    models = {"ODE-Net": load_model(checkpoints / "odenet.ckpt"), "RK-Net": load_model(checkpoints / "rknet.ckpt")}
    images = test_images(args.data_dir, max(args.images, args.batch))
    with torch.no_grad():
        y0s = {name: model.network.stem(images[:args.images]) for name, model in models.items()}
        train_y0 = models["ODE-Net"].network.stem(images[:args.batch])
    print(f"torch {torch.__version__}, torchode {getattr(torchode, '__version__', 'not installed')}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    if "accuracy" in args.parts:
        torch.set_num_threads(args.threads[0])
        print("#### Committed checkpoints on the 10,000 MNIST test images\n")
        print("\n".join(accuracy(models, args.data_dir)) + "\n")
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "inference" in args.parts:
            print(f"#### Inference, {args.images:,} test images, no_grad, {threads} thread(s), {args.rounds} rounds\n")
            print("\n".join(inference(models, y0s, args.rounds, torchode is not None and not args.no_torchode,
                                       args.torchode_compile)) + "\n")
        if "training" in args.parts:
            print(f"#### ODE-Net training step of the ODE block, batch {args.batch}, {threads} thread(s), "
                  f"{args.rounds} rounds\n")
            print("\n".join(training(models["ODE-Net"], train_y0.clone(), args.rounds)) + "\n")
    print("Command: python bench/bench_solve_speed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
