"""Issue 27 item 6: PR-Net against ResNet, inference and training, side by side in one process, interleaved.

* ``inference``: the committed trained MNIST checkpoints (``bench/checkpoints/mnist/{prnet,resnet}.ckpt``) classify
  the first ``--images`` MNIST test images, two ways for each model, all interleaved round by round (order rotated
  every round, median reported): ``one batch``, the code path before this issue (``network(images)`` under
  ``no_grad``, PR-Net's field through its training-time ``forward``), and ``module``, the framework's evaluation
  path (``module(images)`` under ``inference_mode``: chunks of ``inference_chunk_size`` images, PR-Net's PDE block
  on its inference path); with ``--chunks`` also other chunk sizes. PR-Net needs 16.6 M multiply-adds per image and
  ResNet 29.75 M, so 1.79× is the MAC limit of the ratio.
* ``training``: one Algorithm-1 iteration of PR-Net (task, theta, query and alpha sub-steps) against one ResNet
  step, both through Lightning's Trainer on the same real MNIST training batch (``--batch``), models from
  configs/mnist/{prnet,resnet}.yaml, interleaved by rounds of ``--steps`` steps (the first step of every round is a
  warm-up and not counted); PR-Net's sub-steps are timed too, and the iteration as it was before this issue (every
  sub-step's backward over every parameter).
* ``--profile``: per-layer time of both networks (``module`` path) for the breakdown in BENCHMARKS.md.

Times are wall-clock and, because this machine is shared, also the CPU time of the (single) compute thread
(``time.thread_time``), which leaves out the time the process waits for a core; ratios are given for both.

    OMP_NUM_THREADS=1 python bench/bench_prnet_speed.py --data-dir ../shared/data --threads 1 2 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from _common import missing_data_exits, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning_pdenets.models as models  # noqa: E402
from lightning_pdenets.blocks.pde import PDEBlock  # noqa: E402
from lightning_pdenets.checkpoints import checkpoint_class_path, load_checkpoint  # noqa: E402
from lightning_pdenets.data import MNISTDataModule  # noqa: E402

NAMES = ("prnet", "resnet")
MACS = {"prnet": 16.6e6, "resnet": 29.75e6}


def load_model(path: Path) -> pl.LightningModule:
    class_path = checkpoint_class_path(load_checkpoint(path))
    name = class_path.rpartition(".")[2]
    return getattr(models, name).load_from_checkpoint(path, map_location="cpu").eval()


def build(name: str, cls: type | None = None) -> pl.LightningModule:
    """The model of configs/mnist/<name>.yaml with MNIST's data facts (what the CLI links from the datamodule)."""
    config = yaml.safe_load((REPO / "configs" / "mnist" / f"{name}.yaml").read_text())["model"]
    cls = cls or getattr(models, config["class_path"].rsplit(".", 1)[-1])
    return cls(num_classes=10, in_channels=1, image_size=28, **config.get("init_args", {}))


def mnist(data_dir: str, stage: str) -> torch.utils.data.Dataset:
    data = MNISTDataModule(data_dir=data_dir, download=False, augment=False)
    data.setup(stage)
    return data.test_set if stage == "test" else data.train_set


