"""LM-ResNet and pre-activation ResNet (Lu et al. 2018): counts, LM update, stochastic depth, logging."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.architectures import (
    lm_resnet_cifar,
    lm_resnet_imagenet,
    preact_resnet_cifar,
    preact_resnet_imagenet,
)
from lightning_pdenets.blocks import (
    BranchSurvivalDraws,
    LMResidualBlock,
    PreActBasicBlock,
    PreActBottleneckBlock,
    linear_survival_probabilities,
)
from lightning_pdenets.cli import build_cli
from lightning_pdenets.models import LMResNetModule, ResNetCIFARModule, check_stochastic_depth_strategy
from tests.trainers import quiet_trainer


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- parameter counts and shapes -----------------------------------------------------------------
def basic_cifar_count(n: int, classes: int = 10, w: int = 16) -> int:
    """Closed form of a pre-activation CIFAR ResNet with n basic blocks per stage and 1×1 projections."""
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda cin, cout: bn(cin) + 9 * cin * cout + bn(cout) + 9 * cout * cout  # noqa: E731
    stem, head = 9 * 3 * w, bn(4 * w) + 4 * w * classes + classes
    stage1 = n * block(w, w)
    stage2 = block(w, 2 * w) + 2 * w * w + (n - 1) * block(2 * w, 2 * w)
    stage3 = block(2 * w, 4 * w) + 8 * w * w + (n - 1) * block(4 * w, 4 * w)
    return stem + stage1 + stage2 + stage3 + head


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_basic_cifar_counts_follow_closed_form(depth: int) -> None:
    n = (depth - 2) // 6
    assert count(preact_resnet_cifar(depth)) == basic_cifar_count(n)
    assert count(preact_resnet_cifar(depth, num_classes=100)) == basic_cifar_count(n, classes=100)


@pytest.mark.parametrize(
    "depth, block, paper",
    [
        (20, None, 0.27e6),
        (32, None, 0.46e6),
        (44, None, 0.66e6),
        (56, None, 0.85e6),
        (110, None, 1.7e6),
        # He et al. 2016's bottleneck ResNet-164 has 1.7M parameters; the 2.55M printed for ResNet-164 in
        # Lu et al.'s Table 2 is the count of the basic-block network of the same depth (81 blocks).
        (164, "bottleneck", 1.7e6),
        (164, "basic", 2.55e6),
    ],
)
def test_cifar_counts_within_5_percent_of_papers(depth: int, block: str | None, paper: float) -> None:
    plain, lm = preact_resnet_cifar(depth, block=block), lm_resnet_cifar(depth, block=block)
    assert abs(count(plain) - paper) / paper <= 0.05
    assert abs(count(lm) - paper) / paper <= 0.05


@pytest.mark.parametrize(
    "depth, block, per_stage, stage_channels",
    [(20, None, 3, (16, 32, 64)), (164, None, 18, (64, 128, 256)), (164, "basic", 27, (16, 32, 64))],
)
def test_lm_costs_one_parameter_per_lm_block(depth: int, block: str | None, per_stage: int, stage_channels) -> None:
    plain = preact_resnet_cifar(depth, block=block)
    lm = lm_resnet_cifar(depth, block=block)
    channelwise = lm_resnet_cifar(depth, block=block, k_mode="channel")
    lm_blocks = 3 * (per_stage - 1)  # the first block of each stage keeps the plain update
    assert count(lm) - count(plain) == lm_blocks == len(lm.lm_coefficients())
    assert count(channelwise) - count(plain) == (per_stage - 1) * sum(stage_channels)


@pytest.mark.parametrize("build", [preact_resnet_imagenet, lm_resnet_imagenet])
@pytest.mark.parametrize("depth, published", [(50, 25.6e6), (101, 44.5e6)])  # He et al. 2016 (ResNet-50/101)
def test_imagenet_counts_match_he_et_al(build, depth: int, published: float) -> None:
    with torch.device("meta"):  # counts only: no memory, no initialization time
        model = build(depth)
    assert abs(count(model) - published) / published <= 0.01


def test_shapes_cifar_and_imagenet() -> None:
    torch.manual_seed(0)
    cifar = lm_resnet_cifar(20, base_width=4, num_classes=100)
    x = torch.randn(3, 3, 32, 32)
    assert cifar.features(x).shape == (3, 16, 8, 8)
    assert cifar(x).shape == (3, 100)
    bottleneck = lm_resnet_cifar(29, block="bottleneck", base_width=2, k_mode="channel")
    assert bottleneck.features(x).shape == (3, 32, 8, 8)
    assert [k.shape for k in bottleneck.lm_coefficients().values()] == [(c, 1, 1) for c in (8, 8, 16, 16, 32, 32)]
    imagenet = lm_resnet_imagenet(50, base_width=4, num_classes=7)
    image = torch.randn(2, 3, 64, 64)
    assert imagenet.features(image).shape == (2, 128, 2, 2)
    assert imagenet(image).shape == (2, 7)
    ks = torch.stack(list(lm_resnet_cifar(56).lm_coefficients().values()))
    assert ks.shape == (24,) and ks.min() >= -0.1 and ks.max() <= 0.0 and ks.std() > 0.01


# -- the LM update -------------------------------------------------------------------------------
class ScaleBlock(LMResidualBlock):
    """f(x) = 3 x + 0.5, a hand-checkable residual function."""

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return 3 * h + 0.5


@pytest.mark.parametrize("k_mode", ["scalar", "channel"])
def test_lm_update_matches_formula_exactly(k_mode: str) -> None:
    block = ScaleBlock(2, update="lm", k_mode=k_mode)
    k = torch.tensor(-0.0625) if k_mode == "scalar" else torch.tensor([-0.0625, -0.125]).view(2, 1, 1)
    with torch.no_grad():
        block.k.copy_(k)
    x = torch.tensor([[[[1.0, -2.0]], [[4.0, 0.0]]]])  # (1, 2, 1, 2)
    x_prev = torch.tensor([[[[3.0, 5.0]], [[-1.0, 2.0]]]])
    out, skip = block(x, x_prev)
    expected = (1 - k) * x + k * x_prev + (3 * x + 0.5)
    assert torch.equal(out, expected)
    assert torch.equal(skip, x)
    # e.g. first entry: (1 + 1/16) * 1 - 3/16 + 3.5
    assert out[0, 0, 0, 0].item() == 1.0625 - 0.1875 + 3.5


def test_lm_update_in_preact_block_and_gradient_of_k() -> None:
    torch.manual_seed(0)
    block = PreActBasicBlock(4, 4, update="lm").eval()
    with torch.no_grad():
        block.k.fill_(-0.25)
    x, x_prev = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    out, _ = block(x, x_prev)
    f = block.conv2(torch.relu(block.norm2(block.conv1(torch.relu(block.norm1(x))))))
    torch.testing.assert_close(out, 1.25 * x - 0.25 * x_prev + f, rtol=0, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(block.k.grad, (x_prev - x).sum())


def test_network_uses_shortcut_of_transition_as_previous_state() -> None:
    """x_{n-1} of a stage's second block is P(x) from the transition's shortcut; later blocks chain."""
    torch.manual_seed(0)
    net = lm_resnet_cifar(20, base_width=4).eval()
    with torch.no_grad():
        for k in net.lm_coefficients().values():
            k.uniform_(-0.5, 0.5)
    image = torch.randn(2, 3, 32, 32)
    x = net.stem(image)
    for stage in net.stages:
        first = stage[0]
        h = torch.relu(first.norm1(x))
        shortcut = x if first.shortcut is None else first.shortcut(h)
        x_prev, x = shortcut, shortcut + first.branch(h)
        for block in stage[1:]:
            h = torch.relu(block.norm1(x))
            x_prev, x = x, (1 - block.k) * x + block.k * x_prev + block.branch(h)
    torch.testing.assert_close(net.features(image), x, rtol=1e-5, atol=1e-5)


def test_lm_resnet_with_k_zero_is_the_plain_resnet() -> None:
    torch.manual_seed(0)
    plain, lm = preact_resnet_cifar(20, base_width=4).eval(), lm_resnet_cifar(20, base_width=4).eval()
    missing = lm.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(name.endswith(".k") for name in missing)
    image = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(lm(image), plain(image))
    with torch.no_grad():
        for k in lm.lm_coefficients().values():
            k.zero_()
    torch.testing.assert_close(lm(image), plain(image))


# -- stochastic depth ----------------------------------------------------------------------------
def test_survival_probabilities_decay_linearly_to_p_last() -> None:
    assert linear_survival_probabilities(4, 0.5) == [0.875, 0.75, 0.625, 0.5]
    net = lm_resnet_cifar(20, base_width=4, stochastic_depth=True, survival_prob_last=0.5)
    probs = [block.survival_prob for _, block in net.blocks()]
    torch.testing.assert_close(
        torch.tensor(probs, dtype=torch.float64), 1 - torch.arange(1, 10, dtype=torch.float64) / 9 * 0.5
    )
    assert all(block.survival_prob == 1.0 for _, block in lm_resnet_cifar(20, base_width=4).blocks())


def assert_eval_is_monte_carlo_mean(samples: torch.Tensor, evaluated: torch.Tensor, unscaled: torch.Tensor) -> None:
    """|MC mean - eval| within 5 standard errors everywhere; the unscaled output is far outside.

    The floor of 1e-5 covers float32 rounding where all samples agree (a zero standard error).
    """
    samples = samples.double()
    mean = samples.mean(0)
    tolerance = 5 * samples.std(0) / samples.shape[0] ** 0.5 + 1e-5
    assert ((mean - evaluated).abs() <= tolerance).all()
    assert ((mean - unscaled).abs() > tolerance).any()  # the test would catch a missing rescaling


@pytest.mark.parametrize("update", ["plain", "lm"])
def test_single_block_eval_equals_expectation_of_training_batch_mode(update: str) -> None:
    """One block is linear in its Bernoulli gate eta: E[x' ] = base + p f(x), exactly the eval output.

    BatchNorm is put in eval mode (fixed statistics) so that f itself is deterministic; only the gate
    is random, with one draw per forward in the default 'batch' mode (Huang et al.).
    """
    torch.manual_seed(0)
    block = PreActBasicBlock(3, 3, update=update, survival_prob=0.3)
    block.eval()
    x, x_prev = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        evaluated = block(x, x_prev)[0]
        block.survival_prob = 1.0
        unscaled = block(x, x_prev)[0]
        block.survival_prob = 0.3
        block.train()
        block.norm1.eval(), block.norm2.eval()
        samples = torch.stack([block(x, x_prev)[0] for _ in range(1000)])
    assert_eval_is_monte_carlo_mean(samples, evaluated, unscaled)
    assert len(torch.unique(samples[:, 0, 0, 0, 0])) == 2  # the whole branch is either kept or dropped


def test_single_block_eval_equals_expectation_of_training_sample_mode() -> None:
    torch.manual_seed(1)
    block = PreActBottleneckBlock(
        8, 8, update="lm", survival_prob=0.6, stochastic_depth_mode="sample", k_mode="channel"
    )
    block.eval()
    x, x_prev = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        evaluated = block(x, x_prev)[0][0]
        block.survival_prob = 1.0
        unscaled = block(x, x_prev)[0][0]
        block.survival_prob = 0.6
        block.train()
        for norm in (block.norm1, block.norm2, block.norm3):
            norm.eval()
        samples = block(x.expand(4000, -1, -1, -1), x_prev.expand(4000, -1, -1, -1))[0]  # one gate per sample
    assert_eval_is_monte_carlo_mean(samples, evaluated, unscaled)


class LinearBlock(LMResidualBlock):
    """f(x) = W x (a 1×1 convolution): with linear f the whole network is multilinear in the gates."""

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(channels, **kwargs)
        self.conv = nn.Conv2d(channels, channels, 1)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h)


def test_deep_linear_lm_network_eval_equals_expectation_of_training() -> None:
    """Six LM blocks with linear residual functions and independent gates.

    Each block's output is affine in x_n, x_{n-1} and its gate, so the network output is a polynomial
    of degree at most one in each independent gate: its expectation is obtained by replacing every
    gate by its mean p_l, which is what evaluation mode computes. (With ReLU or BatchNorm inside f
    the expectation of a deep network is not its evaluation output; hence the linear setting.)
    """
    torch.manual_seed(0)
    probs = linear_survival_probabilities(6, 0.5)
    blocks = nn.ModuleList(
        [
            LinearBlock(2, update="plain" if i == 0 else "lm", survival_prob=p, k_init_range=(-0.5, 0.5))
            for i, p in enumerate(probs)
        ]
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        x_prev = None
        for block in blocks:
            x, x_prev = block(x, x_prev)
        return x

    x = torch.randn(1, 2, 2, 2)
    with torch.no_grad():
        blocks.eval()
        evaluated = run(x)
        for block in blocks:
            block.survival_prob = 1.0
        unscaled = run(x)
        for block, p in zip(blocks, probs):
            block.survival_prob = p
        blocks.train()
        samples = torch.stack([run(x) for _ in range(2000)])
    assert_eval_is_monte_carlo_mean(samples, evaluated, unscaled)


def test_dropped_block_skips_its_branch() -> None:
    torch.manual_seed(0)
    block = PreActBasicBlock(2, 2, survival_prob=0.5).train()
    calls = []
    block.conv1.register_forward_hook(lambda *args: calls.append(1))
    for _ in range(100):
        block(torch.randn(2, 2, 3, 3))
    assert 25 < len(calls) < 75  # ~Binomial(100, 0.5): the branch ran only for the surviving draws


def test_network_draws_are_bernoulli_and_independent_of_the_global_rng() -> None:
    torch.manual_seed(3)
    draws = BranchSurvivalDraws([0.9, 0.5, 0.2])
    torch.manual_seed(3)
    twin = BranchSurvivalDraws([0.9, 0.5, 0.2])  # what another DDP rank builds after the same seed_everything
    sequence = []
    for step in range(2000):
        torch.manual_seed(step)  # other consumers of the global RNG (augmentation, dropout) must not matter
        torch.rand(step % 7)
        sequence.append(draws.draw())
        assert twin.draw() == sequence[-1]
    frequencies = torch.tensor(sequence, dtype=torch.float64).mean(0)
    standard_errors = (draws.survival_probs * (1 - draws.survival_probs) / 2000).sqrt()
    assert ((frequencies - draws.survival_probs).abs() <= 5 * standard_errors).all()


def test_network_stochastic_depth_resumes_the_draw_sequence_from_the_state_dict() -> None:
    torch.manual_seed(0)
    net = lm_resnet_cifar(20, base_width=2, stochastic_depth=True).train()
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(3):
            net(images)
        state = net.state_dict()
        expected = [net.survival_draws.draw() for _ in range(20)]
        torch.manual_seed(1)
        resumed = lm_resnet_cifar(20, base_width=2, stochastic_depth=True)
        assert resumed.survival_draws.seed != net.survival_draws.seed
        resumed.load_state_dict(state)
    assert resumed.survival_draws.step == 3
    assert [resumed.survival_draws.draw() for _ in range(20)] == expected
    assert any(not all(keeps) for keeps in expected)  # some block was dropped, so the comparison means something


def test_network_passes_its_draws_to_the_blocks() -> None:
    torch.manual_seed(0)
    net = lm_resnet_cifar(20, base_width=2, stochastic_depth=True, survival_prob_last=0.1).train()
    calls = {name: 0 for name, _ in net.blocks()}
    for name, block in net.blocks():
        block.conv1.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    twin = BranchSurvivalDraws([block.survival_prob for _, block in net.blocks()], seed=net.survival_draws.seed)
    kept = torch.zeros(len(calls))
    with torch.no_grad():
        for _ in range(30):
            net(torch.randn(2, 3, 8, 8))
            kept += torch.tensor(twin.draw(), dtype=torch.float64)
    assert list(calls.values()) == kept.long().tolist()
    assert kept.min() < 30  # a block was dropped
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8))
    assert net.survival_draws.step == 30  # evaluation draws nothing


@pytest.mark.parametrize(
    "stochastic_depth, mode, strategy, refused",
    [
        (True, "batch", DDPStrategy(), True),
        (True, "batch", DDPStrategy(find_unused_parameters=True), False),
        (True, "sample", DDPStrategy(), False),
        (False, "batch", DDPStrategy(), False),
        (True, "batch", SingleDeviceStrategy("cpu"), False),
    ],
)
def test_batch_mode_stochastic_depth_needs_ddp_to_find_unused_parameters(
    stochastic_depth, mode, strategy, refused
) -> None:
    if refused:
        with pytest.raises(ValueError, match=r"ddp_find_unused_parameters_true.*stochastic_depth_mode sample"):
            check_stochastic_depth_strategy(stochastic_depth, mode, strategy)
    else:
        check_stochastic_depth_strategy(stochastic_depth, mode, strategy)


# -- bad arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: preact_resnet_cifar(21), r"`depth` of a CIFAR ResNet with basic blocks must be 6n \+ 2"),
        (lambda: lm_resnet_cifar(30, block="bottleneck"), r"must be 9n \+ 2"),
        (lambda: lm_resnet_cifar(20, block="wide"), r"`block` must be one of \['basic', 'bottleneck'\]"),
        (lambda: lm_resnet_cifar(20, k_mode="pixel"), r"`k_mode` must be one of \['scalar', 'channel'\], got 'pixel'"),
        (lambda: lm_resnet_cifar(20, k_init_range=(0.0, -0.1)), "low <= high"),
        (
            lambda: lm_resnet_cifar(20, stochastic_depth=True, survival_prob_last=0.0),
            r"`survival_prob_last` must be a probability in \(0, 1\]",
        ),
        (
            lambda: lm_resnet_cifar(20, stochastic_depth_mode="row"),
            r"`stochastic_depth_mode` must be one of \['batch', 'sample'\]",
        ),
        (lambda: lm_resnet_imagenet(77), r"`depth` of an ImageNet ResNet must be one of \[18, 34, 50, 101, 152\]"),
        (lambda: PreActBasicBlock(4, 8, stride=2, update="lm"), "transitions use update='plain'"),
    ],
)
def test_bad_arguments_raise_actionable_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_lm_block_without_previous_state_and_wrong_channels_raise() -> None:
    with pytest.raises(ValueError, match="needs the previous state `x_prev`"):
        PreActBasicBlock(2, 2, update="lm")(torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\).*in_channels"):
        lm_resnet_cifar(20, base_width=2)(torch.randn(1, 1, 32, 32))


# -- LightningModules, logging of k_n, configs ---------------------------------------------------
def test_modules_default_to_the_cifar_recipe() -> None:
    module = LMResNetModule(network=dict(depth=20, base_width=4))
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) and dict(scheduler.milestones) == {80: 1, 120: 1}
    assert count(ResNetCIFARModule(network=dict(depth=56))) == 855_578
    assert count(LMResNetModule(network=dict(depth=56))) == 855_578 + 24


def test_lm_module_logs_k_per_block_and_a_figure_and_reloads(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = LMResNetModule(network=dict(depth=20, base_width=4, k_mode="channel"), lr=0.5, lr_scheduler="none")
    initial = {name: k.detach().clone() for name, k in module.network.lm_coefficients().items()}
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    logger = TensorBoardLogger(tmp_path, name="lm")
    trainer = quiet_trainer(
        max_epochs=2, logger=logger, default_root_dir=tmp_path, limit_val_batches=0, enable_checkpointing=True
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    names = [f"lm_k/stage{s}.block{b:02d}" for s in (1, 2, 3) for b in (2, 3)]
    assert set(names) <= set(events.Tags()["scalars"])
    learned = module.network.lm_coefficients()
    for name in names:
        series = events.Scalars(name)
        assert len(series) == 2 and series[0].step < series[1].step  # once per epoch, over training
        block = name.split("/")[1]
        assert series[-1].value == pytest.approx(learned[block].mean().item(), abs=1e-6)
        assert not torch.allclose(learned[block], initial[block])  # k_n is learned
    assert len(events.Images("lm_k/profile")) == 3  # at the start and after each epoch

    reloaded = LMResNetModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert reloaded.hparams.network["k_mode"] == "channel" and reloaded.hparams.network["base_width"] == 4
    for name, k in reloaded.network.lm_coefficients().items():
        torch.testing.assert_close(k, learned[name])


def test_config_builds_the_paper_setup(repo_root: Path) -> None:
    cli = build_cli(
        ["--config", str(repo_root / "configs/cifar100/lm_resnet56.yaml"), "--data.init_args.download", "false"],
        run=False,
    )
    model, data = cli.model, cli.datamodule
    assert isinstance(model, LMResNetModule) and model.hparams.network["depth"] == 56 and model.num_classes == 100
    assert list(model.hparams.network["k_init_range"]) == [-0.1, 0.0] and model.hparams.lr_milestones == [80, 120]
    assert type(data).__name__ == "CIFAR100DataModule" and data.batch_size == 128 and data.augment
    assert cli.trainer.max_epochs == 160
    assert count(model) == count(lm_resnet_cifar(56, num_classes=100))
