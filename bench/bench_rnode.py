"""ODE-Net on real MNIST, one epoch, with and without RNODE regularization or the seminorm adjoint (issue 19).

Each invocation trains one variant of ``configs/mnist/odenet.yaml`` (dopri5 at 1e-3, adjoint) with the
one-epoch recipe of BENCHMARKS.md (Adam 1e-3 one-cycle, batch 32, no augmentation) plus the variant's
``--override`` flags, from ``--seed`` (0), and writes a JSON record: per training step the forward/backward NFE,
accepted/rejected solver steps and RNODE terms; test accuracy, test-time forward NFE per batch of 32, NFE and
time of one batch of 1,000 test images; and the trained weights (for ``--swap-check`` and the torchode bench).
``--report`` turns the records into the Markdown tables of BENCHMARKS.md; ``--swap-check`` runs
:class:`~lightning_pdenets.callbacks.SolverSwapCheck` on the saved weights.

    python bench/bench_rnode.py --name plain
    python bench/bench_rnode.py --name rnode --override=--model.init_args.solver.kinetic_weight=1e-4 \\
        --override=--model.init_args.solver.jacobian_weight=1e-4
    python bench/bench_rnode.py --name seminorm --max-steps 300 \\
        --override="--model.init_args.solver.adjoint_options={norm: seminorm}"
    python bench/bench_rnode.py --swap-check plain rnode --swap-batches 20
    python bench/bench_rnode.py --name plain --seminorm-check --tolerances 1e-3 1e-4 1e-5
    python bench/bench_rnode.py --report plain rnode seminorm
    python bench/bench_rnode.py --first-step-check plain rnode --swap-batches 100 --first-steps 0 0.25 0.5 1
    python bench/bench_rnode.py --swap-report bench/rnode_runs/swap_plain_rnode.json
    python bench/bench_rnode.py --local-error-check plain rnode --error-batches 10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import missing_data_exits, non_negative_int, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_mnist import inference_seconds  # noqa: E402
from lightning_pdenets.callbacks import NFEMonitor, SolverSwapCheck  # noqa: E402
from lightning_pdenets.cli import build_cli  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402

RESULTS = REPO / "bench" / "rnode_runs"
RECIPE = [
    "--model.init_args.optimizer=adam",
    "--model.init_args.lr=0.001",
    "--model.init_args.lr_scheduler=onecycle",
    "--data.init_args.augment=false",
    "--data.init_args.batch_size=32",
]
COUNTERS = (
    "nfe_forward",
    "nfe_backward",
    "steps_accepted_forward",
    "steps_rejected_forward",
    "steps_accepted_backward",
    "steps_rejected_backward",
)


class StepRecorder(pl.Callback):
    """Per training step: the differences of the ODE blocks' counters, the RNODE terms and the wall time."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self._blocks = find_ode_blocks(pl_module)

    def _counts(self) -> dict[str, int]:
        return {name: sum(getattr(b, name) for b in self._blocks) for name in COUNTERS}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before, self._start = self._counts(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {name: value - self._before[name] for name, value in self._counts().items()}
        record["seconds"] = time.perf_counter() - self._start
        record["min_step_size"] = min(float(b.last_step_sizes.min()) for b in self._blocks)
        for name in ("kinetic_energy", "jacobian_frobenius", "loss"):
            value = trainer.callback_metrics.get(f"train/{name}_step")
            if value is not None:
                record[name] = float(value)
        self.steps.append(record)


def build(args: argparse.Namespace, overrides: list[str]):
    cli = build_cli(
        [
            "--config",
            str(REPO / "configs/mnist/odenet.yaml"),
            f"--data.init_args.data_dir={args.data_dir}",
            "--data.init_args.download=false",
            "--trainer.logger=false",
            *RECIPE,
            *overrides,
        ],
        run=False,
    )
    return cli.model, cli.datamodule


def train(args: argparse.Namespace) -> None:
    model, datamodule = build(args, [f"--seed_everything={args.seed}", *args.override])
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        max_steps=args.max_steps or -1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[recorder, NFEMonitor()],
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), RESULTS / f"{args.name}.pt")
    record = {
        "name": args.name,
        "overrides": args.override,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "steps": recorder.steps,
        "train_minutes": train_seconds / 60,
        "command": "python bench/bench_rnode.py " + " ".join(sys.argv[1:]),
    }
    if not args.max_steps:
        record.update(evaluate(model, datamodule, trainer))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "steps"}, indent=1))


