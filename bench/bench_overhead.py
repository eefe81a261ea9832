"""Per-step cost of training through the framework against a plain PyTorch loop (issue 15, item 6).

The quickstart (RK-Net on scikit-learn's digits, ``configs/quickstart.yaml``) trains the same steps on the
same batches in three ways:

* ``plain``: ``for x, y in loader: zero_grad; cross_entropy(net(x), y).backward(); step`` with the optimizer
  the model configures;
* ``lightning``: a minimal LightningModule over the same network (``training_step`` returns the loss and
  logs nothing) under a bare ``Trainer``: Lightning's own cost;
* ``framework``: the model, datamodule and trainer exactly as ``pdenets fit --config configs/quickstart.yaml``
  builds them (default callbacks, NFE monitor, TensorBoard logger), progress bar off in both Lightning runs.

Each round trains ``--steps`` steps in each way, in an order rotated every round, so that drifts in machine
load hit all three alike. A step is the time between the starts of consecutive batches (data loading, step,
hooks and logging included; the first ``--warmup`` steps are skipped, and the last step of an epoch, which
holds the validation, is not between two batch starts of the same fit). The overhead is the median over rounds
of the ratio of median step times. Before timing, the framework's weights after ``--steps`` steps are checked
to equal the plain loop's bitwise, so that both do the same work.

    python bench/bench_overhead.py --rounds 15 --threads 1 --output bench/results_overhead.md
    python bench/bench_overhead.py --profile 60     # cProfile of the framework's per-step bookkeeping
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import at_least, check_output, non_negative_int, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets.cli import build_cli  # noqa: E402


class StepClock(pl.Callback):
    """Wall time at the start of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


class BareModule(pl.LightningModule):
    """The same network and optimizer with nothing but the loss: what Lightning alone costs."""

    def __init__(self, network: torch.nn.Module, optimizers: Any) -> None:
        super().__init__()
        self.network = network
        self._optimizers = optimizers

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.network(x), y)

    def configure_optimizers(self):
        return self._optimizers(self.network)


def framework(steps: int, log_dir: str) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule]:
    cli = build_cli(
        [
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={log_dir}",
            f"--trainer.default_root_dir={log_dir}",
        ],
        run=False,
    )
    return cli.trainer, cli.model, cli.datamodule


def optimizer_factory(model: pl.LightningModule):
    """The optimizer the framework model configures, rebuilt over another copy of its network."""
    o = model.optimization

    def build(network: torch.nn.Module):
        return torch.optim.Adam(network.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])

    return build


def run_plain(network: torch.nn.Module, loader, steps: int, build_optimizer) -> list[float]:
    optimizer = build_optimizer(network)
    network.train()
    starts = []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        starts.append(time.perf_counter())
        optimizer.zero_grad()
        F.cross_entropy(network(x), y).backward()
        optimizer.step()
    starts.append(time.perf_counter())
    return starts


def run_lightning(network: torch.nn.Module, datamodule, steps: int, build_optimizer, log_dir: str) -> list[float]:
    clock = StepClock()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=log_dir,
        limit_val_batches=0,
    )
    trainer.fit(BareModule(network, build_optimizer), datamodule=datamodule)
    return clock.starts


def run_framework(steps: int, log_dir: str) -> tuple[list[float], torch.nn.Module]:
    pl.seed_everything(0, verbose=False)
    trainer, model, datamodule = framework(steps, log_dir)
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=datamodule)
    return clock.starts, model.network


def step_times(starts: list[float], warmup: int) -> float:
    intervals = [b - a for a, b in itertools.pairwise(starts)][warmup:]
    return statistics.median(intervals)


