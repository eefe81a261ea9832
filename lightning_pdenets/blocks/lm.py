"""Pre-activation residual blocks with the linear multistep (LM) update and stochastic depth.

Lu, Zhong, Li & Dong, "Beyond Finite Layer Neural Networks: Bridging Deep Architectures and
Numerical Differential Equations", ICML 2018. A residual block is one forward-Euler step
``x_{n+1} = x_n + f(x_n)``; the LM-architecture takes a two-step linear multistep step instead,

    x_{n+1} = (1 - k_n) x_n + k_n x_{n-1} + f(x_n),

with one learnable scalar ``k_n`` per block (or one per channel), initialized uniformly in
[-0.1, 0]. Stochastic depth (Huang, Sun, Liu, Sedra & Weinberger, "Deep Networks with Stochastic
Depth", ECCV 2016), which Lu et al. read as a stochastic dynamic system, multiplies ``f`` by a
Bernoulli variable ``eta_n`` of mean ``p_n`` during training and by ``p_n`` at evaluation, so that
for a single block the evaluation output is the expectation of the training output.

The residual branches are those of He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual
Networks", ECCV 2016 (pre-activation: BN -> ReLU -> conv).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_pdenets.validation import check_positive_int

__all__ = [
    "K_MODES",
    "STOCHASTIC_DEPTH_MODES",
    "UPDATE_RULES",
    "BranchSurvivalDraws",
    "LMResidualBlock",
    "PreActBasicBlock",
    "PreActBottleneckBlock",
    "linear_survival_probabilities",
]

UPDATE_RULES = ("plain", "lm")
K_MODES = ("scalar", "channel")
STOCHASTIC_DEPTH_MODES = ("batch", "sample")


def linear_survival_probabilities(num_blocks: int, survival_prob_last: float) -> list[float]:
    """Huang et al.'s linear decay ``p_l = 1 - (l / L) (1 - p_L)`` for blocks ``l = 1..L``.

    The input (``l = 0``) always survives and the last block survives with ``p_L``.
    """
    check_positive_int(num_blocks, "num_blocks")
    _check_survival_prob(survival_prob_last, "survival_prob_last")
    return [1.0 - (layer / num_blocks) * (1.0 - survival_prob_last) for layer in range(1, num_blocks + 1)]


def _check_survival_prob(value: float, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{argument}` must be a probability in (0, 1], got {value!r}.")


def _check_choice(value: str, argument: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{argument}` must be one of {list(allowed)}, got {value!r}.")


class LMResidualBlock(nn.Module):
    """A residual block ``x -> skip(x) + f(x)`` whose update rule and stochastic depth are configurable.

    Subclasses define the residual function through :meth:`branch` and, optionally, what it and
    the skip connection see through :meth:`split` (pre-activation blocks share ``relu(bn(x))``).

    ``forward(x, x_prev)`` returns ``(x_next, skip)``: ``skip`` is this block's input mapped to
    its output shape (the input itself unless the block changes shape), which is the ``x_prev``
    of the next block. With ``update='lm'`` the block must preserve the shape and needs ``x_prev``.

    Stochastic depth follows Huang et al. / Lu et al.: during training the residual ``f`` is
    multiplied by ``eta ~ Bernoulli(survival_prob)``, drawn once per mini-batch (``'batch'``, which
    skips computing ``f`` when dropped) or once per sample (``'sample'``); in evaluation mode ``f``
    is multiplied by ``survival_prob``. In ``'batch'`` mode a dropped block leaves its parameters
    without gradient, so DDP needs ``strategy: ddp_find_unused_parameters_true``; a network passes
    the draw of each step in ``keep`` (see :class:`BranchSurvivalDraws`), a block on its own draws
    from torch's global RNG.

    Args:
        channels: Output channels (the length of a channel-wise ``k``).
        update: ``'plain'`` (forward Euler) or ``'lm'`` (linear multistep).
        k_mode: ``'scalar'`` (one ``k_n`` per block) or ``'channel'`` (one per channel).
        k_init_range: ``k_n`` is drawn uniformly in ``[low, high]``.
        survival_prob: Probability ``p_n`` that the residual branch is kept in training (1: no dropping).
        stochastic_depth_mode: ``'batch'`` or ``'sample'``.
    """

    k: nn.Parameter | None

    def __init__(
        self,
        channels: int,
        update: str = "plain",
        k_mode: str = "scalar",
        k_init_range: Sequence[float] = (-0.1, 0.0),
        survival_prob: float = 1.0,
        stochastic_depth_mode: str = "batch",
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        _check_choice(update, "update", UPDATE_RULES)
        _check_choice(k_mode, "k_mode", K_MODES)
        _check_choice(stochastic_depth_mode, "stochastic_depth_mode", STOCHASTIC_DEPTH_MODES)
        _check_survival_prob(survival_prob, "survival_prob")
        low, high = _check_k_init_range(k_init_range)
        self.update = update
        self.k_mode = k_mode
        self.survival_prob = float(survival_prob)
        self.stochastic_depth_mode = stochastic_depth_mode
        if update == "lm":
            shape = () if k_mode == "scalar" else (channels, 1, 1)
            self.k = nn.Parameter(torch.empty(shape).uniform_(low, high))
        else:
            self.register_parameter("k", None)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(skip, branch_input)``: identity skip, branch on ``x`` itself."""
        return x, x

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual function ``f``."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor | None = None, keep: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_next, skip)``; ``keep`` decides a ``'batch'``-mode training step (``None``: draw it here)."""
        skip, h = self.split(x)
        if self.k is None:
            base = skip
        else:
            if x_prev is None:
                raise ValueError(
                    "an LM block needs the previous state `x_prev` (x_{n-1}); the first block of a stage "
                    "uses update='plain' and returns it as its second output."
                )
            # lerp(x, x_prev, k) = x + k (x_prev - x) = (1 - k) x + k x_prev, fused in one kernel so
            # that the LM update costs one element-wise pass more than the plain one.
            base = torch.lerp(x, x_prev, self.k)
        return self._add_residual(base, h, keep), skip

    def _add_residual(self, base: torch.Tensor, h: torch.Tensor, keep: bool | None) -> torch.Tensor:
        p = self.survival_prob
        if p == 1.0:
            return self.branch(h).add_(base)
        if not self.training:
            return self.branch(h).mul_(p).add_(base)
        if self.stochastic_depth_mode == "batch":
            # Hand-written rather than torchvision.ops.StochasticDepth: that one computes the branch
            # even when it is dropped and rescales by 1/p in training, whereas Huang et al. skip the
            # dropped branch (their training speed-up) and rescale by p at evaluation.
            if keep is None:
                keep = torch.rand(()).item() < p
            return self.branch(h).add_(base) if keep else base
        gates = torch.empty((h.shape[0],) + (1,) * (h.dim() - 1), device=h.device, dtype=h.dtype).bernoulli_(p)
        return self.branch(h).mul_(gates).add_(base)

    def extra_repr(self) -> str:
        parts = [f"update={self.update!r}"]
        if self.k is not None:
            parts.append(f"k_mode={self.k_mode!r}")
        if self.survival_prob < 1.0:
            parts.append(
                f"survival_prob={self.survival_prob:.4g}, stochastic_depth_mode={self.stochastic_depth_mode!r}"
            )
        return ", ".join(parts)


