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
from collections.abc import Callable
from pathlib import Path

import torch
from _common import missing_data_exits, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets.checkpoints import checkpoint_class_path, load_checkpoint  # noqa: E402
from lightning_pdenets.data import MNISTDataModule  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402
from lightning_pdenets.solvers import runge_kutta  # noqa: E402

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
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class _FlatField(torch.nn.Module):
    """The block's vector field on torchode's flat ``(1, features)`` batch; a module, so that torchode's
    ``BacksolveAdjoint`` finds the field's parameters through ``term.parameters()``."""

    def __init__(self, block) -> None:
        super().__init__()
        self.field = block.field
        self.shape: tuple[int, ...] = ()
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # a traced counter would be a guard that recompiles every call
            self.calls += 1
        # BacksolveAdjoint's augmented term vmaps over torchode's batch: t arrives 0-dim and y without that axis
        time_point = t.reshape(-1)[0] if t.dim() else t
        return self.field(time_point, y.reshape(self.shape)).reshape(y.shape)


def torchode_solver(block, compiled: bool, adjoint: bool = False):
    """torchode's Dopri5 with one error norm over the batch (as torchdiffeq and the native loop control it).

    ``adjoint``: torchode's ``BacksolveAdjoint`` (the adjoint method); otherwise ``AutoDiffAdjoint``
    (backpropagation through the solver).
    """
    settings = block.solver_settings()
    field = _FlatField(block)
    term = torchode.ODETerm(field)
    controller = torchode.IntegralController(atol=settings["atol"], rtol=settings["rtol"], term=term)
    if adjoint:
        solver = torchode.BacksolveAdjoint(term, torchode.Dopri5(term=term), controller)
    else:
        solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller, max_steps=settings["max_num_steps"])
    run = torch.compile(solver.solve) if compiled else solver.solve  # compiling the module would leave .solve eager

    def solve(y0: torch.Tensor) -> torch.Tensor:
        field.shape = tuple(y0.shape)
        problem = torchode.InitialValueProblem(y0=y0.reshape(1, -1), t_start=torch.zeros(1), t_end=torch.ones(1))
        solution = run(problem)
        solve.nfe = int(solution.stats["n_f_evals"].max())
        return solution.ys[:, -1].view(y0.shape)

    solve.field = field

    return solve


def field_times(block, y0: torch.Tensor, count: int) -> Callable[[], object]:
    times = [torch.tensor(i / max(count - 1, 1), dtype=y0.dtype) for i in range(count)]
    return lambda: [block.vector_field(t, y0) for t in times]


def inference(
    models: dict,
    y0s: dict,
    rounds: int,
    with_torchode: bool,
    torchode_compile: bool,
    compile_combine: bool = False,
    compile_field: bool = False,
) -> list[str]:
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
        if compile_combine:
            compiled_combine = torch.compile(runge_kutta._combine, dynamic=True)

            def run_compiled(label="native + torch.compile(combine)"):
                # bench-only swap of the project's own stage combination (inductor fuses the adds; f stays eager)
                eager, runge_kutta._combine = runge_kutta._combine, compiled_combine
                try:
                    block.configure_solver(backend="native")
                    before = block.nfe_forward
                    block(y0)
                    nfe[label] = block.nfe_forward - before
                finally:
                    runge_kutta._combine = eager

            variants["native + torch.compile(combine)"] = run_compiled
        if compile_field:
            eager_field = block.field
            compiled_field = torch.compile(eager_field)  # what torchode + torch.compile also compiles: f itself

            def run_compiled_field(label="native + torch.compile(f)"):
                block.field = compiled_field
                try:
                    block.configure_solver(backend="native")
                    before = block.nfe_forward
                    block(y0)
                    nfe[label] = block.nfe_forward - before
                finally:
                    block.field = eager_field

            def compiled_field_times():
                block.field = compiled_field
                try:
                    return field_times(block, y0, nfe["native"])()
                finally:
                    block.field = eager_field

            variants["native + torch.compile(f)"] = run_compiled_field
            variants["compiled f × NFE"] = compiled_field_times
        with torch.no_grad():
            for label, run in list(variants.items()):
                start = time.perf_counter()
                run()
                if "compile" in label:
                    lines.append(
                        f"| {name} | {label}: first call (compilation) {time.perf_counter() - start:.0f} s | | | |"
                    )
        variants["f × NFE"] = field_times(block, y0, nfe["native"])
        nfe["f × NFE"] = nfe["native"]
        if compile_field:
            nfe["compiled f × NFE"] = nfe["native"]
        if with_torchode and block.solver.is_adaptive:
            for compiled in (False, True) if torchode_compile else (False,):
                label = "torchode" + (" + torch.compile" if compiled else "")
                try:
                    solve = torchode_solver(block, compiled)
                    with torch.no_grad():
                        start = time.perf_counter()
                        solve(y0)
                        if compiled:
                            lines.append(
                                f"| {name} | {label}: first call (compilation) "
                                f"{time.perf_counter() - start:.0f} s | | | |"
                            )
                    variants[label] = lambda solve=solve: solve(y0)
                    nfe[label] = solve.nfe
                except Exception as error:
                    lines.append(
                        f"| {name} | {label} | failed: {type(error).__name__}: {str(error).splitlines()[0][:120]} | | |"
                    )
        with torch.no_grad():
            median = interleaved(variants, rounds)
        block.configure_solver(backend="native")
        base = median["f × NFE"]
        for label, seconds in median.items():
            lines.append(
                f"| {name} | {label} | {nfe.get(label, '')} | {seconds * 1e3:.0f} ms | {seconds / base:.2f}× |"
            )
    return lines


