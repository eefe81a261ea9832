"""Does the STL-10 PDE-CNN train at the paper's learning rate? Training loss over the first SGD steps on real data.

STL-10 cannot be downloaded on these machines, so the check trains the STL-10 network (its widths,
3 steps per block, δ_t = 1, the authors' initialization) on real MNIST images from ``--data-dir``
with Ruthotto & Haber's optimizer (SGD, momentum 0.9, weight decay 5e-4, batch 128, box [-1, 1] on
the PDE weights after every step), once with and once without the final normalized connector of the
authors' code. A stable setup drives the loss down; an unstable one lets it grow by orders of magnitude.

    python bench/check_stl10_lr.py --data-dir ../shared/data --lr 0.1 --steps 100 --output bench/results_stl10_lr.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import check_output, positive_int
from torchvision import datasets
from torchvision import transforms as T
from tqdm import tqdm

from lightning_pdenets.architectures.pde_cnn import PDE_CNN_DYNAMICS, PDECNN

REPORT_EVERY = 25


def training_losses(dynamics: str, final_connector: bool, loader, lr: float, steps: int) -> list[float]:
    """Training loss of each of the first ``steps`` SGD steps (stops early once the loss is not finite)."""
    torch.manual_seed(0)
    network = PDECNN(dynamics, in_channels=1, final_connector=final_connector).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    box_constrained = [p for name, p in network.named_parameters() if name.endswith("control_points")]
    losses: list[float] = []
    progress = tqdm(total=steps, desc=f"{dynamics}, final connector {final_connector}", leave=False)
    for images, labels in loader:
        loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for parameter in box_constrained:
                parameter.clamp_(-1.0, 1.0)
        losses.append(loss.item())
        progress.update()
        progress.set_postfix(loss=f"{losses[-1]:.3g}")
        if len(losses) == steps or not math.isfinite(losses[-1]):
            break
    progress.close()
    return losses


def window_means(losses: list[float]) -> list[str]:
    """Mean loss of step 0, then of each window of ``REPORT_EVERY`` steps."""
    windows = [losses[:1]] + [losses[start : start + REPORT_EVERY] for start in range(1, len(losses), REPORT_EVERY)]
    return [f"{sum(w) / len(w):.3g}" for w in windows if w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="directory holding MNIST/raw (torchvision layout)")
    parser.add_argument("--dynamics", nargs="+", default=sorted(PDE_CNN_DYNAMICS), choices=sorted(PDE_CNN_DYNAMICS))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    check_output(parser, args.output)
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.error(f"--data-dir: no MNIST/raw under {args.data_dir!r}; point it at torchvision's MNIST layout.")
    dataset = datasets.MNIST(
        args.data_dir, train=True, transform=T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
    )
    columns = ["step 0"] + [
        f"steps {s}–{min(s + REPORT_EVERY - 1, args.steps - 1)}" for s in range(1, args.steps, REPORT_EVERY)
    ]
    lines = [
        f"Date: {datetime.date.today()}. Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Real MNIST, batch {args.batch_size}, SGD lr {args.lr}, momentum 0.9, weight decay 5e-4, box [-1, 1].",
        "",
        "Command: `python bench/check_stl10_lr.py --data-dir ../shared/data "
        + f"--lr {args.lr} --steps {args.steps} --batch-size {args.batch_size}`",
        "",
        "Mean training loss per window (log(10) = 2.30 is chance):",
        "",
        "| dynamics | final connector | " + " | ".join(columns) + " | seconds |",
        "|---|---|" + "---:|" * (len(columns) + 1),
    ]
    for dynamics in args.dynamics:
        for final_connector in (True, False):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
            start = time.perf_counter()
            losses = training_losses(dynamics, final_connector, loader, args.lr, args.steps)
            cells = window_means(losses) + ["—"] * (len(columns) - len(window_means(losses)))
            lines.append(
                f"| {dynamics} | {'yes' if final_connector else 'no'} | "
                + " | ".join(cells)
                + f" | {time.perf_counter() - start:.0f} |"
            )
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output is not None:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