class BranchSurvivalDraws(nn.Module):
    """The per-step survival draws of a network's blocks in ``'batch'``-mode stochastic depth.

    The draws of training step ``s`` come from a ``torch.Generator`` seeded with ``seed + s``, not from
    torch's global RNG: every DDP rank (and one process training on the whole batch) drops the same
    blocks in the same step, as Huang et al.'s one draw per mini-batch asks, whatever else consumes
    random numbers (data augmentation, dropout); and since ``seed`` and the step count are part of the
    state dict, a resumed run continues the exact sequence.

    Args:
        survival_probs: Survival probability of each block, in depth order.
        seed: Seed of the draws; ``None`` takes one from torch's global RNG (``seed_everything`` then
            fixes it, identically on every rank).
    """

    def __init__(self, survival_probs: Sequence[float], seed: int | None = None) -> None:
        super().__init__()
        for p in survival_probs:
            _check_survival_prob(p, "survival_probs[i]")
        self.survival_probs = torch.tensor(list(survival_probs), dtype=torch.float64)
        self.seed = int(torch.randint(0, 2**62, ())) if seed is None else int(seed)
        self.step = 0

    def draw(self) -> list[bool]:
        """Whether each block's branch survives this step; advances the step count."""
        generator = torch.Generator().manual_seed(self.seed + self.step)
        self.step += 1
        return (
            torch.rand(len(self.survival_probs), generator=generator, dtype=torch.float64) < self.survival_probs
        ).tolist()

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def extra_repr(self) -> str:
        return f"blocks={len(self.survival_probs)}, seed={self.seed}, step={self.step}"