def evaluate(model, datamodule, trainer: pl.Trainer) -> dict:
    """Test accuracy, test-time NFE and solver steps per batch, and one batch of 1,000 test images."""
    monitor = NFEMonitor()
    tester = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[monitor],
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    metrics = tester.test(model, datamodule=datamodule, verbose=False)[0]
    datamodule.setup("test")
    images = torch.stack([datamodule.test_set[i][0] for i in range(1000)])
    seconds, nfe = inference_seconds(model, images)
    return {
        "test_acc": metrics["test/acc_top1"],
        "test_metrics": metrics,
        "inference_s_1000": seconds,
        "inference_nfe_1000": nfe,
    }


def swap_check(args: argparse.Namespace) -> None:
    """SolverSwapCheck on the trained weights of each named run, on the first ``--swap-batches`` test batches."""
    rows = {}
    for name in args.swap_check:
        record = json.loads((RESULTS / f"{name}.json").read_text())
        model, datamodule = build(args, record["overrides"])
        model.load_state_dict(torch.load(RESULTS / f"{name}.pt", weights_only=True))
        check = SolverSwapCheck(
            solvers=("euler", "midpoint", "rk4", "dopri5"),
            step_factors=(0.5, 1.0, 2.0),
            tolerance_factors=(0.1, 10.0),
            max_batches=args.swap_batches,
            log_figure=False,
            base_step_size=0.25,
        )
        tester = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            callbacks=[check],
            enable_model_summary=False,
            enable_progress_bar=False,
            limit_test_batches=1,
        )
        tester.test(model, datamodule=datamodule, verbose=False)
        result = check.results["test"]
        rows[name] = {
            "train_solver_acc": result["train_solver_acc"],
            "max_drop": result["max_drop"],
            "combinations": {
                f"{s} x{f:g}": {"accuracy": c["accuracy"], "nfe": c["nfe"]}
                for (s, f), c in result["combinations"].items()
            },
        }
        print(name, json.dumps(rows[name], indent=1), flush=True)
    out = {
        "runs": rows,
        "swap_batches": args.swap_batches,
        "command": "python bench/bench_rnode.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / f"swap_{'_'.join(args.swap_check)}.json").write_text(json.dumps(out, indent=1))


def first_step_check(args: argparse.Namespace) -> None:
    """Test accuracy and forward NFE of each named run's trained weights with dopri5's first step fixed.

    dopri5 picks its first step with Hairer's estimate, which on these models sets the step count (no step is
    rejected); this asks whether a larger fixed ``first_step`` lets the error control take fewer steps, on the
    first ``--swap-batches`` test batches, for each value of ``--first-steps`` (0: the estimate).
    """
    lines = ["| run | first_step | test accuracy | forward NFE per batch |", "|---|---|---|---|"]
    for name in args.first_step_check:
        record = json.loads((RESULTS / f"{name}.json").read_text())
        model, datamodule = build(args, record["overrides"])
        model.load_state_dict(torch.load(RESULTS / f"{name}.pt", weights_only=True))
        (block,) = find_ode_blocks(model)
        for first_step in args.first_steps:
            block.configure_solver(first_step=first_step or None)
            tester = pl.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                callbacks=[NFEMonitor()],
                enable_model_summary=False,
                enable_progress_bar=False,
                limit_test_batches=args.swap_batches,
            )
            metrics = tester.test(model, datamodule=datamodule, verbose=False)[0]
            lines.append(
                f"| {name} | {first_step or 'estimate'} | {metrics['test/acc_top1']:.4f} | "
                f"{metrics['test/nfe_forward']:.1f} |"
            )
            print(lines[-1], flush=True)
    print(
        f"\nfirst {args.swap_batches} test batches of 32; command: python bench/bench_rnode.py "
        + " ".join(sys.argv[1:])
        + "\n\n"
        + "\n".join(lines)
    )


