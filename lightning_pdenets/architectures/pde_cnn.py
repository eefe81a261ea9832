"""The STL-10 network of Ruthotto & Haber's PDE-motivated CNNs (parabolic, Hamiltonian, second order).

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020, Sec. 4 and supplement. Opening: 3×3 conv 3→16, batch norm, ReLU. Four units,
each one PDE block (3 time steps, δ_t = 1); after every unit but the last a connector (1×1 conv
with batch norm and ReLU raising the width 16 → 64 → 128 → 256, then 2×2 average pooling).
Head: global average pooling and a linear classifier. 96×96 images reach the head at 12×12.

``final_connector=True`` (default) adds, as the authors' published code does, one more connector
after the last unit: a width-preserving 1×1 conv with batch norm and ReLU before the global pooling
(``cnnDriver.m`` builds a normalized connector after *every* unit). Without it the last PDE block's
output reaches the classifier unnormalized; its scale grows with the width (logits of order 10 at
initialization) and SGD at the paper's learning rate 0.1 diverges: on real MNIST, batch 128,
momentum 0.9, the training loss goes from 9.2 to 4·10⁶ within 50 steps, whereas with the final
connector it falls from 2.45 to 0.12 in 100 steps (``bench/check_stl10_lr.py``). ``False`` gives the
network exactly as the paper's text describes it.

Initialization ``init='meganet'`` (default) is the one of the authors' published code (Meganet.m,
``examples/2018-jmiv/cnnDriver.m`` with ``KernelTypes/convKernel.m``): every convolution kernel
(opening, PDE blocks, connectors) is drawn from N(0, 0.1²), entries beyond ±0.2 are redrawn from
N(0, 1) and the result is clipped into [−0.2, 0.2]; the classifier's weights and bias are
0.1·N(0, 1) clipped into [−0.2, 0.2]; normalization scales start at 1 and shifts at 0. A PDE block's
kernel is the same at every control point, so θ(t) starts constant in time (zero TV).
``init='he'`` instead uses He-normal convolutions, PyTorch's default classifier, and Gaussian PDE
kernels of standard deviation ``kernel_std`` (default √(2 / (9·C))) clipped into [−1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
from torch import nn

from lightning_pdenets.architectures.registry import register_architecture
from lightning_pdenets.blocks.pde_cnn import HamiltonianBlock, ParabolicBlock, SecondOrderBlock, SymmetricPDEBlock
from lightning_pdenets.validation import check_positive_int

__all__ = ["PDECNN", "PDE_CNN_DYNAMICS", "stl10_hamiltonian", "stl10_parabolic", "stl10_second_order"]

PDE_CNN_DYNAMICS: dict[str, type[SymmetricPDEBlock]] = {
    "parabolic": ParabolicBlock,
    "hamiltonian": HamiltonianBlock,
    "second_order": SecondOrderBlock,
}

_TINY = dict(widths=(4, 8), num_steps=2)
INITIALIZATIONS = ("meganet", "he")


@torch.no_grad()
def meganet_kernel_(tensor: torch.Tensor, sd: float = 0.1) -> torch.Tensor:
    """Meganet.m's ``convKernel.initTheta``: sd·N(0, 1), entries beyond ±2sd redrawn from N(0, 1), clipped to ±2sd."""
    values = sd * torch.randn_like(tensor)
    outside = values.abs() > 2 * sd
    values[outside] = torch.randn(int(outside.sum()), dtype=values.dtype, device=values.device)
    return tensor.copy_(values.clamp_(-2 * sd, 2 * sd))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class PDECNN(nn.Module):
    """opening → (PDE block → connector)* → PDE block → [final connector] → head, with input validation.

    Args:
        dynamics: ``'parabolic'``, ``'hamiltonian'`` or ``'second_order'``.
        in_channels: Image channels.
        num_classes: Number of classes.
        widths: Channels of the units (one PDE block per width; connectors between them).
        num_steps: Time steps of every PDE block.
        step_size: δ_t of every PDE block.
        num_control_points: Control points of θ(t) per block (default ``num_steps``).
        interpolation: ``'constant'`` or ``'linear'`` interpolation of θ(t).
        norm: ``'instance'`` or ``'none'`` inside the symmetric layers.
        activation: σ of the symmetric layers.
        kernel_std: Initial standard deviation of the PDE kernels with ``init='he'`` (default He scale).
        reversible: Memory-efficient reversible backward (Hamiltonian and second order only).
        init: ``'meganet'`` (the authors' code, default) or ``'he'``; see the module docstring.
        final_connector: Normalized 1×1 connector after the last unit, as in the authors' code (see
            the module docstring for why it is on by default).
    """

    def __init__(
        self,
        dynamics: str = "parabolic",
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 64, 128, 256),
        num_steps: int = 3,
        step_size: float = 1.0,
        num_control_points: int | None = None,
        interpolation: str = "constant",
        norm: str = "instance",
        activation: str = "relu",
        kernel_std: float | None = None,
        reversible: bool = False,
        init: str = "meganet",
        final_connector: bool = True,
    ) -> None:
        super().__init__()
        if init not in INITIALIZATIONS:
            raise ValueError(f"`init` must be one of {list(INITIALIZATIONS)}, got {init!r}.")
        if init == "meganet" and kernel_std is not None:
            raise ValueError("`kernel_std` applies to init='he' only; drop it or set init: he.")
        if not isinstance(final_connector, bool):
            raise TypeError(f"`final_connector` must be true or false, got {final_connector!r}.")
        if dynamics not in PDE_CNN_DYNAMICS:
            raise ValueError(f"`dynamics` must be one of {sorted(PDE_CNN_DYNAMICS)}, got {dynamics!r}.")
        widths = list(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"`widths` must be a non-empty list of positive integers, got {widths!r}.")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        block_class = PDE_CNN_DYNAMICS[dynamics]
        self.in_channels = in_channels
        # each connector halves the resolution; instance norm needs more than one pixel in the last unit
        self.num_units = len(widths)
        self.last_unit_min_size = 2 if norm == "instance" else 1
        self.min_image_size = 2 ** (self.num_units - 1) * self.last_unit_min_size
        self.opening = nn.Sequential(*_conv_bn_relu(in_channels, widths[0], 3))
        units: list[nn.Module] = []
        for index, width in enumerate(widths):
            units.append(
                block_class(
                    width,
                    num_steps,
                    step_size,
                    num_control_points,
                    interpolation,
                    norm,
                    activation,
                    kernel_std,
                    reversible,
                )
            )
            if index + 1 < len(widths):
                units.append(nn.Sequential(*_conv_bn_relu(width, widths[index + 1], 1), nn.AvgPool2d(2)))
            elif final_connector:
                units.append(nn.Sequential(*_conv_bn_relu(width, width, 1)))
        self.units = nn.Sequential(*units)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
        if init == "meganet":
            self._meganet_init()

    @torch.no_grad()
    def _meganet_init(self) -> None:
        for name, parameter in self.named_parameters():
            if name.endswith("kernel.control_points"):  # one kernel, repeated at every control point
                meganet_kernel_(parameter[0])
                parameter[1:].copy_(parameter[0].expand_as(parameter[1:]))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                meganet_kernel_(module.weight)
        classifier = cast(nn.Linear, self.head[-1])
        for tensor in (classifier.weight, classifier.bias):
            tensor.copy_((0.1 * torch.randn_like(tensor)).clamp_(-0.2, 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"set `in_channels` to the dataset's number of channels."
            )
        if min(x.shape[-2:]) < self.min_image_size:
            raise ValueError(
                f"images of {x.shape[-2]}×{x.shape[-1]} pixels are too small for {self.num_units} units: the "
                f"connectors halve the resolution {self.num_units - 1} times and the last unit needs at least "
                f"{self.last_unit_min_size} pixel(s) per side, so use images of at least "
                f"{self.min_image_size}×{self.min_image_size} (resize them) or fewer `widths`."
            )
        return self.head(self.units(self.opening(x)))


# One registered network per dynamics. partial() keeps PDECNN's signature (less `dynamics`), whose argument names
# the models' `network` dicts are checked against (ClassifierModule.build_network).
stl10_parabolic = register_architecture("stl10_parabolic", input_shape=(3, 32, 32), tiny_kwargs=_TINY)(
    partial(PDECNN, "parabolic")
)
"""Parabolic (forward Euler) STL-10 network."""
stl10_hamiltonian = register_architecture("stl10_hamiltonian", input_shape=(3, 32, 32), tiny_kwargs=_TINY)(
    partial(PDECNN, "hamiltonian")
)
"""Hamiltonian (Verlet) STL-10 network."""
stl10_second_order = register_architecture("stl10_second_order", input_shape=(3, 32, 32), tiny_kwargs=_TINY)(
    partial(PDECNN, "second_order")
)
"""Second-order (leapfrog) STL-10 network."""
