"""PDE block of PR-Net: a regression network f(h(0), d, t; theta) queried at learned coordinates.

Kim, Choi, Ham, Kim & Park, "PDE-regularized neural networks for image classification" (PR-Net).
Where an ODE block integrates dh/dt from t0 to t1, the PDE block evaluates one network at a
learnable query set H = {(d, t)}: one (x, y, t) per output position, initialized on the pixel grid
at t = T. Inference is a single evaluation, with no solver and no derivatives.

Derivatives (used only by the training losses) are exact forward-mode derivatives of f's output
with respect to its coordinate inputs: by default in closed-form Taylor mode through the layers of
:class:`CoordinateConvField` (one batched pass for every direction and order), otherwise with one
nested :func:`torch.func.jvp` per axis (:func:`coordinate_derivatives`, any field); both agree to
rounding. The coordinate field (x, y, t) enters f as three input channels; the derivative along
an axis is the directional derivative along a uniform shift of that channel, e.g.

    h_x(p) = d/de f(h(0), x + e, y, t)(p) at e = 0,    h_xx = d^2/de^2 ..., h_t = d/de f(h(0), x, y, t + e)(p).

For a network acting pointwise in the coordinates this is the partial derivative; for a
convolutional f it is the exact derivative of every output under a translation of the
coordinate system, which is what "h as a function of continuous (d, t)" means for a feature map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from lightning_pdenets.dynamics.activations import ACTIVATIONS, check_activation
from lightning_pdenets.dynamics.conv import group_norm
from lightning_pdenets.validation import check_positive

__all__ = ["FIELD_ACTIVATIONS", "CoordinateConvField", "CoordinateDerivatives", "PDEBlock", "coordinate_derivatives"]

FIELD_ACTIVATIONS: dict[str, type[nn.Module]] = {name: ACTIVATIONS[name] for name in ("softplus", "tanh", "relu")}
"""Activations of the regression network (those :class:`CoordinateConvField` differentiates in closed form);
smooth ones give non-trivial higher derivatives."""


@dataclass
class CoordinateDerivatives:
    """A field u and its exact coordinate derivatives.

    Attributes:
        u: The field values.
        u_t: Its first time derivative (None when not requested).
        spatial: ``{axis: (u_a, u_aa, u_aaa, ...)}`` up to the requested order of each axis.
    """

    u: torch.Tensor
    u_t: torch.Tensor | None = None
    spatial: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def detach(self) -> CoordinateDerivatives:
        return CoordinateDerivatives(
            self.u.detach(),
            None if self.u_t is None else self.u_t.detach(),
            {a: tuple(d.detach() for d in ds) for a, ds in self.spatial.items()},
        )


def _taylor_chain(
    function: Callable[[torch.Tensor], torch.Tensor], primal: torch.Tensor, tangent: torch.Tensor, order: int
) -> list[torch.Tensor]:
    """[u, u', ..., u^(order)] along ``tangent`` from ONE nested jvp (lower orders come back as aux)."""

    def nest(level: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        if level == 0:
            return lambda c: (function(c), ())
        inner = nest(level - 1)

        def derivative(c: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            top, d_top, lower = jvp(inner, (c,), (tangent,), has_aux=True)  # type: ignore[misc]  # with has_aux: 3
            return d_top, (*lower, top)

        return derivative

    highest, lower = nest(order)(primal)
    return [*lower, highest]


def coordinate_derivatives(
    function: Callable[[torch.Tensor], torch.Tensor],
    coordinates: torch.Tensor,
    axes: Sequence[str],
    orders: Mapping[str, int],
    coordinate_dim: int = 0,
    time: bool = True,
) -> CoordinateDerivatives:
    """Exact derivatives of ``function(coordinates)`` along each coordinate channel.

    ``coordinates`` holds one entry per axis along ``coordinate_dim``, followed by the time t.
    One nested jvp per axis yields u, u_a, u_aa, ... together; the time derivative takes one jvp.
    The results carry autograd graphs to whatever ``function`` closes over (e.g. network weights).
    """
    unit = []
    for index in range(len(axes) + 1):
        tangent = torch.zeros_like(coordinates)
        tangent.select(coordinate_dim, index).fill_(1.0)
        unit.append(tangent)
    spatial: dict[str, tuple[torch.Tensor, ...]] = {}
    u = None
    for index, axis in enumerate(axes):
        order = orders.get(axis, 0)
        if order <= 0:
            continue
        chain = _taylor_chain(function, coordinates, unit[index], order)
        u = chain[0] if u is None else u
        spatial[axis] = tuple(chain[1:])
    u_t = None
    if time:
        u_time, u_t = jvp(function, (coordinates,), (unit[len(axes)],))  # type: ignore[misc]  # without has_aux: 2
        u = u_time if u is None else u
    if u is None:
        u = function(coordinates)
    return CoordinateDerivatives(u, u_t, spatial)


def _take(series: Sequence[torch.Tensor], k: int, count: int) -> torch.Tensor:
    """Order-k entry restricted to the first ``count`` directions (order 0 has no direction axis)."""
    entry = series[k]
    return entry if k == 0 or entry.shape[0] == count else entry[:count]  # a full slice would cost a copy in backward


def _leibniz(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Derivatives of a product from those of its factors: (ab)^(n) = sum_k C(n, k) a^(k) b^(n-k).

    ``counts[n]`` is the number of directions carried at order n (non-increasing in n).
    """
    out = [a[0] * b[0]]
    for n in range(1, len(a)):
        total = _take(a, n, counts[n]) * b[0]
        for k in range(1, n + 1):
            total = total.add(_take(a, n - k, counts[n]) * _take(b, k, counts[n]), alpha=math.comb(n, k))
        out.append(total)
    return out


def _chain(outer: Sequence[torch.Tensor], z: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Faà di Bruno up to order 3: derivatives of F(z(e)) from [F(z0), F'(z0), ...] and [z0, z', ...]."""
    result = [outer[0]]
    if len(z) > 1:
        result.append(outer[1] * z[1])
    if len(z) > 2:
        z1 = _take(z, 1, counts[2])
        result.append((outer[2] * z1 * z1).add(outer[1] * z[2]))
    if len(z) > 3:
        z1, z2 = _take(z, 1, counts[3]), _take(z, 2, counts[3])
        result.append((outer[3] * z1 * z1 * z1).add(outer[2] * z1 * z2, alpha=3).add(outer[1] * z[3]))
    return result


def _activation_derivatives(activation: nn.Module, z: torch.Tensor, order: int) -> list[torch.Tensor]:
    """The activation and its first ``order`` derivatives at z, in closed form."""
    if isinstance(activation, nn.Softplus):
        s = torch.sigmoid(z)
        ds = s * (1 - s)
        values = [activation(z), s, ds, ds * (1 - 2 * s)]
    elif isinstance(activation, nn.Tanh):
        t = torch.tanh(z)
        d1 = 1 - t * t
        values = [t, d1, -2 * t * d1, -2 * d1 * (d1 - 2 * t * t)]
    else:  # ReLU: piecewise linear
        values = [torch.relu(z), (z > 0).to(z.dtype), torch.zeros_like(z), torch.zeros_like(z)]
    return values[: order + 1]


def _fast_activation(activation: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``activation(z)``; the default softplus as relu(z) + log(1 + exp(-|z|)) (vectorized ops only, same value
    within float rounding: the log's absolute error stays below 6e-8 where log1p would be exact)."""
    if type(activation) is nn.Softplus and activation.beta == 1.0 and activation.threshold == 20.0:
        return z.abs().neg_().exp_().add_(1.0).log_().add_(torch.relu(z))  # in place: one buffer, L2-resident
    return activation(z)


def _group_norm_series(norm: nn.GroupNorm, x: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Derivatives of GroupNorm(x(e)) given those of x; x[0] is (N, C, H, W), x[k>=1] is (D_k, N, C, H, W)."""
    groups = norm.num_groups
    grouped = [xk.reshape(*xk.shape[:-3], groups, -1) for xk in x]
    size = grouped[0].shape[-1]
    centered = [xk - xk.mean(dim=-1, keepdim=True) for xk in grouped]

    def dot(i: int, j: int, n: int) -> torch.Tensor:  # mean over the group without materializing the product
        a, b = _take(centered, i, counts[n]), _take(centered, j, counts[n])
        return torch.einsum("...m,...m->...", a, b).unsqueeze(-1) / size

    variance = [dot(0, 0, 0)]
    for n in range(1, len(x)):
        terms = [math.comb(n, k) * dot(n - k, k, n) for k in range(n + 1)]
        variance.append(cast(torch.Tensor, sum(terms)))
    v0 = variance[0] + norm.eps
    rsqrt = [v0**-0.5, -0.5 * v0**-1.5, 0.75 * v0**-2.5, -1.875 * v0**-3.5][: len(x)]
    normalized = _leibniz(centered, _chain(rsqrt, variance, counts), counts)
    weight, bias = norm.weight.view(-1, 1, 1), norm.bias.view(-1, 1, 1)
    out = [torch.addcmul(bias, normalized[0].reshape(x[0].shape), weight)]  # order >= 1: (D_k, N or 1, C, H, W)
    out += [yk.reshape(*yk.shape[:-2], *x[0].shape[-3:]) * weight for yk in normalized[1:]]
    return out


class CoordinateConvField(nn.Module):
    """f(h(0), coordinates): Chen et al.'s conv vector field with the coordinates as extra channels.

    norm -> act -> conv([h, x, y, t]) -> norm -> act -> conv([., x, y, t]) (-> norm), added to h(0),
    so f starts near the identity like a residual block (the skip does not make L_I vanish: it
    asks the learned part to vanish at t = 0). Chen et al.'s final GroupNorm is off by default: its
    output has unit variance per group at every t, so L_I could only shrink through its scale.

    Besides ``forward``, :meth:`taylor` propagates exact derivatives along coordinate directions
    through the layers in closed form (Taylor-mode differentiation: linear maps act on each
    derivative, GroupNorm and activations by the Leibniz and Faà di Bruno rules). It returns the
    same numbers as nested :func:`torch.func.jvp` but evaluates the shared primal once and batches
    all directions and orders into one convolution per layer. It is hand-written because PyTorch
    has no Taylor-mode (jet) transform, and nested jvp re-evaluates the primal 2^order times.

    Args:
        channels: Channels C of the feature maps.
        num_coordinates: Coordinate channels (spatial axes + time).
        activation: One of :data:`FIELD_ACTIVATIONS`.
        output_norm: End with a GroupNorm as Chen et al.'s vector field.
    """

    max_taylor_order = 3

    def __init__(
        self, channels: int, num_coordinates: int = 3, activation: str = "softplus", output_norm: bool = False
    ) -> None:
        super().__init__()
        check_activation(activation, FIELD_ACTIVATIONS)
        self.channels = channels
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels + num_coordinates, channels, 3, padding=1)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels + num_coordinates, channels, 3, padding=1)
        self.norm3 = group_norm(channels) if output_norm else None
        self.act = FIELD_ACTIVATIONS[activation]()

    def forward(self, h0: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
        coords = coordinates.expand(h0.shape[0], *coordinates.shape[-3:])
        out = self.conv1(torch.cat([self.act(self.norm1(h0)), coords], dim=1))
        out = self.conv2(torch.cat([self.act(self.norm2(out)), coords], dim=1))
        return h0 + (out if self.norm3 is None else self.norm3(out))

    def inference(self, h0: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd, rearranged for speed; equal to it within float rounding.

        The coordinate channels are the same for every sample, so their share of each convolution (with the
        bias) is computed once at batch size 1 and added, instead of concatenating them to every sample;
        softplus is evaluated as relu(z) + log(1 + exp(-|z|)), because ATen's log1p (inside softplus) is
        not vectorized on CPU and cost more than half as much as a convolution of this block. Training keeps
        ``forward``.
        """
        if type(self).forward is not CoordinateConvField.forward:  # a subclass with its own f: nothing to rearrange
            return self(h0, coordinates)
        out = self._inference_conv(self.conv1, _fast_activation(self.act, self.norm1(h0)), coordinates)
        out = self._inference_conv(self.conv2, _fast_activation(self.act, self.norm2(out)), coordinates)
        return h0 + (out if self.norm3 is None else self.norm3(out))

    def _inference_conv(self, conv: nn.Conv2d, a: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
        """conv([a, coordinates]) as conv(a) + conv(coordinates), the second at batch size 1."""
        weight = conv.weight
        coordinate_term = F.conv2d(coordinates, weight[:, self.channels :], conv.bias, conv.stride, conv.padding)
        feature_weight = weight[:, : self.channels].contiguous()  # a strided weight takes a slower path
        return F.conv2d(a, feature_weight, None, conv.stride, conv.padding).add_(coordinate_term)

    def _conv_series(
        self,
        conv: nn.Conv2d,
        a: Sequence[torch.Tensor | None],
        coordinates: torch.Tensor,
        directions: torch.Tensor,
        counts: Sequence[int],
    ) -> list[torch.Tensor]:
        """Derivatives of conv([a, coordinates + e * direction]): the coordinates enter linearly.

        ``a[k]`` is None when a does not depend on the coordinates (only the direction term is left).
        """
        a0 = cast(torch.Tensor, a[0])  # the primal always depends on the coordinates
        coords = coordinates.expand(a0.shape[0], *coordinates.shape[-3:])
        out = [conv(torch.cat([a0, coords], dim=1))]
        if len(a) == 1:
            return out
        feature_weight, coordinate_weight = conv.weight[:, : self.channels], conv.weight[:, self.channels :]
        direction_term = F.conv2d(directions, coordinate_weight, None, conv.stride, conv.padding).unsqueeze(1)
        if a[1] is None:  # kept at batch size 1: broadcasting expands it where it meets the primal
            out.append(direction_term)
            out += [out[0].new_zeros((counts[k], 1, *out[0].shape[1:])) for k in range(2, len(a))]
            return out
        for k, ak in enumerate(a[1:], start=1):  # all directions of one order in one call; no bias beyond order 0
            part = F.conv2d(cast(torch.Tensor, ak).flatten(0, 1), feature_weight, None, conv.stride, conv.padding)
            part = part.view(counts[k], -1, *part.shape[1:])
            out.append(part + direction_term if k == 1 else part)
        return out

    def taylor(
        self, h0: torch.Tensor, coordinates: torch.Tensor, directions: torch.Tensor, orders: Sequence[int]
    ) -> list[torch.Tensor]:
        """[u, u', ..., u^(K)] along coordinate ``directions``, each to its own order.

        Args:
            h0: Initial condition (N, C, H, W).
            coordinates: (1, num_coordinates, H, W) coordinate field.
            directions: (D, num_coordinates, H, W) tangents, e.g. one-hot channels for x, y and t.
            orders: Derivative order per direction, non-increasing and at most 3.

        Returns:
            u of shape (N, C, H, W), then for k = 1..max(orders) a tensor (D_k, N, C, H, W) whose
            slice i is the k-th derivative along direction i (D_k directions have order >= k).
        """
        orders = list(orders)
        if len(orders) != directions.shape[0] or orders != sorted(orders, reverse=True):
            raise ValueError(f"`orders` must give one non-increasing order per direction, got {orders!r}.")
        order = orders[0] if orders else 0
        if not 0 <= order <= self.max_taylor_order:
            raise ValueError(f"derivative orders must be in [0, {self.max_taylor_order}], got {orders!r}.")
        counts = [directions.shape[0]] + [sum(o >= k for o in orders) for k in range(1, order + 1)]
        a = [self.act(self.norm1(h0))] + [None] * order  # h(0) does not depend on the coordinates
        z = self._conv_series(self.conv1, a, coordinates, directions, counts)
        z = _group_norm_series(self.norm2, z, counts)
        a = _chain(_activation_derivatives(self.act, z[0], order), z, counts)
        z = self._conv_series(self.conv2, a, coordinates, directions[: counts[1]] if order else directions, counts)
        if self.norm3 is not None:
            z = _group_norm_series(self.norm3, z, counts)
        return [h0 + z[0], *z[1:]]


def coordinate_grid(height: int, width: int, time: float) -> torch.Tensor:
    """(3, H, W) grid: x and y in [-1, 1] over the columns and rows, and a constant time channel."""
    ys = torch.linspace(-1.0, 1.0, height) if height > 1 else torch.zeros(1)
    xs = torch.linspace(-1.0, 1.0, width) if width > 1 else torch.zeros(1)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y, torch.full_like(grid_x, float(time))])


class PDEBlock(nn.Module):
    """PR-Net's PDE block: (N, C, H, W) -> (N, C, H, W), like an ODE block.

    ``forward(h0)`` returns f(h0, H) at the learnable query set H (``self.query``, shape
    (3, H, W): x, y, t per output position, initialized on the grid at t = ``t_end``).
    Training losses use :meth:`derivatives` and :meth:`initial_condition_loss`; inference uses
    neither.

    Args:
        field: Module computing f(h0, coordinates) with h0's shape; coordinates are (1, 3, H, W).
        spatial_size: (H, W) of the feature maps, fixing the size of the query set.
        t_end: Time T at which the query set starts.
    """

    initial_grid: torch.Tensor

    axes = ("x", "y")

    def __init__(self, field: nn.Module, spatial_size: Sequence[int], t_end: float = 1.0) -> None:
        super().__init__()
        if not isinstance(field, nn.Module):
            raise TypeError(f"`field` must be an nn.Module computing f(h0, coordinates), got {type(field).__name__}.")
        if len(spatial_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in spatial_size):
            raise ValueError(f"`spatial_size` must be two positive integers (H, W), got {spatial_size!r}.")
        check_positive(t_end, "t_end")
        self.field = field
        self.spatial_size = tuple(spatial_size)
        self.t_end = float(t_end)
        height, width = self.spatial_size
        self.query = nn.Parameter(coordinate_grid(height, width, self.t_end))
        self.register_buffer("initial_grid", coordinate_grid(height, width, 0.0), persistent=False)

    def _check(self, h0: torch.Tensor) -> None:
        if h0.dim() != 4 or tuple(h0.shape[-2:]) != self.spatial_size:
            raise ValueError(
                f"PDEBlock was built for feature maps of spatial size {self.spatial_size}, "
                f"got input {tuple(h0.shape)}; "
                f"set the architecture's `image_size` to the dataset's image size."
            )

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        self._check(h0)
        inference = getattr(self.field, "inference", None)
        if inference is not None and not torch.is_grad_enabled():  # evaluation: the field's faster path
            return inference(h0, self.query.unsqueeze(0))
        return self.field(h0, self.query.unsqueeze(0))

    def initial_condition_loss(self, h0: torch.Tensor) -> torch.Tensor:
        """L_I: mean over samples of mean_d (f(h0, d, 0) - h0(d))^2, on the pixel grid at t = 0."""
        self._check(h0)
        return (self.field(h0, self.initial_grid.unsqueeze(0)) - h0).pow(2).mean()

    def derivatives(
        self, h0: torch.Tensor, orders: Mapping[str, int], time: bool = True, method: str = "auto"
    ) -> CoordinateDerivatives:
        """u = f(h0, H) and its exact derivatives at the query set, up to ``orders[axis]`` per axis.

        ``method='taylor'`` uses the field's closed-form Taylor mode (one batched pass; the default
        when the field has one), ``'jvp'`` one nested :func:`torch.func.jvp` per axis.
        """
        self._check(h0)
        unknown = sorted(set(orders) - set(self.axes))
        if unknown:
            raise ValueError(f"unknown axes {unknown}; the PDE block's axes are {list(self.axes)}.")
        if method not in ("auto", "taylor", "jvp"):
            raise ValueError(f"`method` must be 'auto', 'taylor' or 'jvp', got {method!r}.")
        order = max([orders.get(a, 0) for a in self.axes] + [int(time)])
        taylor = getattr(self.field, "taylor", None)
        use_taylor = taylor is not None and order <= getattr(self.field, "max_taylor_order", 0)
        if method == "taylor" and not use_taylor:
            raise ValueError(
                f"the field {type(self.field).__name__} has no Taylor mode up to order {order}; use method='jvp'."
            )
        if method == "jvp" or not use_taylor or taylor is None:
            return coordinate_derivatives(
                lambda c: self.field(h0, c), self.query.unsqueeze(0), self.axes, orders, coordinate_dim=1, time=time
            )
        wanted = {a: orders.get(a, 0) for a in self.axes if orders.get(a, 0) > 0}
        if time:
            wanted["t"] = 1
        names = sorted(wanted, key=lambda name: -wanted[name])  # highest orders first (stable)
        channel = {name: i for i, name in enumerate((*self.axes, "t"))}
        directions = torch.zeros(len(names), *self.query.shape, dtype=self.query.dtype, device=self.query.device)
        for i, name in enumerate(names):
            directions[i, channel[name]] = 1.0
        series = taylor(h0, self.query.unsqueeze(0), directions, [wanted[n] for n in names])
        spatial = {n: tuple(series[k][i] for k in range(1, wanted[n] + 1)) for i, n in enumerate(names) if n != "t"}
        u_t = series[1][names.index("t")] if time else None
        return CoordinateDerivatives(series[0], u_t, spatial)

    def extra_repr(self) -> str:
        return f"spatial_size={self.spatial_size}, t_end={self.t_end}"