def local_error_check(args: argparse.Namespace) -> None:
    """dopri5's error ratio for one step of each size from t = 0, on each named run's trained weights.

    The error ratio is torchdiffeq's (RMS of the embedded error estimate over atol + rtol·|y|, rtol = atol = 1e-3;
    a step is accepted at ≤ 1), for the states entering the ODE block on the first ``--error-batches`` test batches
    (median over batches). Its growth with the step size h is the local order the step-size controller meets: the
    controller assumes h^5 and grows the next step by 0.9·ratio^(-1/5), at most 10×.
    """
    from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
    from torchdiffeq._impl.rk_common import _ButcherTableau, _runge_kutta_step

    tableau = _DORMAND_PRINCE_SHAMPINE_TABLEAU  # cast as torchdiffeq's solver does: nodes in float64, weights as y
    tableau = _ButcherTableau(
        alpha=tableau.alpha.double(),
        beta=[b.float() for b in tableau.beta],
        c_sol=tableau.c_sol.float(),
        c_error=tableau.c_error.float(),
    )

    sizes = args.step_sizes
    lines = [
        "| run | " + " | ".join(f"h = {h:g}" for h in sizes) + " | local order (slope of log ratio over log h) |",
        "|---" * (len(sizes) + 2) + "|",
    ]
    for name in args.local_error_check:
        record = json.loads((RESULTS / f"{name}.json").read_text())
        model, datamodule = build(args, record["overrides"])
        model.load_state_dict(torch.load(RESULTS / f"{name}.pt", weights_only=True))
        model.eval()
        (block,) = find_ode_blocks(model)
        states: list[torch.Tensor] = []
        hook = block.register_forward_pre_hook(lambda module, inputs: states.append(inputs[0]))
        datamodule.setup("test")
        with torch.no_grad():
            for _, (images, _) in zip(range(args.error_batches), datamodule.test_dataloader()):
                model(images)
        hook.remove()
        field = lambda t, y, perturb=None: block.vector_field(t.to(y.dtype), y)  # noqa: E731
        ratios = {h: [] for h in sizes}
        t0 = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for y0 in states:
                f0 = field(t0, y0)
                for h in sizes:
                    dt = torch.tensor(h, dtype=torch.float64)
                    y1, _, error, _ = _runge_kutta_step(field, y0, f0, t0, dt, t0 + dt, tableau)
                    scale = 1e-3 + 1e-3 * torch.maximum(y0.abs(), y1.abs())
                    ratios[h].append(float((error / scale).pow(2).mean().sqrt()))
        medians = [statistics.median(ratios[h]) for h in sizes]
        slope = statistics.linear_regression([math.log(h) for h in sizes], [math.log(r) for r in medians]).slope
        lines.append(f"| {name} | " + " | ".join(f"{r:.2e}" for r in medians) + f" | {slope:.2f} |")
        print(lines[-1], flush=True)
    print(
        f"\nfirst {args.error_batches} test batches of 32; command: python bench/bench_rnode.py "
        + " ".join(sys.argv[1:])
        + "\n\n"
        + "\n".join(lines)
    )


