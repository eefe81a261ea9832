"""PR-Net versus ResNet and ODE-Net on MNIST-shaped data, side by side in one process.

Measures (issue 3, item 5):

* inference time of one batch of 1,000 images (ResNet, ODE-Net with dopri5 at rtol = atol = 1e-3,
  PR-Net: one evaluation of f at the learned query set, no derivatives);
* training step time: a ResNet step, an ODE-Net step (dopri5 + adjoint) and one full Algorithm-1
  iteration of PR-Net (task, theta, query and alpha sub-steps), each through Lightning's Trainer;
* the PR-Net breakdown per sub-step, the share of the derivative computation (Taylor mode), and
  the same theta step with the naive nested-``jvp`` derivatives for scale.

Models come from configs/mnist/{resnet,odenet,prnet}.yaml. With ``--train-batches N`` every model
is first trained on N batches of real MNIST (``--data-dir``), which makes ODE-Net's dynamics (and
NFE) realistic, and its test accuracy is reported.

    python bench/bench_prnet.py --output bench/results_prnet.md
    python bench/bench_prnet.py --train-batches 200 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from _common import check_output, non_negative_int, positive_int
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning_pdenets.models as models  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402

NAMES = ("resnet", "odenet", "prnet")


VARIANTS = {"prnet (governing_samples=32)": ("prnet", {"governing_samples": 32})}


def build(name: str) -> pl.LightningModule:
    """The model of configs/mnist/<name>.yaml (init_args as written there, MNIST's data facts), or of a VARIANTS entry."""
    name, overrides = VARIANTS.get(name, (name, {}))
    config = yaml.safe_load((REPO / "configs" / "mnist" / f"{name}.yaml").read_text())["model"]
    cls = getattr(models, config["class_path"].rsplit(".", 1)[-1])
    mnist_facts = dict(num_classes=10, in_channels=1, image_size=28)  # what the CLI links from MNISTDataModule
    return cls(**{**mnist_facts, **config.get("init_args", {}), **overrides})


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward(s) and optimizer step(s))."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class SubStepTimer:
    """Wraps PRNetModule's sub-step methods and times each call."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.seconds: dict[str, list[float]] = {}
        for step in module.step_order:
            method = getattr(module, f"_{step}_step")
            setattr(module, f"_{step}_step", self._wrap(step, method))

    def _wrap(self, step: str, method: Callable) -> Callable:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = method(*args)
            self.seconds.setdefault(step, []).append(time.perf_counter() - start)
            return result

        return timed


def trainer(steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def theta_step_seconds(module, x: torch.Tensor, y: torch.Tensor, derivatives: str | None, repeats: int) -> float:
    """Forward + backward of the theta step's loss: with Taylor / jvp derivatives, or without (None)."""
    hp = module.hparams
    h0 = module.network.stem(x).detach()
    orders = dict(module.governing.max_derivative_order)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        if derivatives is None:
            u = module.block(h0)
            loss = F.cross_entropy(module.network.head(u), y) + hp.initial_weight * module.block.initial_condition_loss(
                h0
            )
        else:
            d = module.block.derivatives(h0, orders, method=derivatives)
            library = module.governing.library(d)
            loss = (
                F.cross_entropy(module.network.head(d.u), y)
                + hp.initial_weight * module.block.initial_condition_loss(h0)
                + hp.governing_weight * module.governing.governing_loss(d.u_t, library)
            )
        loss.backward()

    return median_seconds(step, repeats)


