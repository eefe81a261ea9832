"""One-epoch comparison on real MNIST of every model in configs/mnist/ (Table 2 of the PR-Net paper).

For each config the model and datamodule are built by the real CLI, trained for one epoch on
CPU in this same process, and measured side by side: test accuracy, parameters, training
throughput, NFE, and the inference time of one batch of 1,000 test images.

    python bench/bench_mnist.py --data-dir ../shared/data --output bench/results_mnist.md
    python bench/bench_mnist.py --train-fraction 0.05     # quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import check_output, fraction, missing_data_exits, positive_int  # noqa: E402

from lightning_pdenets.cli import build_cli  # noqa: E402
from lightning_pdenets.errors import DatasetNotFoundError  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402


class TrainStepTimer(pl.Callback):
    """Wall time of each training step (forward, backward and optimizer steps), and NFE per step."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.samples = 0
        self.nfe_forward: list[int] = []
        self.nfe_backward: list[int] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self._blocks = find_ode_blocks(pl_module)

    def _counts(self) -> tuple[int, int]:
        return sum(b.nfe_forward for b in self._blocks), sum(b.nfe_backward for b in self._blocks)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counts_before = self._counts()  # the blocks' counters only increase: take differences
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._start)
        self.samples += len(batch[0])
        if self._blocks:
            (forward, backward), (forward0, backward0) = self._counts(), self._counts_before
            self.nfe_forward.append(forward - forward0)
            self.nfe_backward.append(backward - backward0)


def inference_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int = 3) -> tuple[float, int]:
    """Median wall time of classifying ``images`` in one batch (after one warm-up), and its forward NFE."""
    model.eval()
    times, nfe = [], 0
    with torch.no_grad():
        model(images)
        blocks = find_ode_blocks(model)
        for _ in range(repeats):
            before = sum(b.nfe_forward for b in blocks)
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
            nfe = sum(b.nfe_forward for b in blocks) - before
    return statistics.median(times), nfe


def run(config: Path, args: argparse.Namespace) -> dict:
    cli = build_cli(
        [
            "--config",
            str(config),
            f"--data.init_args.data_dir={args.data_dir}",
            "--data.init_args.download=false",
            f"--data.init_args.batch_size={args.batch_size}",
            "--trainer.logger=false",
            *args.override,
            *[arg for stem, arg in args.override_for if stem == config.stem],
        ],
        run=False,
    )
    model, datamodule = cli.model, cli.datamodule
    timer = TrainStepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=args.train_fraction,
        limit_val_batches=0,
        limit_test_batches=args.test_fraction,
        logger=False,
        enable_checkpointing=False,
        callbacks=[timer],
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    datamodule.setup("test")
    images = torch.stack([datamodule.test_set[i][0] for i in range(1000)])
    seconds, inference_nfe = inference_seconds(model, images)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "model": config.stem,
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "test_acc": test["test/acc_top1"],
        "train_samples_per_s": timer.samples / sum(timer.step_seconds),
        "step_ms": 1000 * statistics.median(timer.step_seconds),
        "nfe_forward": mean(timer.nfe_forward),
        "nfe_backward": mean(timer.nfe_backward),
        "inference_s": seconds,
        "inference_nfe": inference_nfe,
    }