def seminorm_check(args: argparse.Namespace) -> None:
    """Backward NFE of the trained weights of ``--name`` on training batches, with and without the seminorm adjoint.

    The same batches and weights for both norms (no optimizer step), at each tolerance of ``--tolerances``, so
    that only the adjoint's error norm differs; prints the median backward NFE and the median per-batch ratio.
    """
    record = json.loads((RESULTS / f"{args.name}.json").read_text())
    model, datamodule = build(args, record["overrides"])
    model.load_state_dict(torch.load(RESULTS / f"{args.name}.pt", weights_only=True))
    model.train()
    (block,) = find_ode_blocks(model)
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(args.seminorm_batches), datamodule.train_dataloader())]
    lines = [
        "| rtol = atol | backward NFE per batch, default norm (median) | seminorm (median) | median per-batch ratio "
        "| ratio of sums |",
        "|---|---|---|---|---|",
    ]
    for tol in args.tolerances:
        counts: dict[str, list[int]] = {}
        for name, options in (("default", None), ("seminorm", {"norm": "seminorm"})):
            block.configure_solver(rtol=tol, atol=tol, adjoint_options=options)
            counts[name] = []
            for images, labels in batches:
                before = block.nfe_backward
                torch.nn.functional.cross_entropy(model(images), labels).backward()
                model.zero_grad(set_to_none=True)
                counts[name].append(block.nfe_backward - before)
        ratios = [b / a for a, b in zip(counts["default"], counts["seminorm"])]
        lines.append(
            f"| {tol:g} | {statistics.median(counts['default']):.0f} | {statistics.median(counts['seminorm']):.0f} | "
            f"{statistics.median(ratios):.3f} | {sum(counts['seminorm']) / sum(counts['default']):.3f} |"
        )
        print(lines[-1], flush=True)
    print(
        f"\nweights of {args.name}, {len(batches)} training batches of 32; command: python bench/bench_rnode.py "
        + " ".join(sys.argv[1:])
        + "\n\n"
        + "\n".join(lines)
    )


def report(names: list[str]) -> str:
    """Markdown: one row per run, and the per-step backward NFE of each run against the first one."""
    records = [json.loads((RESULTS / f"{name}.json").read_text()) for name in names]
    lines = [
        "| run | overrides | steps | test acc | test NFE fwd / batch of 32 | NFE, 1,000 images | inference, 1,000 images "
        "| train NFE fwd / bwd per step (median) | accepted / rejected fwd steps per step (mean) | "
        "bwd steps acc / rej (mean) | fwd NFE, first → last 200 steps (mean) | train step (median) | train time |",
        "|---" * 13 + "|",
    ]
    for r in records:
        steps = r["steps"]
        median = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
        mean = lambda key: statistics.fmean(s[key] for s in steps)  # noqa: E731
        test_nfe = r.get("test_metrics", {}).get("test/nfe_forward")
        lines.append(
            f"| {r['name']} | {' '.join(o.split('.')[-1] for o in r['overrides']) or '—'} | {len(steps)} | "
            f"{r['test_acc']:.4f} | {test_nfe:.1f} | {r['inference_nfe_1000']} | {r['inference_s_1000'] * 1000:.0f} ms | "
            if "test_acc" in r
            else f"| {r['name']} | {' '.join(o.split('.')[-1] for o in r['overrides'])} | {len(steps)} | — | — | — | — | "
        )
        lines[-1] += (
            f"{median('nfe_forward'):.0f} / {median('nfe_backward'):.0f} | "
            f"{mean('steps_accepted_forward'):.2f} / {mean('steps_rejected_forward'):.2f} | "
            f"{mean('steps_accepted_backward'):.2f} / {mean('steps_rejected_backward'):.2f} | "
            f"{statistics.fmean(s['nfe_forward'] for s in steps[:200]):.1f} → "
            f"{statistics.fmean(s['nfe_forward'] for s in steps[-200:]):.1f} | "
            f"{median('seconds') * 1000:.0f} ms | {r['train_minutes']:.1f} min |"
        )
    longest = max(len(r["steps"]) for r in records)
    windows = range(0, longest, 400)
    lines += [
        "",
        "Over training (mean per step in windows of 400 steps): forward NFE / backward NFE (rejected backward steps)",
        "",
        "| run | " + " | ".join(f"steps {a + 1}–{min(a + 400, longest)}" for a in windows) + " |",
        "|---" * (len(windows) + 1) + "|",
    ]
    for r in records:
        cells = []
        for a in windows:
            part = r["steps"][a : a + 400]
            cells.append(
                "—"
                if not part
                else f"{statistics.fmean(s['nfe_forward'] for s in part):.1f} / "
                f"{statistics.fmean(s['nfe_backward'] for s in part):.1f} "
                f"({statistics.fmean(s['steps_rejected_backward'] for s in part):.2f})"
            )
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    reference = records[0]["steps"]
    for r in records[1:]:
        n = min(len(reference), len(r["steps"]))
        ratios = [s["nfe_backward"] / p["nfe_backward"] for s, p in zip(r["steps"][:n], reference[:n])]
        lines.append(
            f"\n{r['name']} against {records[0]['name']}, first {n} steps: backward NFE per step, median "
            f"{statistics.median(s['nfe_backward'] for s in r['steps'][:n]):.0f} vs "
            f"{statistics.median(s['nfe_backward'] for s in reference[:n]):.0f}; median per-step ratio "
            f"{statistics.median(ratios):.3f}; ratio of sums "
            f"{sum(s['nfe_backward'] for s in r['steps'][:n]) / sum(s['nfe_backward'] for s in reference[:n]):.3f}."
        )
    return "\n".join(lines) + "\n"


