"""Issue 27 item 6, at 2 threads: how ResNet's and PR-Net's 1,000-image inference could use two cores.

Times, interleaved (median of ``--rounds`` after one warm-up), under ``inference_mode`` with
``torch.set_num_threads(--threads)``: one batch; chunks of 16, 64 and 250 at the full intra-op thread count; and
two Python worker threads at one intra-op thread each, each taking half of the chunks of 16 (grad mode is
thread-local, so each worker re-enters ``inference_mode``). The framework's ``forward`` uses chunks at one thread
only; this script measures what a worker-thread path would give before it is built.

    OMP_NUM_THREADS=2 python bench/bench_inference_threads.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import at_least, missing_data_exits, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_solve_speed import load_model, test_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=at_least(2), default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with missing_data_exits(args.data_dir):
        x = test_images(args.data_dir, args.images)
    models = {
        name: load_model(REPO / "bench" / "checkpoints" / "mnist" / f"{name}.ckpt") for name in ("resnet", "prnet")
    }
    pool = ThreadPoolExecutor(args.threads)

    def workers(network: torch.nn.Module, chunk: int) -> torch.Tensor:
        parts = x.split(chunk)
        share = -(-len(parts) // args.threads)

        def run(own: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            with torch.inference_mode():
                return [network(p) for p in own]

        torch.set_num_threads(1)
        try:
            futures = [pool.submit(run, parts[i : i + share]) for i in range(0, len(parts), share)]
            return torch.cat([out for f in futures for out in f.result()])
        finally:
            torch.set_num_threads(args.threads)

    variants = {}
    for name, module in models.items():
        net = module.network
        variants[(name, "one batch")] = lambda net=net: net(x)
        for chunk in (16, 64, 250):
            variants[(name, f"chunks of {chunk}")] = lambda net=net, c=chunk: torch.cat([net(p) for p in x.split(c)])
        variants[(name, f"{args.threads} workers x chunks of 16")] = lambda net=net: workers(net, 16)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    with torch.inference_mode():
        reference = {name: m.network(x) for name, m in models.items()}
        for (name, _path), run in variants.items():  # every path gives the same logits
            torch.testing.assert_close(run(), reference[name], rtol=1e-4, atol=1e-4)
        for round_ in range(args.rounds):
            for key, run in variants.items():
                start = time.perf_counter()
                run()
                if round_:
                    times[key].append(time.perf_counter() - start)
    print(f"{args.images} MNIST test images, {args.threads} threads, {args.rounds - 1} timed rounds (median):")
    print("| path | ResNet | PR-Net | ResNet / PR-Net |\n|---|---|---|---|")
    for path in dict.fromkeys(p for _, p in variants):
        resnet, prnet = (statistics.median(times[(n, path)]) for n in ("resnet", "prnet"))
        print(f"| {path} | {resnet * 1000:.0f} ms | {prnet * 1000:.0f} ms | {resnet / prnet:.2f}× |")


if __name__ == "__main__":
    main()
