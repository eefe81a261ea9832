"""Isometric MobileNetV3 and its ODE-Net / PR-Net variants: Table 3 parameter counts, shapes, training."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.architectures import mobilenetv3_isometric, odenet_mobilenet, prnet_mobilenet
from lightning_pdenets.architectures.registry import DATA_FACTS
from lightning_pdenets.models import IsometricMobileNetModule, ODEMobileNetModule, PRNetMobileNetModule
from lightning_pdenets.protocols import find_ode_blocks
from tests.trainers import quiet_trainer

# Kim et al., Table 3 (Tiny ImageNet, 200 classes): parameters of each network at width 1 and 2.
TABLE_3 = {
    (mobilenetv3_isometric, 1): 1.21e6,
    (odenet_mobilenet, 1): 1.36e6,
    (prnet_mobilenet, 1): 1.36e6,
    (mobilenetv3_isometric, 2): 4.30e6,
    (odenet_mobilenet, 2): 4.90e6,
    (prnet_mobilenet, 2): 4.56e6,
}
TINY = dict(channels=16, expanded_channels=32, num_blocks=2, patch_size=8)


@pytest.mark.parametrize("factory, width", list(TABLE_3), ids=lambda v: getattr(v, "__name__", str(v)))
def test_parameter_count_within_ten_percent_of_table_3(factory, width):
    count = sum(p.numel() for p in factory(num_classes=200, width_multiplier=width).parameters())
    assert abs(count / TABLE_3[factory, width] - 1) <= 0.10, f"{count:,} vs {TABLE_3[factory, width]:,.0f}"


def test_mobile_block_count_matches_count_by_hand():
    """One torchvision MobileNetV3 block at width 128, expanded 480, 3x3, SE to 120: counted term by term."""
    net = mobilenetv3_isometric(num_blocks=1)
    c, h, s = 128, 480, 120
    by_hand = (c * h + 2 * h) + (9 * h + 2 * h) + (h * s + s + s * h + h) + (h * c + 2 * c)
    assert sum(p.numel() for p in net.blocks[0].parameters()) == by_hand


def test_variants_replace_exactly_the_last_block():
    mobile, ode, pde = mobilenetv3_isometric(), odenet_mobilenet(), prnet_mobilenet()
    assert [type(b).__name__ for b in mobile.blocks] == ["InvertedResidual"] * 4
    assert [type(b).__name__ for b in ode.blocks] == ["InvertedResidual"] * 3 + ["ODEBlock"]
    assert [type(b).__name__ for b in pde.blocks] == ["InvertedResidual"] * 3 + ["PDEBlock"]
    assert find_ode_blocks(ode) == [ode.blocks[-1]] and not find_ode_blocks(mobile)


@pytest.mark.parametrize("width", [1, 2])
def test_isometric_same_resolution_and_width_through_every_block(width):
    net = mobilenetv3_isometric(width_multiplier=width).eval()
    h = net.backbone.stem(torch.randn(1, 3, 64, 64))
    assert h.shape == (1, 128 * width, 16, 16)
    for block in net.blocks:
        out = block(h)
        assert out.shape == h.shape  # no downsampling, no widening inside
        h = out
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 200)
    activations = {type(m).__name__ for m in net.modules()}
    assert {"Hardswish", "SqueezeExcitation", "Hardsigmoid"} <= activations


def test_stem_feature_head_split_reproduces_the_forward_pass():
    net = prnet_mobilenet(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net.head(net.feature(net.stem(x))), net(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width_multiplier=0), "`width_multiplier` must be a finite number > 0"),
        (dict(kernel_size=4), "`kernel_size` must be an odd positive integer"),
        (dict(num_blocks=0), "`num_blocks` must be an integer >= 1"),
        (dict(dropout=1.0), "`dropout` must be in [0, 1)"),
    ],
)
def test_bad_architecture_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        mobilenetv3_isometric(**kwargs)
    assert message in str(error.value)


def test_prnet_variant_rejects_image_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="must be a multiple of `patch_size`"):
        prnet_mobilenet(image_size=30, patch_size=4)


def _loader(num_classes: int = 5, n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 64, 64, generator=generator), torch.arange(n) % num_classes), batch_size=8
    )


@pytest.mark.parametrize(
    "module_class, extra",
    [
        (IsometricMobileNetModule, {}),
        (ODEMobileNetModule, dict(solver=dict(method="rk4", step_size=0.5, adjoint=False))),
        (PRNetMobileNetModule, dict(max_power=2, max_derivative_order=1)),
    ],
    ids=["mobilenetv3", "odenet", "prnet"],
)
def test_modules_train_and_reload_from_checkpoint(module_class, extra, tmp_path):
    model = module_class(num_classes=5, lr=0.01, network=TINY, **extra)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, _loader(), _loader())
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("classifier" in k for k in changed) and any("blocks.0" in k for k in changed)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = module_class.load_from_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reloaded.eval()(x), model.eval()(x))


def test_prnet_variant_stores_only_its_own_arguments_and_algorithm_1s():
    model = PRNetMobileNetModule(num_classes=5, max_power=2, max_derivative_order=1, theta=dict(lr=0.01), network=TINY)
    chen = {"width", "num_downsamples", "output_norm"}  # Chen et al.'s PR-Net's arguments
    assert not chen & set(model.hparams) and not chen & set(model.hparams.network)
    assert set(model.hparams.network) == set(inspect.signature(prnet_mobilenet).parameters) - set(DATA_FACTS)
    assert set(inspect.signature(PRNetMobileNetModule).parameters) - {"kwargs"} <= set(model.hparams)
    assert model.hparams.theta["lr"] == 0.01
    assert model.architecture_arguments() == {
        name: (model.hparams if name in DATA_FACTS else model.hparams.network)[name]
        for name in inspect.signature(prnet_mobilenet).parameters
    }


def test_prnet_variant_fine_tunes_from_a_prnet_checkpoint(tmp_path):
    source = PRNetMobileNetModule(num_classes=5, max_power=2, max_derivative_order=1, network=TINY)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(source, _loader())
    path = tmp_path / "prnet.ckpt"
    trainer.save_checkpoint(path)
    target = PRNetMobileNetModule(
        num_classes=3, pretrained_checkpoint=str(path), max_power=2, max_derivative_order=1, network=TINY
    )
    torch.testing.assert_close(target.block.query, source.block.query)
    torch.testing.assert_close(target.network.backbone.stem[0].weight, source.network.backbone.stem[0].weight)
    assert target.network.classifier.out_features == 3
    with pytest.raises(ValueError, match="different architecture"):
        PRNetMobileNetModule(num_classes=3, pretrained_checkpoint=str(path), network=dict(TINY, expanded_channels=48))


def test_odenet_mobilenet_activation_reaches_its_vector_field_and_bad_names_list_the_valid_ones():
    silu = odenet_mobilenet(activation="silu", num_classes=10, **TINY)
    relu = odenet_mobilenet(num_classes=10, **TINY)
    assert silu.blocks[-1].field.activation == "silu" and isinstance(silu.blocks[-1].field.act, torch.nn.SiLU)
    assert relu.blocks[-1].field.activation == "relu"  # Chen et al.'s field stays the default
    with pytest.raises(
        ValueError, match=r"`activation` must be one of \['elu', 'relu', 'silu', 'softplus', 'tanh'\], got 'gelu'"
    ):
        odenet_mobilenet(activation="gelu", num_classes=10, **TINY)
    module = ODEMobileNetModule(
        network=dict(TINY, activation="silu"),
        num_classes=10,
        image_size=64,
        solver={"method": "rk4", "step_size": 0.5, "adjoint": False},
    )
    assert find_ode_blocks(module)[0].field.activation == "silu"
