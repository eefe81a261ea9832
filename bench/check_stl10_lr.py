"""Does the STL-10 PDE-CNN train at the paper's learning rate? Loss on one fixed batch, per SGD step.

Ruthotto & Haber's setup (SGD, momentum 0.9, weight decay 5e-4, box [-1, 1] on the PDE weights) on one
fixed batch of random 96×96 images: a stable setup drives the loss down, an unstable one lets it grow.

    python bench/check_stl10_lr.py --lr 0.1 --steps 12
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lightning_pdenets.architectures.stl10 import INITIALIZATIONS, PDE_CNN_DYNAMICS, PDECNN


def fixed_batch_losses(dynamics: str, init: str, lr: float, steps: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 3, 96, 96), torch.randint(0, 10, (batch,))
    network = PDECNN(dynamics, init=init).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, parameter in network.named_parameters():
                if name.endswith("control_points"):
                    parameter.clamp_(-1.0, 1.0)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dynamics", default="parabolic", choices=sorted(PDE_CNN_DYNAMICS))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    for init in INITIALIZATIONS:
        losses = fixed_batch_losses(args.dynamics, init, args.lr, args.steps, args.batch)
        print(f"{args.dynamics}, init={init}, lr={args.lr}: " + ", ".join(f"{loss:.2f}" for loss in losses))


if __name__ == "__main__":
    main()