def swap_report(paths: list[Path]) -> str:
    """Markdown: accuracy of every test solver (NFE per batch in brackets) for each run in ``swap_*.json`` files."""
    runs, batches = {}, set()
    for path in paths:
        record = json.loads(path.read_text())
        runs.update(record["runs"])
        batches.add(record["swap_batches"])
    combos = list(next(iter(runs.values()))["combinations"])
    lines = [
        f"Test batches of 32: {', '.join(map(str, sorted(batches)))}. Fixed-step solvers at factor × 0.25, dopri5 "
        f"at factor × 1e-3.",
        "",
        "| run | training solver (dopri5 1e-3) | " + " | ".join(combos) + " | max drop |",
        "|---" * (len(combos) + 3) + "|",
    ]
    for name, run in runs.items():
        cells = [f"{c['accuracy']:.4f} ({c['nfe']:.0f})" for c in run["combinations"].values()]
        lines.append(
            f"| {name} | {run['train_solver_acc']:.4f} | " + " | ".join(cells) + f" | {run['max_drop'] * 100:.2f} pp |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="name of the run (its records go to bench/rnode_runs/NAME.json/.pt)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--override", action="append", default=[], help="CLI arguments of this variant")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument(
        "--max-steps", type=non_negative_int, default=0, help="stop after this many steps (0: one epoch, then test)"
    )
    parser.add_argument("--swap-check", nargs="+", metavar="NAME", help="run SolverSwapCheck on these runs' weights")
    parser.add_argument("--swap-batches", type=positive_int, default=20)
    parser.add_argument(
        "--first-step-check",
        nargs="+",
        metavar="NAME",
        help="test these runs' weights with dopri5's first step fixed at each of --first-steps",
    )
    parser.add_argument("--first-steps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument(
        "--local-error-check",
        nargs="+",
        metavar="NAME",
        help="dopri5's error ratio for one step of each of --step-sizes on these runs' weights",
    )
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[0.03, 0.06, 0.12, 0.25, 0.5, 1.0])
    parser.add_argument("--error-batches", type=positive_int, default=10)
    parser.add_argument(
        "--seminorm-check",
        action="store_true",
        help="backward NFE of the weights of --name with and without the seminorm adjoint",
    )
    parser.add_argument("--seminorm-batches", type=positive_int, default=20)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--report", nargs="+", metavar="NAME", help="print the Markdown table of these runs")
    parser.add_argument(
        "--swap-report", nargs="+", type=Path, metavar="JSON", help="print swap-check results as Markdown"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    checks = (args.report, args.swap_report, args.swap_check, args.first_step_check, args.local_error_check)
    if not any(checks) and not args.seminorm_check and not args.name:
        parser.error("--name is required to train")
    with missing_data_exits(args.data_dir):
        dispatch(args)


def dispatch(args: argparse.Namespace) -> None:
    if args.report:
        print(report(args.report))
    elif args.swap_report:
        print(swap_report(args.swap_report))
    elif args.swap_check:
        swap_check(args)
    elif args.first_step_check:
        first_step_check(args)
    elif args.local_error_check:
        local_error_check(args)
    elif args.seminorm_check:
        seminorm_check(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