def training(model, y0: torch.Tensor, rounds: int, with_torchode: bool = False) -> list[str]:
    """Forward + backward of the ODE block with the adjoint and through the solver, against its parts.

    ``with_torchode``: also torchode's Dopri5 with ``BacksolveAdjoint`` and with ``AutoDiffAdjoint``, its
    evaluations counted by the wrapped field (backprop's backward evaluates no f: it shows 0).
    """
    (block,) = find_ode_blocks(model)
    block.train()
    params = tuple(block.field.parameters())
    weight = torch.randn_like(y0)
    lines = [
        "| mode | backend | NFE fwd / bwd | step (median) | parts: f fwd + bwd work | step / parts |",
        "|---|---|---|---|---|---|",
    ]
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

    def seminorm_step(label="adjoint seminorm / native"):
        block.configure_solver(backend="native", adjoint=True, adjoint_options={"norm": "seminorm"})
        f0, b0 = block.nfe_forward, block.nfe_backward
        try:
            out = block(y0)
            grads = torch.autograd.grad((out * weight).sum(), params)
        finally:
            block.configure_solver(adjoint_options={})
        counts[label] = (block.nfe_forward - f0, block.nfe_backward - b0)
        return grads

    variants["adjoint seminorm / native"] = seminorm_step
    if with_torchode:
        for adjoint in (True, False):
            label = f"{'adjoint' if adjoint else 'backprop'} / torchode"
            solve = torchode_solver(block, compiled=False, adjoint=adjoint)

            def torchode_step(solve=solve, label=label):
                before = solve.field.calls
                out = solve(y0)
                middle = solve.field.calls
                grads = torch.autograd.grad((out * weight).sum(), params)
                counts[label] = (middle - before, solve.field.calls - middle)
                return grads

            variants[label] = torchode_step
    for run in variants.values():
        run()
    nfe_f, nfe_b = counts["adjoint / native"]
    bp_f, bp_b = counts["backprop / native"]
    t = torch.tensor(0.5)
    cotangent = torch.randn_like(y0)

    def forward_evaluations():
        with torch.no_grad():
            for _ in range(nfe_f):
                block.vector_field(t, y0)

    def backward_evaluations():
        for _ in range(nfe_b):  # each backward evaluation: f, then its VJP with respect to y and the parameters
            y = y0.detach().requires_grad_(True)
            out = block.vector_field(t, y)
            torch.autograd.grad(out, (y, *params), cotangent)

    def backprop_parts():
        outs = [block.vector_field(t, y0) for _ in range(bp_f)]
        for out in outs[:bp_b]:  # the backward of each evaluation whose output reaches the loss
            torch.autograd.grad(out, params, cotangent, retain_graph=False)

    variants["f (no_grad)"] = forward_evaluations
    variants["f + VJP"] = backward_evaluations
    variants["backprop parts"] = backprop_parts
    y0.requires_grad_(False)
    median = interleaved(variants, rounds)
    block.configure_solver(backend="native", adjoint=True)
    per_f, per_vjp = median["f (no_grad)"] / nfe_f, median["f + VJP"] / nfe_b
    for label in [k for k in variants if "/" in k]:
        f, b = counts[label]
        # each variant against the parts its own evaluation counts need (the adjoint's backward NFE differ)
        parts = f * per_f + b * per_vjp if label.startswith("adjoint") else median["backprop parts"]
        lines.append(
            f"| {label.split(' / ')[0]} | {label.split(' / ')[1]} | {f} / {b} | {median[label] * 1e3:.0f} ms | "
            f"{parts * 1e3:.0f} ms | {median[label] / parts:.2f}× |"
        )
    lines.append("")
    lines.append(
        f"Parts: adjoint = forward NFE × f (no_grad, {per_f * 1e3:.1f} ms each) + backward NFE × (f + VJP, "
        f"{per_vjp * 1e3:.1f} ms each), each variant with its own counts; backprop = {bp_f} f recording the "
        f"graph + {bp_b} backward passes of f."
    )
    return lines


