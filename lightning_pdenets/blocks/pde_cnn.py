"""Parabolic, Hamiltonian and second-order blocks of PDE-motivated CNNs, with reversible training.

Ruthotto & Haber, "Deep Neural Networks Motivated by Partial Differential Equations", J. Math.
Imaging Vis. 2020 (arXiv:1804.04272), Sec. 3: every block integrates a PDE built on the
symmetric layer F_sym over N steps of size δ_t (final time T = N·δ_t) with time-dependent
weights θ(t) given by control points (:class:`lightning_pdenets.dynamics.TimeDependentWeight`).

The Hamiltonian (Verlet) and second-order (leapfrog) schemes are exactly invertible, so their
backward pass can recompute the states by integrating backwards in time instead of storing
them: Chang, Meng, Haber, Ruthotto, Begert & Holtham, "Reversible Architectures for Arbitrarily
Deep Residual Neural Networks", AAAI 2018. ``reversible=True`` selects this per block; the
activation memory then no longer grows with the number of steps.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lightning_pdenets.dynamics.symmetric import SymmetricLayer
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = ["HamiltonianBlock", "ParabolicBlock", "ReversibleIntegration", "SecondOrderBlock", "SymmetricPDEBlock"]

State = tuple[torch.Tensor, ...]


class ReversibleIntegration(torch.autograd.Function):
    """Integrate a reversible block without storing states; recompute them backwards in backward.

    Chang et al., AAAI 2018, Sec. 3.3. Forward runs all steps under ``no_grad`` and keeps only the
    final state. Backward walks j = N−1 … 0: it reconstructs state j from state j+1 with the
    block's exact inverse step, re-runs step j with autograd on, and back-propagates one step.
    Hand-written because torch.utils.checkpoint stores the inputs of every segment; here only one
    step's intermediates are alive at a time.
    """

    @staticmethod
    def forward(ctx: Any, block: SymmetricPDEBlock, num_state: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = tuple(tensors[:num_state])
        with torch.no_grad():
            for step in range(block.num_steps):
                state = block.step(step, state)
        ctx.block = block
        ctx.num_state = num_state
        ctx.parameters = tensors[num_state:]
        # the recomputation in backward must run under the forward's autocast state (mixed precision)
        device_type = state[0].device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        ctx.save_for_backward(*state)
        return state

    @staticmethod
    def backward(ctx: Any, *grad_state: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        block, parameters = ctx.block, ctx.parameters
        state = tuple(t.detach() for t in ctx.saved_tensors)
        grad_state = tuple(torch.zeros_like(s) if g is None else g for s, g in zip(state, grad_state))
        grad_parameters: list[torch.Tensor | None] = [None] * len(parameters)
        trainable = [i for i, p in enumerate(parameters) if p.requires_grad]
        for step in reversed(range(block.num_steps)):
            with torch.no_grad():
                previous = block.inverse_step(step, state)
            device_type, dtype, enabled = ctx.autocast
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                previous = tuple(s.detach().requires_grad_(True) for s in previous)
                recomputed = block.step(step, previous)
                grads = torch.autograd.grad(
                    recomputed, previous + tuple(parameters[i] for i in trainable), grad_state, allow_unused=True
                )
            grad_state = tuple(
                torch.zeros_like(s) if g is None else g for s, g in zip(previous, grads[: len(previous)])
            )
            for index, grad in zip(trainable, grads[len(previous) :]):
                if grad is not None:
                    accumulated = grad_parameters[index]
                    grad_parameters[index] = grad if accumulated is None else accumulated + grad
            state = tuple(s.detach() for s in previous)
        return (None, None, *grad_state, *grad_parameters)


class SymmetricPDEBlock(nn.Module):
    """Base of the PDE blocks: N steps of size δ_t on [0, T], weights θ(t) on control points.

    Subclasses define :meth:`initial_state`, :meth:`step`, :meth:`output` and, when
    reversible, :meth:`inverse_step`. The block follows
    :class:`lightning_pdenets.protocols.TimeSteppingBlock` (``num_time_steps``,
    ``refine_in_time``) for the multilevel callback; its ``SymmetricLayer`` weights follow
    :class:`lightning_pdenets.protocols.TimeDependentWeights`. ``num_steps`` and ``step_size``
    are stored in the state dict, so a refined block reloads with its refined depth.

    Args:
        channels: Feature channels.
        num_steps: State time steps N.
        step_size: δ_t.
        num_control_points: Control points of θ(t) (default ``num_steps``: one weight per layer).
        interpolation: ``'constant'`` or ``'linear'`` interpolation of the control points.
        norm: ``'instance'`` or ``'none'`` normalization inside F_sym.
        activation: Monotone activation σ of F_sym.
        kernel_std: Standard deviation of the initial kernels (default √(2 / (9·C))).
        reversible: Memory-efficient backward by reversing the dynamics (reversible blocks only).
    """

    is_reversible_scheme = False
    num_layers = 1

    def __init__(
        self,
        channels: int,
        num_steps: int = 3,
        step_size: float = 1.0,
        num_control_points: int | None = None,
        interpolation: str = "constant",
        norm: str = "instance",
        activation: str = "relu",
        kernel_std: float | None = None,
        reversible: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        check_positive_int(num_steps, "num_steps")
        check_positive(step_size, "step_size")
        num_control_points = num_steps if num_control_points is None else num_control_points
        check_positive_int(num_control_points, "num_control_points")
        if not isinstance(reversible, bool):
            raise ValueError(f"`reversible` must be True or False, got {reversible!r}.")
        if reversible and not self.is_reversible_scheme:
            raise ValueError(
                f"`reversible=True` needs an invertible time stepping; {type(self).__name__} is not reversible. "
                f"Use HamiltonianBlock or SecondOrderBlock, or set reversible=False."
            )
        self.channels = channels
        self.num_steps = num_steps
        self.step_size = float(step_size)
        self.reversible = reversible
        layer_channels = self.layer_channels(channels)
        final_time = num_steps * self.step_size
        self.layers = nn.ModuleList(
            SymmetricLayer(
                layer_channels,
                num_control_points,
                interpolation,
                final_time,
                norm=norm,
                activation=activation,
                kernel_std=kernel_std,
            )
            for _ in range(self.num_layers)
        )

    def layer_channels(self, channels: int) -> int:
        return channels

    # -- time stepping (subclasses) -----------------------------------------------------------
    def initial_state(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, step: int, state: State) -> State:
        raise NotImplementedError

    def inverse_step(self, step: int, state: State) -> State:
        raise NotImplementedError(f"{type(self).__name__} has no inverse step.")

    def output(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    # -- integration ----------------------------------------------------------------------------
    @property
    def final_time(self) -> float:
        return self.num_steps * self.step_size

    def integrate(self, state: State) -> State:
        """All N steps from ``state`` with plain autograd (every state kept for backward)."""
        for step in range(self.num_steps):
            state = self.step(step, state)
        return state

    def reverse(self, state: State) -> State:
        """Run the dynamics backwards in time from a final state to the initial one."""
        for step in reversed(range(self.num_steps)):
            state = self.inverse_step(step, state)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected feature maps of shape (N, {self.channels}, H, W), got {tuple(x.shape)}.")
        state = self.initial_state(x)
        parameters = tuple(p for p in self.parameters())
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parameters))
        if self.reversible and needs_grad:
            state = ReversibleIntegration.apply(self, len(state), *state, *parameters)
        else:
            state = self.integrate(state)
        return self.output(state)

    # -- protocol TimeSteppingBlock -------------------------------------------------------------
    @property
    def num_time_steps(self) -> int:
        return self.num_steps

    def refine_in_time(self, factor: int = 2, refine_weights: bool = True) -> None:
        """Multiply the steps by ``factor`` at fixed final time; optionally refine θ's control points.

        The refined control-point grid is nested in the old one, so θ(t) is unchanged and the
        output only changes by the smaller discretization error of the states.
        """
        check_positive_int(factor, "factor", minimum=2)
        self.num_steps *= factor
        self.step_size /= factor
        if refine_weights:
            for module in self.layers:
                layer = cast(SymmetricLayer, module)
                layer.prolong(layer.refined_count(factor))

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "step_size": self.step_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.step_size = float(state["step_size"])

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_steps={self.num_steps}, step_size={self.step_size}, "
            f"reversible={self.reversible}"
        )


class ParabolicBlock(SymmetricPDEBlock):
    """∂_t Y = F_sym(θ(t), Y) with forward Euler: Y_{j+1} = Y_j + δ_t·F_sym(θ_j, Y_j).

    Ruthotto & Haber 2020, Eq. (8). A nonlinear diffusion: for monotone σ and small enough δ_t
    the forward propagation is stable (Theorem 1), i.e. perturbations of the input do not grow.
    Not reversible (forward Euler of a dissipative flow has no exact inverse).
    """

    def initial_state(self, x: torch.Tensor) -> State:
        return (x,)

    def step(self, step: int, state: State) -> State:
        (y,) = state
        return (y + self.step_size * self.layers[0](y, step, self.num_steps),)

    def output(self, state: State) -> torch.Tensor:
        return state[0]


class HamiltonianBlock(SymmetricPDEBlock):
    """Hamiltonian dynamics on the channel halves Y, Z, stepped with Verlet.

    Ruthotto & Haber 2020, Eq. (10); Chang et al. 2018 (the "Hamiltonian reversible network"):
    Y_{j+1} = Y_j + δ_t·F_sym(θ¹_j, Z_j),  Z_{j+1} = Z_j − δ_t·F_sym(θ²_j, Y_{j+1}).
    The input's channels are split into Y (first half) and Z (second half); ``channels`` must
    be even. The scheme is symplectic and exactly invertible.
    """

    is_reversible_scheme = True
    num_layers = 2

    def layer_channels(self, channels: int) -> int:
        if channels % 2:
            raise ValueError(f"`channels` of a HamiltonianBlock must be even (split into Y and Z), got {channels!r}.")
        return channels // 2

    def initial_state(self, x: torch.Tensor) -> State:
        return tuple(x.chunk(2, dim=1))

    def step(self, step: int, state: State) -> State:
        y, z = state
        y = y + self.step_size * self.layers[0](z, step, self.num_steps)
        z = z - self.step_size * self.layers[1](y, step, self.num_steps)
        return y, z

    def inverse_step(self, step: int, state: State) -> State:
        y, z = state
        z = z + self.step_size * self.layers[1](y, step, self.num_steps)
        y = y - self.step_size * self.layers[0](z, step, self.num_steps)
        return y, z

    def output(self, state: State) -> torch.Tensor:
        return torch.cat(state, dim=1)


class SecondOrderBlock(SymmetricPDEBlock):
    """∂²_t Y = F_sym(θ(t), Y) with leapfrog: Y_{j+1} = 2Y_j − Y_{j−1} + δ_t²·F_sym(θ_j, Y_j), Y_{−1} = Y_0.

    Ruthotto & Haber 2020, Eq. (12) (a hyperbolic, wave-like network; Chang et al.'s
    "leapfrog network"). The state is the pair (Y_{j−1}, Y_j); the scheme conserves a discrete
    energy for linear σ and is exactly invertible.
    """

    is_reversible_scheme = True

    def initial_state(self, x: torch.Tensor) -> State:
        return x, x

    def step(self, step: int, state: State) -> State:
        previous, current = state
        force = self.layers[0](current, step, self.num_steps)
        return current, 2.0 * current - previous + self.step_size**2 * force

    def inverse_step(self, step: int, state: State) -> State:
        current, following = state
        force = self.layers[0](current, step, self.num_steps)
        return 2.0 * current - following + self.step_size**2 * force, current

    def output(self, state: State) -> torch.Tensor:
        return state[1]
