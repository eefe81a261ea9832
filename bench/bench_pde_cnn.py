"""Benchmarks of the PDE-motivated CNNs (Ruthotto & Haber) on CPU.

1. Memory against depth: Hamiltonian and second-order blocks with standard autograd against the
   reversible backward (Chang et al. 2018) at 4, 16 and 64 time steps: activation memory kept
   for backward (bytes autograd saves, from ``saved_tensors_hooks``), the process's peak RSS
   growth during forward + backward, and the time of one forward + backward.
2. The STL-10 network of the three dynamics side by side (paper widths, 96×96 inputs, CPU batch):
   time of one SGD training step and peak RSS growth.
3. A smoke run of ``pdenets fit`` with each STL-10 config on fabricated STL-10 files (STL-10
   cannot be downloaded here), CPU-sized: a few batches of one epoch.

Every measurement runs in a fresh subprocess so that peak-RSS figures do not mix. Run under
the shared CPU lock:

    flock /tmp/pdenets-cpu.lock python bench/bench_pde_cnn.py --output bench/results_pde_cnn.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import check_output, positive_int
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def saved_bytes(run, parameters) -> int:
    """Bytes of the non-parameter tensors autograd saves while ``run()`` builds the graph."""
    import torch

    parameter_pointers = {p.data_ptr() for p in parameters}
    saved: dict[tuple[int, Any], int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameter_pointers:
            saved[(tensor.data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


def measure_block(config: dict[str, Any]) -> dict[str, Any]:
    """One block configuration, in its own process."""
    import torch

    from lightning_pdenets.blocks import HamiltonianBlock, SecondOrderBlock

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    block_class = {"hamiltonian": HamiltonianBlock, "second_order": SecondOrderBlock}[config["dynamics"]]
    block = block_class(
        config["channels"], num_steps=config["steps"], step_size=1.0 / config["steps"], reversible=config["reversible"]
    )
    x = torch.randn(config["batch"], config["channels"], config["size"], config["size"], requires_grad=True)

    def forward_backward():
        block(x).square().mean().backward()

    warmup = block_class(config["channels"], num_steps=1, reversible=config["reversible"])
    warmup(x).sum().backward()  # thread pools and allocator warm-up, one step only
    x.grad = None
    stored = saved_bytes(lambda: block(x).square().mean(), list(block.parameters()))
    rss_before = current_rss_bytes()
    forward_backward()
    peak_growth = max(0, peak_rss_bytes() - rss_before)
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    return {
        **config,
        "saved_bytes": stored,
        "peak_rss_growth": peak_growth,
        "time_s": statistics.median(times),
        "state_bytes": x.numel() * 4,
    }


def measure_network(config: dict[str, Any]) -> dict[str, Any]:
    """One training step of the STL-10 network, in its own process."""
    import torch
    import torch.nn.functional as F

    from lightning_pdenets.architectures import PDECNN

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    network = PDECNN(config["dynamics"], reversible=config["reversible"])
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(config["batch"], 3, 96, 96)
    y = torch.arange(config["batch"]) % 10

    def train_step():
        optimizer.zero_grad()
        F.cross_entropy(network(x), y).backward()
        optimizer.step()

    train_step()  # warm-up (allocates gradients and momentum buffers)
    rss_before = current_rss_bytes()
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
    return {
        **config,
        "peak_rss_growth": max(0, peak_rss_bytes() - rss_before),
        "time_s": statistics.median(times),
        "parameters": sum(p.numel() for p in network.parameters()),
    }


def smoke_run(config: dict[str, Any]) -> dict[str, Any]:
    """``pdenets fit`` with one STL-10 config on fabricated files, in its own process."""
    import os

    import torch

    sys.path.insert(0, str(REPO))
    from lightning_pdenets.cli import build_cli
    from tests.fakedata.stl10 import fake_stl10

    torch.set_num_threads(config["threads"])
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        overrides = fake_stl10(Path(folder) / "data", n_train=160, n_test=40)
        args = ["fit", "--config", str(REPO / "configs" / "stl10" / f"{config['dynamics']}.yaml")]
        args += [f"--data.init_args.{key}={value}" for key, value in overrides.items()]
        args += [
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            "--data.init_args.val_size=20",
            "--trainer.max_epochs=1",
            f"--trainer.max_steps={config['batches']}",
            "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
        ]
        start = time.perf_counter()
        cli = build_cli(args)
        elapsed = time.perf_counter() - start
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return {
        **config,
        "wall_s": elapsed,
        "train_loss": metrics.get("train/loss_epoch", float("nan")),
        "tv_time": metrics.get("train/tv_time_epoch", float("nan")),
        "steps": cli.trainer.global_step,
    }


def run_isolated(function, configs: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    context = mp.get_context("spawn")
    results = []
    for config in tqdm(configs, desc=label):
        with context.Pool(1) as pool:
            results.append(pool.apply(function, (config,)))
    return results


def flush(lines: list[str], output: Path | None) -> None:
    """Write the results so far (a crash in a later section keeps the earlier tables)."""
    if output is not None:
        output.write_text("\n".join(lines))


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown results here")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--channels", type=positive_int, default=32)
    parser.add_argument("--size", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--network-batch", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--smoke-batches", type=positive_int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "network", "smoke"])
    args = parser.parse_args()
    check_output(parser, args.output)
    lines = [
        "# PDE-motivated CNNs (Ruthotto & Haber): benchmarks",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: 2-core CPU container "
        f"(shared; torch threads = {args.threads}). Each row runs in a fresh process.",
        "",
        f"Command: `flock /tmp/pdenets-cpu.lock python bench/bench_pde_cnn.py {' '.join(sys.argv[1:])}`",
        "",
    ]

    if "memory" not in args.skip:
        configs = [
            dict(
                dynamics=d,
                steps=s,
                reversible=r,
                channels=args.channels,
                size=args.size,
                batch=args.batch,
                threads=args.threads,
                repeats=args.repeats,
            )
            for d in ("hamiltonian", "second_order")
            for s in args.steps
            for r in (False, True)
        ]
        results = run_isolated(measure_block, configs, "memory vs depth")
        by_key = {(r["dynamics"], r["steps"], r["reversible"]): r for r in results}
        lines += [
            f"## Activation memory and time against depth (one block, {args.channels} channels, "
            f"{args.size}×{args.size}, batch {args.batch}, forward + backward)",
            "",
            "Saved = bytes autograd keeps for backward (non-parameter tensors); peak = growth of the process's peak "
            "RSS during one forward + backward. Ratios are standard / reversible.",
            "",
            "| dynamics | steps | saved std (MiB) | saved rev (MiB) | saved ratio | peak std (MiB) | peak rev (MiB) "
            "| peak ratio | time std (s) | time rev (s) | time ratio rev/std |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for dynamics in ("hamiltonian", "second_order"):
            for steps in args.steps:
                std, rev = by_key[dynamics, steps, False], by_key[dynamics, steps, True]
                lines.append(
                    f"| {dynamics} | {steps} | {mib(std['saved_bytes'])} | {mib(rev['saved_bytes'])} | "
                    f"{std['saved_bytes'] / max(rev['saved_bytes'], 1):.1f}× | {mib(std['peak_rss_growth'])} | "
                    f"{mib(rev['peak_rss_growth'])} | {std['peak_rss_growth'] / max(rev['peak_rss_growth'], 1):.1f}× | "
                    f"{std['time_s']:.3f} | {rev['time_s']:.3f} | {rev['time_s'] / std['time_s']:.2f} |"
                )
        lines.append("")
        flush(lines, args.output)

    if "network" not in args.skip:
        configs = [
            dict(dynamics=d, reversible=r, batch=args.network_batch, threads=args.threads, repeats=args.repeats)
            for d, r in (
                ("parabolic", False),
                ("hamiltonian", False),
                ("hamiltonian", True),
                ("second_order", False),
                ("second_order", True),
            )
        ]
        results = run_isolated(measure_network, configs, "STL-10 network")
        lines += [
            f"## STL-10 network, three dynamics side by side (widths 16/64/128/256, 3 steps per block, 96×96, "
            f"batch {args.network_batch}, one SGD step)",
            "",
            "| dynamics | reversible | parameters | step time (s) | peak RSS growth (MiB) |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['dynamics']} | {r['reversible']} | {r['parameters']:,} | {r['time_s']:.2f} | "
                f"{mib(r['peak_rss_growth'])} |"
            )
        lines.append("")
        flush(lines, args.output)

    if "smoke" not in args.skip:
        configs = [
            dict(dynamics=d, batches=args.smoke_batches, threads=args.threads)
            for d in ("parabolic", "hamiltonian", "second_order")
        ]
        results = run_isolated(smoke_run, configs, "smoke runs")
        lines += [
            "## Smoke run: `pdenets fit --config configs/stl10/<dynamics>.yaml` on fabricated STL-10 files",
            "",
            f"Paper-size network and optimizer settings; CPU-sized data: 160 fabricated training images, batch 16, "
            f"{args.smoke_batches} SGD steps (lr 0.1), TV-in-time and box projection callbacks active.",
            "",
            "| dynamics | optimizer steps | mean train loss | mean α₁·TV | wall time (s) |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['dynamics']} | {r['steps']} | {r['train_loss']:.3f} | {r['tv_time']:.3f} | {r['wall_s']:.1f} |"
            )
        lines.append("")

    flush(lines, args.output)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
