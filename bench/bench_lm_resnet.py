"""Training-step time of LM-ResNet-56 against ResNet-56 (CIFAR-10), measured side by side.

One training step = zero_grad, forward, cross-entropy, backward, SGD step (the CIFAR recipe:
lr 0.1, momentum 0.9, weight decay 1e-4). The two networks are timed in alternating rounds (the
order flips every round) so that drifts in machine load hit both alike; the overhead is the median
of the per-round ratios, with its interquartile range. Both wall-clock time and the process's CPU
time are recorded: on a shared, oversubscribed machine the CPU time (with ``--threads 1``, free of
thread spin-waiting) is the steadier measure of the work a step costs.

    flock /tmp/pdenets-cpu.lock python bench/bench_lm_resnet.py --batch-size 32 --threads 1 --rounds 15 \
        --steps-per-round 2

With ``--compile`` both networks go through ``torch.compile`` (inductor) before timing, which fuses the
LM update's element-wise work into the neighbouring kernels; compilation happens in the warm-up.
``--device cuda`` times on a GPU (the clock waits for the GPU at both ends of each timed run; the
CPU-time column then measures the host only).

(bench/results_lm_resnet.md holds the measured table plus an analysis of the overhead.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import check_output, non_negative_int, positive_int
from tqdm import tqdm

from lightning_pdenets.architectures import lm_resnet_cifar, preact_resnet_cifar


def training_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images, labels = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], repeats: int, device: torch.device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per step; on a GPU the clock waits for its queued work."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, median, q3


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=positive_int, default=56)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--steps-per-round", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--k-mode", default="scalar", choices=["scalar", "channel"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks (inductor) before timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--channels-last", action="store_true", help="networks and input in NHWC memory format")
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args()
    check_output(parser, args.output)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device).to(memory_format=memory_format)
    batch = (images, torch.randint(0, 10, (args.batch_size,), device=device))
    torch.manual_seed(0)
    plain = preact_resnet_cifar(args.depth).to(device, memory_format=memory_format).train()
    torch.manual_seed(0)
    lm = lm_resnet_cifar(args.depth, k_mode=args.k_mode).to(device, memory_format=memory_format).train()
    run_plain, run_lm = (torch.compile(plain), torch.compile(lm)) if args.compile else (plain, lm)
    steps = {"ResNet": training_step(run_plain, batch), "LM-ResNet": training_step(run_lm, batch)}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        synchronize(device)
        print(f"{name}: {args.warmup} warm-up steps in {time.perf_counter() - start:.1f} s", flush=True)

    clocks = ("wall", "cpu")
    seconds: dict[tuple[str, str], list[float]] = {(name, clock): [] for name in steps for clock in clocks}
    for round_index in tqdm(range(args.rounds), desc="rounds"):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            for clock, value in zip(clocks, time_steps(steps[name], args.steps_per_round, device)):
                seconds[name, clock].append(value)

    rows = []
    for name, model in (("ResNet", plain), ("LM-ResNet", lm)):
        params = sum(p.numel() for p in model.parameters())
        times = " | ".join(f"{1e3 * statistics.median(seconds[name, clock]):.1f}" for clock in clocks)
        rows.append(f"| {name}-{args.depth} | {params:,} | {times} |")
    summary = []
    for clock in clocks:
        ratios = [lm / plain for lm, plain in zip(seconds["LM-ResNet", clock], seconds["ResNet", clock])]
        q1, ratio, q3 = quartiles(ratios)
        summary.append(f"| {clock} | **{ratio:.3f}** | {q1:.3f}–{q3:.3f} | {100 * (ratio - 1):+.1f}% |")
    command = (
        f"flock /tmp/pdenets-cpu.lock python bench/bench_lm_resnet.py --depth {args.depth} --batch-size {args.batch_size} "
        f"--threads {args.threads} --rounds {args.rounds} --steps-per-round {args.steps_per_round} --k-mode {args.k_mode}"
        + (" --compile" if args.compile else "")
        + (f" --device {args.device}" if device.type != "cpu" else "")
        + (" --channels-last" if args.channels_last else "")
    )
    report = "\n".join(
        [
            "# LM-ResNet vs ResNet: training-step time",
            "",
            f"Date: {datetime.date.today().isoformat()}. Machine: {machine(device)}, torch {torch.__version__}, "
            f"{args.threads} threads. Batch {args.batch_size} of 3×32×32 CIFAR-size inputs, SGD step included; "
            f"{args.rounds} alternating rounds of {args.steps_per_round} steps after {args.warmup} warm-up steps each; "
            f"k_mode={args.k_mode}; {'both networks torch.compile-d (inductor)' if args.compile else 'eager mode'}; "
            f"{'channels-last' if args.channels_last else 'contiguous'} memory format.",
            "",
            f"Command: `{command}`",
            "",
            "| network | parameters | median wall time per step (ms) | median CPU time per step (ms) |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "LM-ResNet / ResNet step-time ratio, median of the per-round ratios (target: overhead at most +5%):",
            "",
            "| clock | ratio | interquartile range | overhead |",
            "|---|---:|---:|---:|",
            *summary,
            "",
        ]
    )
    print(report)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