def profile(steps: int, log_dir: str) -> None:
    """cProfile of ``steps`` framework training steps without validation: where the per-step bookkeeping goes."""
    import cProfile
    import pstats

    pl.seed_everything(0, verbose=False)
    trainer, model, datamodule = framework(steps, log_dir)
    trainer.limit_val_batches = 0
    profiler = cProfile.Profile()
    profiler.runcall(trainer.fit, model, datamodule=datamodule)
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(
        r"lightning_pdenets/(models/base|callbacks/nfe_monitor)|module\.py.*\(log\)|torchmetrics/collections"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument(
        "--steps", type=at_least(2), default=18, help="steps per fit (an epoch of the quickstart has 20)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--profile", type=positive_int, metavar="STEPS", help="only print a cProfile of STEPS framework steps"
    )
    args = parser.parse_args()
    if args.steps < args.warmup + 2:  # the median is over the step intervals after the warm-up
        parser.error(
            f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}: give at least {args.warmup + 2}"
        )
    check_output(parser, args.output)
    sys.argv = sys.argv[:1]  # build_cli gets its own arguments
    torch.set_num_threads(args.threads)
    log_dir = tempfile.mkdtemp(prefix="pdenets-overhead-")
    if args.profile:
        profile(args.profile, log_dir)
        return

    # the same work: identical weights after the same steps from the same initial state
    pl.seed_everything(0, verbose=False)
    _, model, datamodule = framework(args.steps, log_dir)
    initial = copy.deepcopy(model.network)
    datamodule.setup("fit")
    run_plain(plain_net := copy.deepcopy(initial), datamodule.train_dataloader(), args.steps, optimizer_factory(model))
    _, trained = run_framework(args.steps, log_dir)
    identical = all(
        torch.equal(a, b)
        for a, b in zip(plain_net.state_dict().values(), trained.state_dict().values())
        if isinstance(a, torch.Tensor)
    )  # the ODE block's solver settings are extra state, not tensors

    ratios: dict[str, list[float]] = {"lightning": [], "framework": []}
    medians: dict[str, list[float]] = {"plain": [], "lightning": [], "framework": []}
    ways = ["plain", "lightning", "framework"]
    for round_index in range(args.rounds):
        order = ways[round_index % 3 :] + ways[: round_index % 3]
        times = {}
        for way in order:
            if way == "plain":
                starts = run_plain(
                    copy.deepcopy(initial), datamodule.train_dataloader(), args.steps, optimizer_factory(model)
                )
            elif way == "lightning":
                starts = run_lightning(
                    copy.deepcopy(initial), datamodule, args.steps, optimizer_factory(model), log_dir
                )
            else:
                starts, _ = run_framework(args.steps, log_dir)
            times[way] = step_times(starts, args.warmup)
            medians[way].append(times[way])
        for way in ("lightning", "framework"):
            ratios[way].append(times[way] / times["plain"])
        print(
            f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{w} {times[w] * 1e3:.1f} ms" for w in ways),
            flush=True,
        )

    def quartiles(values: list[float]) -> str:
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return f"{q[0]:.3f}–{q[2]:.3f}"

    plain_ms = statistics.median(medians["plain"]) * 1e3
    lines = [
        f"### Framework overhead per training step, quickstart ({datetime.date.today()})",
        "",
        f"Machine: {os.cpu_count()} CPU cores visible, torch {torch.__version__}, {args.threads} thread(s); "
        f"{args.rounds} rounds of {args.steps} steps in each way (order rotated), first {args.warmup} steps of each "
        f"fit skipped. Weights of the framework and the plain loop after {args.steps} steps bitwise identical: "
        f"{identical}.",
        "",
        f"Command: `python bench/bench_overhead.py --rounds {args.rounds} --steps {args.steps} --threads {args.threads}`",
        "",
        "| way | step (median of rounds) | vs plain loop (median ratio) | IQR of ratio |",
        "|---|---|---|---|",
        f"| plain PyTorch loop | {plain_ms:.2f} ms | 1.000 | — |",
    ]
    for way, label in (
        ("lightning", "bare LightningModule + Trainer"),
        ("framework", "lightning_pdenets (pdenets defaults)"),
    ):
        lines.append(
            f"| {label} | {statistics.median(medians[way]) * 1e3:.2f} ms | "
            f"{statistics.median(ratios[way]):.3f} | {quartiles(ratios[way])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    if not identical:
        raise SystemExit(
            "the framework and the plain loop did not train to the same weights: the timing compares different work"
        )


if __name__ == "__main__":
    main()