def mnist(data_dir: str, train: bool):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    return datasets.MNIST(data_dir, train=train, download=False, transform=transform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--inference-batch", type=positive_int, default=1000)
    parser.add_argument(
        "--steps", type=positive_int, default=8, help="timed training steps per model (after 2 warm-up steps)"
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--train-batches", type=non_negative_int, default=0, help="train on real MNIST first (0: random init)"
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output", default=None, help="append a Markdown table to this file")
    args = parser.parse_args()
    check_output(parser, args.output)
    if args.train_batches and not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.error(f"--data-dir {args.data_dir!r}: no MNIST/raw there (torchvision's layout) for --train-batches")
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.inference_batch, 1, 28, 28, generator=generator)
    random_batches = TensorDataset(
        torch.randn(args.batch_size * (args.steps + 2), 1, 28, 28, generator=generator),
        torch.randint(0, 10, (args.batch_size * (args.steps + 2),), generator=generator),
    )
    rows: dict[str, dict[str, float]] = {}
    substeps: dict[str, dict[str, float]] = {}
    names = NAMES + tuple(VARIANTS)
    modules = {name: build(name) for name in names}

    for name in tqdm(names, desc="models"):
        module, row = modules[name], {}
        row["params"] = sum(p.numel() for p in (module.network.parameters()))
        if args.train_batches > 0:
            train = DataLoader(mnist(args.data_dir, True), args.batch_size, shuffle=True)
            trainer(args.train_batches, []).fit(module, train)
            test = DataLoader(mnist(args.data_dir, False), 1000)
            module.eval()
            with torch.no_grad():
                correct = sum((module(x).argmax(1) == y).sum().item() for x, y in test)
            row["test_acc"] = correct / 10000
        # training steps through the Trainer (the same overhead for every model)
        timer = StepTimer()
        sub = SubStepTimer(module) if name.startswith("prnet") else None
        trainer(args.steps + 2, [timer]).fit(module, DataLoader(random_batches, args.batch_size))
        row["train_step_s"] = statistics.median(timer.seconds[2:])
        if sub is not None:
            substeps[name] = {step: statistics.median(times[2:]) for step, times in sub.seconds.items()}
        # inference on 1,000 images
        module.eval()
        blocks = find_ode_blocks(module)
        before = sum(b.nfe_forward for b in blocks)  # the counters only increase: take the difference
        with torch.no_grad():
            row["inference_s"] = median_seconds(lambda: module(images), args.repeats)
        if blocks:
            row["nfe_per_forward"] = (sum(b.nfe_forward for b in blocks) - before) / (args.repeats + 1)
        module.train()
        rows[name] = row

    prnet = modules["prnet"]
    x, y = random_batches.tensors[0][: args.batch_size], random_batches.tensors[1][: args.batch_size]
    theta = {kind: theta_step_seconds(prnet, x, y, kind, args.repeats) for kind in (None, "taylor", "jvp")}
    h0 = prnet.network.stem(x).detach()
    orders = dict(prnet.governing.max_derivative_order)
    with torch.no_grad():
        derivative_forward = median_seconds(lambda: prnet.block.derivatives(h0, orders), args.repeats)

    iteration = rows["prnet"]["train_step_s"]
    resnet_step, odenet_step = rows["resnet"]["train_step_s"], rows["odenet"]["train_step_s"]
    derivative_share = (theta["taylor"] - theta[None]) / iteration
    lines = [
        f"## PR-Net benchmark ({datetime.date.today()}, 2-core CPU container, torch {torch.__version__}, "
        f"{args.threads} threads)",
        "",
        f"Command: `python bench/bench_prnet.py {' '.join(sys.argv[1:])}`; batch {args.batch_size} for training, "
        f"{args.inference_batch} images for inference; "
        + (
            "random initialization, random MNIST-shaped inputs."
            if args.train_batches == 0
            else f"each model first trained on {args.train_batches} batches of real MNIST."
        ),
        "",
        "| model | params | inference 1,000 images (s) | training step (s) | train step / ResNet | NFE fwd |"
        + (" test acc |" if args.train_batches else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.train_batches else ""),
    ]
    for name in names:
        r = rows[name]
        lines.append(
            f"| {name} | {r['params']:,} | {r['inference_s']:.3f} | {r['train_step_s']:.3f} | "
            f"{r['train_step_s'] / resnet_step:.2f}x | {r.get('nfe_per_forward', '-')} |"
            + (f" {r['test_acc']:.4f} |" if args.train_batches else "")
        )
    p_inf = rows["prnet"]["inference_s"]
    lines += [
        "",
        f"- Inference speed-up of PR-Net: {rows['odenet']['inference_s'] / p_inf:.2f}x vs ODE-Net (target >= 4x), "
        f"{rows['resnet']['inference_s'] / p_inf:.2f}x vs ResNet (target > 1x).",
        f"- One Algorithm-1 iteration: {iteration / resnet_step:.2f}x a ResNet step (target <= 3x), "
        f"{iteration / odenet_step:.2f}x an ODE-Net step (target < 1x).",
        *(
            f"- {name} sub-steps (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
            for name, steps in substeps.items()
        ),
        f"- With governing_samples=32: one iteration {rows[names[-1]]['train_step_s'] / resnet_step:.2f}x a ResNet step.",
        f"- Derivative computation: forward {derivative_forward:.3f} s; theta step (fwd+bwd) {theta['taylor']:.3f} s "
        f"with derivatives vs {theta[None]:.3f} s without, i.e. {100 * derivative_share:.0f}% of the iteration.",
        f"- Naive nested-jvp derivatives instead: theta step {theta['jvp']:.3f} s = {theta['jvp'] / resnet_step:.1f}x "
        f"a ResNet step (Taylor mode: {theta['taylor'] / resnet_step:.1f}x).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