def accuracy(models: dict, data_dir: str) -> list[str]:
    """Test accuracy of the committed checkpoints on the 10,000 MNIST test images with each backend."""
    data = MNISTDataModule(data_dir=data_dir, download=False)
    data.setup("test")
    loader = torch.utils.data.DataLoader(data.test_set, batch_size=1000)
    lines = [
        "| model | backend | test accuracy | forward NFE per 1,000-image batch | predictions agree |",
        "|---|---|---|---|---|",
    ]
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
            lines.append(
                f"| {name} | {backend} | {correct / len(data.test_set):.4f} | {nfe / batches:.1f} | {agree:.4f} |"
            )
        block.configure_solver(backend="native")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--parts", nargs="+", default=["inference", "training"], choices=["inference", "training", "accuracy"]
    )
    parser.add_argument("--no-torchode", action="store_true")
    parser.add_argument(
        "--torchode-compile",
        action="store_true",
        help="also torchode under torch.compile (minutes of compilation on a CPU)",
    )
    parser.add_argument(
        "--compile-combine",
        action="store_true",
        help="also the native loop with its stage combination under torch.compile (f stays eager)",
    )
    parser.add_argument(
        "--compile-field",
        action="store_true",
        help="also the native loop around f under torch.compile, and that compiled f x NFE",
    )
    args = parser.parse_args()
    with missing_data_exits(args.data_dir):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    checkpoints = REPO / "bench" / "checkpoints" / "mnist"
    models = {"ODE-Net": load_model(checkpoints / "odenet.ckpt"), "RK-Net": load_model(checkpoints / "rknet.ckpt")}
    images = test_images(args.data_dir, max(args.images, args.batch))
    with torch.no_grad():
        y0s = {name: model.network.stem(images[: args.images]) for name, model in models.items()}
        train_y0 = models["ODE-Net"].network.stem(images[: args.batch])
    print(
        f"torch {torch.__version__}, torchode {getattr(torchode, '__version__', 'not installed')}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    if "accuracy" in args.parts:
        torch.set_num_threads(args.threads[0])
        print("#### Committed checkpoints on the 10,000 MNIST test images\n")
        print("\n".join(accuracy(models, args.data_dir)) + "\n")
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "inference" in args.parts:
            print(f"#### Inference, {args.images:,} test images, no_grad, {threads} thread(s), {args.rounds} rounds\n")
            print(
                "\n".join(
                    inference(
                        models,
                        y0s,
                        args.rounds,
                        torchode is not None and not args.no_torchode,
                        args.torchode_compile,
                        args.compile_combine,
                        args.compile_field,
                    )
                )
                + "\n"
            )
        if "training" in args.parts:
            print(
                f"#### ODE-Net training step of the ODE block, batch {args.batch}, {threads} thread(s), "
                f"{args.rounds} rounds\n"
            )
            print(
                "\n".join(
                    training(
                        models["ODE-Net"], train_y0.clone(), args.rounds, torchode is not None and not args.no_torchode
                    )
                )
                + "\n"
            )
    print("Command: python bench/bench_solve_speed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