class Clock:
    """Wall and thread-CPU seconds of one call."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.thread_time() - self._cpu)

    def median(self, kind: str, skip: int = 0) -> float:
        return statistics.median(getattr(self, kind)[skip:])


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, Clock]:
    """Each variant once per round after one warm-up call, the order rotated every round."""
    names = list(variants)
    clocks = {name: Clock() for name in names}
    for name in names:
        variants[name]()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with clocks[name]:
                variants[name]()
    return clocks


def inference(data_dir: str, count: int, rounds: int, chunks: list[int]) -> tuple[list[str], dict[str, float]]:
    trained = {name: load_model(REPO / "bench" / "checkpoints" / "mnist" / f"{name}.ckpt") for name in NAMES}
    images = next(iter(torch.utils.data.DataLoader(mnist(data_dir, "test"), batch_size=count)))[0]

    def one_batch(module: pl.LightningModule) -> Callable[[], object]:
        """The code path before issue 27: one batch, PR-Net's field through its training-time ``forward``."""
        net = module.network

        def run() -> object:
            with torch.no_grad():
                if isinstance(net.feature, PDEBlock):
                    return net.head(net.feature.field(net.stem(images), net.feature.query.unsqueeze(0)))
                return net(images)

        return run

    def framework(module: pl.LightningModule) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return module(images)

        return run

    def chunked(module: pl.LightningModule, size: int) -> Callable[[], object]:
        def run() -> object:
            shipped, module.inference_chunk_size = module.inference_chunk_size, size
            try:
                with torch.inference_mode():
                    return module(images)
            finally:
                module.inference_chunk_size = shipped

        return run

    for name, module in trained.items():  # the two paths agree (the full check is in the tests)
        before = one_batch(module)()
        with torch.inference_mode():
            after = module(images)
        difference = (before - after).abs().max().item()
        if difference > 1e-4 or not torch.equal(before.argmax(1), after.argmax(1)):
            raise RuntimeError(f"{name}: the two inference paths disagree (max |Δlogit| {difference:.2e}).")

    variants: dict[str, Callable[[], object]] = {}
    for name, module in trained.items():
        variants[f"{name}/one batch"] = one_batch(module)
        variants[f"{name}/module"] = framework(module)
        for size in chunks:
            variants[f"{name}/chunks of {size}"] = chunked(module, size)
    clocks = interleaved(variants, rounds)
    lines = [
        f"Inference, {count} MNIST test images, trained checkpoints, {rounds} interleaved rounds "
        f"(chunk size {trained['prnet'].inference_chunk_size}):",
        "",
        "| path | ResNet wall | PR-Net wall | ResNet / PR-Net (wall) | ResNet CPU | PR-Net CPU "
        "| ResNet / PR-Net (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for path in ("one batch", "module", *(f"chunks of {size}" for size in chunks)):
        r, p = clocks[f"resnet/{path}"], clocks[f"prnet/{path}"]
        wall, cpu = r.median("wall") / p.median("wall"), r.median("cpu") / p.median("cpu")
        ratios[f"inference {path} wall"], ratios[f"inference {path} cpu"] = wall, cpu
        lines.append(
            f"| {path} | {r.median('wall') * 1e3:.0f} ms | {p.median('wall') * 1e3:.0f} ms | {wall:.2f}× | "
            f"{r.median('cpu') * 1e3:.0f} ms | {p.median('cpu') * 1e3:.0f} ms | {cpu:.2f}× |"
        )
    lines += ["", f"Target: PR-Net ≥ 1.6× faster than ResNet (MAC limit {MACS['resnet'] / MACS['prnet']:.2f}×)."]
    return lines, ratios


class StepClock(pl.Callback):
    """Wall and CPU time of every training batch (forward, backward(s) and optimizer step(s))."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx > 0:  # the first batch of every round is a warm-up
            self.clock.__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx > 0:
            self.clock.__exit__()


class SubStepClock:
    """Wraps PR-Net's sub-step methods and times each call."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.clocks: dict[str, Clock] = {}
        for step in module.step_order:
            setattr(module, f"_{step}_step", self._wrap(step, getattr(module, f"_{step}_step")))

    def _wrap(self, step: str, method: Callable) -> Callable:
        clock = self.clocks.setdefault(step, Clock())

        def timed(*args: Any) -> Any:
            with clock:
                return method(*args)

        return timed


class FullBackwardPRNet(models.PRNetModule):
    """Algorithm 1 before issue 27: every sub-step's backward computes the gradients of every parameter."""

    def _optimize(self, optimizer: Any, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not self._all_finite(terms):
            return
        self.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()


def training(data_dir: str, batch: int, steps: int, rounds: int) -> tuple[list[str], dict[str, float]]:
    pl.seed_everything(0, verbose=False)
    fresh = {name: build(name) for name in NAMES}
    pl.seed_everything(0, verbose=False)
    fresh["prnet (before)"] = build("prnet", FullBackwardPRNet)
    train = mnist(data_dir, "fit")
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=batch, shuffle=False)))
    same_batch = torch.utils.data.TensorDataset(x.repeat(steps + 1, 1, 1, 1), y.repeat(steps + 1))
    batches = torch.utils.data.DataLoader(same_batch, batch_size=batch)  # the same batch every step
    names = list(fresh)
    clocks = {name: Clock() for name in names}
    substeps = SubStepClock(fresh["prnet"])
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                callbacks=[StepClock(clocks[name])],
            )
            trainer.fit(fresh[name], batches)
    p, r = clocks["prnet"], clocks["resnet"]
    wall, cpu = p.median("wall") / r.median("wall"), p.median("cpu") / r.median("cpu")
    lines = [
        f"Training, batch {batch} of MNIST, {rounds} interleaved rounds of {steps} timed steps "
        f"({len(p.wall)} steps per model):",
        "",
        "| step | wall (median) | CPU (median) | vs ResNet step (wall) | vs ResNet step (CPU) |",
        "|---|---|---|---|---|",
        f"| ResNet step | {r.median('wall') * 1e3:.0f} ms | {r.median('cpu') * 1e3:.0f} ms | 1.00× | 1.00× |",
        f"| PR-Net Algorithm-1 iteration | {p.median('wall') * 1e3:.0f} ms | {p.median('cpu') * 1e3:.0f} ms | "
        f"{wall:.2f}× | {cpu:.2f}× |",
    ]
    b = clocks["prnet (before)"]
    lines.append(
        f"| PR-Net iteration before (every backward over every parameter) | {b.median('wall') * 1e3:.0f} ms | "
        f"{b.median('cpu') * 1e3:.0f} ms | {b.median('wall') / r.median('wall'):.2f}× | "
        f"{b.median('cpu') / r.median('cpu'):.2f}× |"
    )
    for step, clock in substeps.clocks.items():
        lines.append(
            f"| — {step} sub-step | {clock.median('wall') * 1e3:.0f} ms | "
            f"{clock.median('cpu') * 1e3:.0f} ms | "
            f"{clock.median('wall') / r.median('wall'):.2f}× | {clock.median('cpu') / r.median('cpu'):.2f}× |"
        )
    lines += ["", "Target: one Algorithm-1 iteration ≤ 1.3× a ResNet step."]
    return lines, {"training wall": wall, "training cpu": cpu, "training before cpu": b.median("cpu") / r.median("cpu")}