def _check_k_init_range(k_init_range: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in k_init_range)
    except (TypeError, ValueError):
        raise ValueError(f"`k_init_range` must be a pair [low, high] of numbers, got {k_init_range!r}.") from None
    if low > high:
        raise ValueError(f"`k_init_range` must satisfy low <= high, got {k_init_range!r}.")
    return low, high


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class _PreActBlock(LMResidualBlock):
    """Shared pre-activation and projection shortcut of He et al. 2016's blocks.

    The branch and the shortcut both read ``relu(bn(x))``; when the block changes the number of
    channels or the resolution, the shortcut is a (strided) 1×1 convolution of it, as in He et
    al.'s pre-activation code, and the block must use the plain update.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, **update_kwargs) -> None:
        check_positive_int(in_channels, "in_channels")
        check_positive_int(stride, "stride")
        super().__init__(out_channels, **update_kwargs)
        changes_shape = stride != 1 or in_channels != out_channels
        if changes_shape and self.update == "lm":
            raise ValueError(
                f"update='lm' needs a shape-preserving block (x_{{n-1}}, x_n and x_{{n+1}} share a shape), got "
                f"in_channels={in_channels}, out_channels={out_channels}, stride={stride}; "
                "transitions use update='plain'."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.shortcut = _conv1x1(in_channels, out_channels, stride) if changes_shape else None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.norm1(x), inplace=True)
        return (x if self.shortcut is None else self.shortcut(h)), h


class PreActBasicBlock(_PreActBlock):
    """Two 3×3 convolutions, ``f(x) = conv(relu(bn(conv(relu(bn(x))))))`` (He et al. 2016).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 at the start of a downsampling stage).
        **update_kwargs: ``update``, ``k_mode``, ``k_init_range``, ``survival_prob``,
            ``stochastic_depth_mode`` of :class:`LMResidualBlock`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, **update_kwargs) -> None:
        super().__init__(in_channels, out_channels, stride, **update_kwargs)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm2(self.conv1(h)), inplace=True))


class PreActBottleneckBlock(_PreActBlock):
    """1×1 → 3×3 → 1×1 bottleneck with expansion 4 (He et al. 2016), the stride on the 3×3.

    Args:
        in_channels: Input channels.
        out_channels: Output channels, ``expansion`` × the bottleneck width.
        stride: Stride of the 3×3 convolution.
        expansion: Ratio of output channels to the bottleneck width.
        **update_kwargs: See :class:`PreActBasicBlock`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 4, **update_kwargs
    ) -> None:
        check_positive_int(expansion, "expansion")
        if out_channels % expansion:
            raise ValueError(f"`out_channels` must be a multiple of `expansion`={expansion}, got {out_channels!r}.")
        super().__init__(in_channels, out_channels, stride, **update_kwargs)
        width = out_channels // expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.norm3 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm2(self.conv1(h)), inplace=True)
        h = F.relu(self.norm3(self.conv2(h)), inplace=True)
        return self.conv3(h)
