"""Time-dependent weights θ(t) and the symmetric layer F_sym of PDE-motivated CNNs.

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020 (arXiv:1804.04272), Eq. (7): F_sym(θ, Y) = −K(θ)ᵀ σ(N(K(θ) Y, θ)).

The weights live on their own time grid of *control points*, independent of the state time
steps, as advocated for continuous ResNets ("decouple the time discretizations of the features
and the weights"). A block with final time T evaluates θ at state time t_j = j·T/N by
piecewise-constant or piecewise-linear interpolation of the control points; changing the
number of state steps N therefore changes the depth without changing the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = ["SYMMETRIC_ACTIVATIONS", "SYMMETRIC_NORMS", "WEIGHT_INTERPOLATIONS", "SymmetricLayer", "TimeDependentWeight"]

WEIGHT_INTERPOLATIONS = ("constant", "linear")
SYMMETRIC_NORMS = ("instance", "none")
SYMMETRIC_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "identity": lambda x: x,
}


class TimeDependentWeight(nn.Module):
    """A weight tensor θ(t) on [0, final_time], stored as control points along the first axis.

    With ``interpolation='constant'`` the interval is cut into P equal cells and θ is the value of
    the cell containing t (P = number of steps gives one weight per layer, the usual ResNet). With
    ``'linear'`` the P control points sit at t_k = k·T/(P−1) and θ is interpolated linearly.

    The module follows :class:`lightning_pdenets.protocols.TimeDependentWeights`
    (``time_dependent_parameters()`` and ``weight_time_step()``), which the time-TV and box
    projection callbacks use. Loading a state dict whose control-point count differs (e.g. after
    multilevel training refined it) resizes the parameter first, so such checkpoints reload.

    Args:
        shape: Shape of θ at one time.
        num_control_points: Number P of control points.
        interpolation: ``'constant'`` or ``'linear'``.
        final_time: Length T of the time interval.
        init: Function filling a tensor of shape ``(P, *shape)`` in place; zeros by default.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_control_points: int,
        interpolation: str = "constant",
        final_time: float = 1.0,
        init: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_control_points, "num_control_points")
        if interpolation not in WEIGHT_INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {list(WEIGHT_INTERPOLATIONS)}, got {interpolation!r}.")
        check_positive(final_time, "final_time")
        self.interpolation = interpolation
        self.final_time = float(final_time)
        self.control_points = nn.Parameter(torch.zeros(num_control_points, *shape))
        if init is not None:
            with torch.no_grad():
                init(self.control_points)

    @property
    def num_control_points(self) -> int:
        return self.control_points.shape[0]

    # -- protocol TimeDependentWeights --------------------------------------------------------
    def time_dependent_parameters(self) -> list[torch.Tensor]:
        """The control points, time axis first."""
        return [self.control_points]

    def weight_time_step(self) -> float:
        """Time between neighbouring control points (the h of the TV-in-time difference quotient)."""
        cells = self.num_control_points if self.interpolation == "constant" else self.num_control_points - 1
        return self.final_time / max(cells, 1)

    # -- evaluation -----------------------------------------------------------------------------
    def at_step(self, step: int, num_steps: int) -> torch.Tensor:
        """θ at the state time t_j = j·T/N, with integer arithmetic so cells are hit exactly."""
        points = self.control_points
        count = points.shape[0]
        if self.interpolation == "constant" or count == 1:
            return points[min(step * count // num_steps, count - 1)]
        numerator = step * (count - 1)
        left, remainder = divmod(numerator, num_steps)
        if remainder == 0 or left >= count - 1:
            return points[min(left, count - 1)]
        weight = remainder / num_steps
        return (1.0 - weight) * points[left] + weight * points[left + 1]

    def at_times(self, times: torch.Tensor) -> torch.Tensor:
        """θ at the normalized times ``times / T`` (a 1-D tensor), stacked along the first axis."""
        points = self.control_points
        count = points.shape[0]
        fraction = (times / self.final_time).clamp(0.0, 1.0).to(points)
        if self.interpolation == "constant" or count == 1:
            index = torch.clamp((fraction * count).floor().long(), max=count - 1)
            return points[index]
        position = fraction * (count - 1)
        left = torch.clamp(position.floor().long(), max=count - 2)
        weight = (position - left).view(-1, *([1] * (points.dim() - 1)))
        return (1.0 - weight) * points[left] + weight * points[left + 1]

    def prolong(self, num_control_points: int) -> None:
        """Re-sample θ(t) on ``num_control_points`` control points in place (same Parameter object).

        Refining P → 2P (constant) or P → 2P−1 (linear) represents the same function θ(t)
        exactly; other counts interpolate it.
        """
        check_positive_int(num_control_points, "num_control_points")
        if self.interpolation == "constant":
            nodes = (torch.arange(num_control_points, dtype=torch.float64) + 0.5) / num_control_points
        else:
            nodes = torch.linspace(0.0, 1.0, num_control_points, dtype=torch.float64)
        with torch.no_grad():
            new_points = self.at_times(nodes * self.final_time).clone()
            self.control_points.data = new_points
            self.control_points.grad = None

    def refined_count(self, factor: int) -> int:
        """Control points after refining the weight grid ``factor`` times (nested grids)."""
        count = self.num_control_points
        if self.interpolation == "constant" or count == 1:
            return count * factor
        return (count - 1) * factor + 1

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        incoming = state_dict.get(prefix + "control_points")
        if (
            incoming is not None
            and incoming.shape != self.control_points.shape
            and incoming.shape[1:] == self.control_points.shape[1:]
        ):
            with torch.no_grad():
                self.control_points.data = torch.empty_like(incoming, device=self.control_points.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shape = tuple(self.control_points.shape[1:])
        return f"shape={shape}, num_control_points={self.num_control_points}, interpolation={self.interpolation!r}"


def default_kernel_init(std: float) -> Callable[[torch.Tensor], Any]:
    """Gaussian kernels N(0, std²) clipped into the box [−1, 1]."""

    def init(tensor: torch.Tensor) -> None:
        tensor.normal_(0.0, std).clamp_(-1.0, 1.0)

    return init


class SymmetricLayer(nn.Module):
    """F_sym(θ(t), Y) = −K(t)ᵀ σ(N(K(t) Y) ⊙ s(t) + b(t)) with a 3×3 convolution K.

    Ruthotto & Haber 2020, Eq. (7). The convolution K maps ``channels`` to ``hidden_channels``
    and Kᵀ is its exact adjoint (the transposed convolution with the same kernel), so the
    linearization of F_sym is negative semi-definite for monotone σ (Theorem 1). N is instance
    normalization without affine parameters, followed by the time-dependent scale s(t) and shift
    b(t); the bias b of the paper is this shift, since a bias before instance norm would cancel.
    With ``norm='none'`` the layer is −Kᵀ σ(K Y + b) and has no scale.

    Args:
        channels: Channels of Y.
        num_control_points: Control points of every weight of the layer.
        interpolation: ``'constant'`` or ``'linear'``.
        final_time: Final time T of the block using the layer.
        hidden_channels: Output channels of K (default ``channels``).
        kernel_size: Odd kernel size of K.
        norm: ``'instance'`` or ``'none'``.
        activation: ``'relu'``, ``'tanh'``, ``'leaky_relu'`` or ``'identity'`` (all monotone).
        kernel_std: Standard deviation of the Gaussian initial kernels (default √(2 / (k²·C))).
    """

    def __init__(
        self,
        channels: int,
        num_control_points: int,
        interpolation: str = "constant",
        final_time: float = 1.0,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        norm: str = "instance",
        activation: str = "relu",
        kernel_std: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        hidden_channels = channels if hidden_channels is None else hidden_channels
        check_positive_int(hidden_channels, "hidden_channels")
        check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd so that Kᵀ is the adjoint of K, got {kernel_size!r}.")
        if norm not in SYMMETRIC_NORMS:
            raise ValueError(f"`norm` must be one of {list(SYMMETRIC_NORMS)}, got {norm!r}.")
        if activation not in SYMMETRIC_ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(SYMMETRIC_ACTIVATIONS)}, got {activation!r}.")
        if kernel_std is None:
            kernel_std = (2.0 / (kernel_size * kernel_size * channels)) ** 0.5
        check_positive(kernel_std, "kernel_std")
        self.norm = norm
        self.activation = activation
        self.padding = kernel_size // 2
        common: dict[str, Any] = dict(
            num_control_points=num_control_points, interpolation=interpolation, final_time=final_time
        )
        self.kernel = TimeDependentWeight(
            (hidden_channels, channels, kernel_size, kernel_size), init=default_kernel_init(kernel_std), **common
        )
        self.scale: TimeDependentWeight | None = None
        if norm == "instance":
            self.scale = TimeDependentWeight((hidden_channels,), init=lambda t: t.fill_(1.0), **common)
        self.shift = TimeDependentWeight((hidden_channels,), **common)

    def time_weights(self) -> list[TimeDependentWeight]:
        return [w for w in (self.kernel, self.scale, self.shift) if w is not None]

    def forward(self, y: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
        """F_sym at state step ``step`` of ``num_steps``."""
        kernel = self.kernel.at_step(step, num_steps)
        shift = self.shift.at_step(step, num_steps).view(1, -1, 1, 1)
        z = F.conv2d(y, kernel, padding=self.padding)
        if self.scale is not None:
            z = F.instance_norm(z) * self.scale.at_step(step, num_steps).view(1, -1, 1, 1)
        z = SYMMETRIC_ACTIVATIONS[self.activation](z + shift)
        return -F.conv_transpose2d(z, kernel, padding=self.padding)

    def prolong(self, num_control_points: int) -> None:
        for weight in self.time_weights():
            weight.prolong(num_control_points)

    @property
    def num_control_points(self) -> int:
        return self.kernel.num_control_points

    def refined_count(self, factor: int) -> int:
        return self.kernel.refined_count(factor)