def profile(data_dir: str, count: int) -> list[str]:
    """CPU time per top-level layer of both networks on the framework path (chunks), summed over the chunks."""
    images = next(iter(torch.utils.data.DataLoader(mnist(data_dir, "test"), batch_size=count)))[0]
    lines = ["| model | layer | CPU ms per image batch |", "|---|---|---|"]
    for name in NAMES:
        module = load_model(REPO / "bench" / "checkpoints" / "mnist" / f"{name}.ckpt")
        net = module.network
        layers = [(f"stem.{i} {type(layer).__name__}", layer) for i, layer in enumerate(net.stem)]
        feature = list(net.feature) if isinstance(net.feature, torch.nn.Sequential) else [net.feature]
        layers += [(f"feature.{i} {type(layer).__name__}", layer) for i, layer in enumerate(feature)]
        layers += [("head", net.head)]
        totals = dict.fromkeys((label for label, _ in layers), 0.0)
        with torch.inference_mode():
            for _ in range(2):  # the first pass warms up
                totals = dict.fromkeys(totals, 0.0)
                for x in images.split(module.inference_chunk_size or count):
                    for label, layer in layers:
                        start = time.thread_time()
                        x = layer(x)
                        totals[label] += time.thread_time() - start
        lines += [f"| {name} | {label} | {seconds * 1e3:.1f} |" for label, seconds in totals.items()]
        lines.append(f"| {name} | **total** | {sum(totals.values()) * 1e3:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--rounds", type=positive_int, default=15, help="interleaved inference rounds")
    parser.add_argument("--batch", type=positive_int, default=32, help="training batch (configs/mnist: 32)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed training steps per model per round")
    parser.add_argument("--train-rounds", type=positive_int, default=8)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--chunks", type=positive_int, nargs="*", default=[], help="also time these chunk sizes")
    parser.add_argument(
        "--parts", nargs="+", default=["inference", "training"], choices=["inference", "training", "profile"]
    )
    args = parser.parse_args()
    with missing_data_exits(args.data_dir):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    summary: dict[int, dict[str, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n### {threads} thread{'s' * (threads > 1)}\n")
        summary[threads] = {}
        if "inference" in args.parts:
            lines, ratios = inference(args.data_dir, args.images, args.rounds, args.chunks)
            summary[threads].update(ratios)
            print("\n".join(lines) + "\n", flush=True)
        if "training" in args.parts:
            lines, ratios = training(args.data_dir, args.batch, args.steps, args.train_rounds)
            summary[threads].update(ratios)
            print("\n".join(lines) + "\n", flush=True)
        if "profile" in args.parts:
            print("\n".join(profile(args.data_dir, args.images)) + "\n", flush=True)
    for threads, ratios in summary.items():
        print(f"{threads} thread(s): " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