def interleaved_inference(configs: list[Path], args: argparse.Namespace) -> str:
    """Inference time of 1,000 images per model, measured round-robin so that machine drift hits all alike."""
    images = torch.randn(1000, 1, 28, 28)
    models = {}
    for config in configs:
        cli = build_cli(
            ["--config", str(config), "--data.init_args.download=false", "--trainer.logger=false"], run=False
        )
        models[config.stem] = cli.model.eval()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    nfe: dict[str, int] = {}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, model in models.items():
            elapsed, nfe[name] = inference_seconds(model, images, repeats=1)
            seconds[name].append(elapsed)
    reference = statistics.median(seconds.get("resnet", next(iter(seconds.values()))))
    lines = [
        f"### MNIST inference, 1,000 images, interleaved ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); models at initialization; {args.rounds} rounds, each model once per "
        f"round after one warm-up; median shown.",
        "",
        f"Command: `python bench/bench_mnist.py {' '.join(sys.argv[1:])}`",
        "",
        "| model | median | vs ResNet | min–max | NFE |",
        "|---|---|---|---|---|",
    ]
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median * 1000:.0f} ms | {median / reference:.2f}× | "
            f"{min(values) * 1000:.0f}–{max(values) * 1000:.0f} ms | {nfe[name] or '—'} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    reference = next((r for r in rows if r["model"] == "resnet"), rows[0])
    lines = [
        f"### MNIST, {args.epochs} epoch(s) of training on CPU ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); batch size {args.batch_size}; train fraction {args.train_fraction}; "
        f"total wall time {wall / 60:.1f} min.",
        "",
        f"Overrides applied to every config: {' '.join(args.override) or 'none'}"
        + "".join(f"; to {stem} only: {arg}" for stem, arg in args.override_for)
        + ".",
        "",
        f"Command: `python bench/bench_mnist.py {' '.join(sys.argv[1:])}`",
        "",
        "| model | params | test acc | train samples/s | train step (median) | step vs ResNet | NFE fwd / bwd per step "
        "| inference, 1,000 images | inference vs ResNet | inference NFE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nfe = "—" if r["nfe_forward"] != r["nfe_forward"] else f"{r['nfe_forward']:.1f} / {r['nfe_backward']:.1f}"
        lines.append(
            f"| {r['model']} ({r['class']}) | {r['params'] / 1e6:.3f}M | {r['test_acc']:.4f} | "
            f"{r['train_samples_per_s']:.0f} | {r['step_ms']:.0f} ms | {r['step_ms'] / reference['step_ms']:.2f}× | {nfe} | "
            f"{r['inference_s'] * 1000:.0f} ms | {r['inference_s'] / reference['inference_s']:.2f}× | "
            f"{r['inference_nfe'] or '—'} |"
        )
    return "\n".join(lines) + "\n"


def _config_and_argument(text: str) -> tuple[str, str]:
    stem, separator, argument = text.partition(":")
    if not (separator and stem and argument):
        raise argparse.ArgumentTypeError(f"expected CONFIG:ARG, e.g. prnet:--model.init_args.lr=0.003, got {text!r}")
    return stem, argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--configs",
        nargs="*",
        type=Path,
        default=[REPO / "configs" / "mnist" / f"{m}.yaml" for m in ("resnet", "rknet", "odenet", "prnet")],
    )
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--train-fraction", type=fraction, default=1.0, help="of the training batches, in (0, 1]")
    parser.add_argument("--test-fraction", type=fraction, default=1.0, help="of the test batches, in (0, 1]")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="CLI arguments applied to every config alike, e.g. a one-epoch recipe: "
        "--override=--model.init_args.optimizer=adam --override=--model.init_args.lr=0.001",
    )
    parser.add_argument(
        "--override-for",
        action="append",
        default=[],
        type=_config_and_argument,
        metavar="CONFIG:ARG",
        help="a CLI argument for one config only (by file stem), e.g. "
        "--override-for=prnet:--model.init_args.theta.lr=0.003",
    )
    parser.add_argument(
        "--inference-only",
        action="store_true",
        help="only time inference of 1,000 images, interleaving the models over --rounds rounds",
    )
    parser.add_argument("--rounds", type=positive_int, default=7)
    args = parser.parse_args()
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        parser.error(f"--configs: no such file: {', '.join(missing)}")
    if not args.configs:
        parser.error("--configs: give at least one config")
    check_output(parser, args.output)
    configs = args.configs
    with missing_data_exits(args.data_dir):
        measure(configs, args)


def measure(configs: list[Path], args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    if args.inference_only:
        table = interleaved_inference(configs, args)
        print(table)
        if args.output:
            args.output.write_text(table)
        return
    start = time.perf_counter()
    rows = []
    failed = []
    for config in tqdm(configs, desc="models"):
        try:
            rows.append(run(config, args))
        except DatasetNotFoundError:
            raise  # no config can run without the data
        except (Exception, SystemExit) as error:  # keep the rows measured so far; report the failure (SystemExit:
            # the CLI rejected the config's arguments, and said why)
            print(f"{config}: failed with {type(error).__name__}: {error}", file=sys.stderr)
            failed.append(str(config))
            continue
        table = markdown(rows, args, time.perf_counter() - start)
        print(table, flush=True)
        if args.output:
            args.output.write_text(table)
    if failed:
        raise SystemExit(
            f"bench_mnist.py: {len(failed)} of {len(configs)} config(s) failed (see above): {', '.join(failed)}"
        )


if __name__ == "__main__":
    main()
