"""Check the named pretrained models against their recorded test accuracies (issue 31).

Every model of :mod:`lightning_pdenets.pretrained` is loaded by name (SHA-256 checked, ``weights_only=True``) and
tested on its dataset's full test set; the table gives the recorded and the measured accuracy. The MNIST models need
the MNIST files (no download); the quickstart model uses scikit-learn's bundled digits.

    OMP_NUM_THREADS=1 python bench/bench_pretrained.py --data-dir ../shared/data --output bench/results_pretrained.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import check_output, missing_data_exits, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_pdenets import pretrained  # noqa: E402
from lightning_pdenets.callbacks import NFEMonitor  # noqa: E402
from lightning_pdenets.data import DigitsDataModule, MNISTDataModule  # noqa: E402


def datamodule(name: str, data_dir: str) -> pl.LightningDataModule:
    """The test data of pretrained model ``name``."""
    if pretrained.info(name).dataset == "MNIST":
        return MNISTDataModule(data_dir=data_dir, download=False, batch_size=128)
    return DigitsDataModule()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/ (as for configs/mnist/*.yaml)")
    parser.add_argument("--names", nargs="+", default=pretrained.list_models(), choices=pretrained.list_models())
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--output", type=Path, help="write the table here (Markdown) besides printing it")
    args = parser.parse_args(argv)
    check_output(parser, args.output)
    torch.set_num_threads(args.threads)
    with missing_data_exits(args.data_dir):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    lines = [
        f"Pretrained models against their recorded accuracies, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}, {args.threads} thread(s).",
        "",
        "| name | model | dataset | test images | recorded accuracy | measured accuracy | forward NFE per test batch | test time | SHA-256 (first 12) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.names:
        entry = pretrained.info(name)
        model = pretrained.load(name)
        data = datamodule(name, args.data_dir)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[NFEMonitor()],
        )
        start = time.perf_counter()
        result = trainer.test(model, datamodule=data, verbose=False)[0]
        seconds = time.perf_counter() - start
        images = len(data.test_set)
        nfe = f"{result['test/nfe_forward']:.1f}" if "test/nfe_forward" in result else "—"
        lines.append(
            f"| {name} | {entry.model.rsplit('.', 1)[-1]} | {entry.dataset} | {images:,} | {entry.test_accuracy:.4f} "
            f"| {result['test/acc_top1']:.4f} | {nfe} | {seconds:.1f} s | {entry.sha256[:12]} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
