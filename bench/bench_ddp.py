"""DDP on 2 CPU processes (gloo) against 1 process, same global batch: throughput and equality of results.

    python bench/bench_ddp.py --models odenet prnet --steps 20 --output bench/results_ddp.md

Each configuration runs in its own subprocess (Lightning's "ddp" strategy relaunches this script
for rank 1). Both layouts see the same samples per step (``--steps`` batches; PR-Net makes four
optimizer steps per batch), so fixed-cost models agree to float tolerance. Adaptive solvers
(ODE-Net's dopri5) control the error over the whole batch tensor, so a half batch takes other
steps than the full one and the parameters differ by more than rounding: that difference is the
solver's, not DDP's. The table reports the largest difference; times include Trainer start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import check_output, missing_data_exits, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "odenet": REPO / "configs/mnist/odenet.yaml",
    "prnet": REPO / "configs/mnist/prnet.yaml",
    "resnet": REPO / "configs/mnist/resnet.yaml",
    "rknet": REPO / "configs/mnist/rknet.yaml",
}


def worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch

    from lightning_pdenets.cli import build_cli

    pl.seed_everything(0)
    cli = build_cli(
        [
            "--config",
            str(CONFIGS[args.model]),
            f"--data.init_args.data_dir={args.data_dir}",
            "--data.init_args.download=false",
            f"--data.init_args.global_batch_size={args.global_batch}",
            "--data.init_args.augment=false",
            "--trainer.logger=false",
        ],
        run=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    if trainer.global_rank == 0:
        parameters = torch.cat([p.detach().flatten() for p in cli.model.parameters()])
        torch.save({"parameters": parameters, "seconds": seconds}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["odenet", "prnet"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--global-batch", type=positive_int, default=128)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with missing_data_exits(args.data_dir):
            return worker(args)
    check_output(parser, args.output)

    import torch

    rows = []
    for model in args.models:
        results = {}
        for devices in (1, 2):
            out = Path(f"/tmp/bench_ddp_{model}_{devices}.pt")
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // devices))}
            finished = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--model",
                    model,
                    "--devices",
                    str(devices),
                    "--steps",
                    str(args.steps),
                    "--global-batch",
                    str(args.global_batch),
                    "--data-dir",
                    args.data_dir,
                    "--out",
                    str(out),
                ],
                env=env,
                cwd="/tmp",
            )
            if finished.returncode:
                raise SystemExit(
                    f"bench_ddp.py: the {model} run on {devices} process(es) failed (exit status "
                    f"{finished.returncode}; its error is above)"
                )
            results[devices] = torch.load(out)
        difference = (results[1]["parameters"] - results[2]["parameters"]).abs().max().item()
        samples = args.steps * args.global_batch
        rows.append((model, samples / results[1]["seconds"], samples / results[2]["seconds"], difference))
        print(json.dumps(rows[-1]))
    lines = [
        f"### DDP, 2 CPU processes (gloo) vs 1 ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} steps at global batch "
        f"{args.global_batch} on MNIST; threads split evenly between processes.",
        "",
        f"Command: `python bench/bench_ddp.py {' '.join(sys.argv[1:])}`",
        "",
        "| model | 1 process, samples/s | 2 processes, samples/s | speed-up | max parameter difference |",
        "|---|---|---|---|---|",
    ]
    for model, single, double, difference in rows:
        lines.append(f"| {model} | {single:.1f} | {double:.1f} | {double / single:.2f}× | {difference:.2e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.write_text(table)


if __name__ == "__main__":
    main()
