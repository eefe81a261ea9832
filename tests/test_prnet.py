"""PR-Net: PDE block, exact derivatives, Algorithm-1 module, resume, DDP and NaN handling."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.architectures.odenet import odenet_chen
from lightning_pdenets.architectures.prnet import prnet, stem_output_size
from lightning_pdenets.blocks.pde import CoordinateConvField, PDEBlock, coordinate_grid
from lightning_pdenets.cli import build_cli, main
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.errors import NonFiniteLossError
from lightning_pdenets.migration import VERSION_KEY, LegacyCheckpointError
from lightning_pdenets.migration import main as upgrade_main
from lightning_pdenets.models.prnet import PRNET_OPTIMIZERS, PRNET_STEPS, PRNetAlgorithmModule, PRNetModule
from tests.conftest import REPO_ROOT
from tests.test_models import RecordLearningRates, one_cycle_rates
from tests.trainers import quiet_trainer

TINY_NETWORK = dict(width=8, num_downsamples=1)
TINY = dict(network=TINY_NETWORK, image_size=8)


class TinyDigits(pl.LightningDataModule):
    """24 random 8x8 images in fixed order (no shuffling, so runs are reproducible across resumes)."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(24, 1, 8, 8, generator=generator), torch.randint(0, 10, (24,), generator=generator)
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, self.batch_size, shuffle=False)


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"default_root_dir": tmp_path, **kwargs})


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- architecture -------------------------------------------------------------------------------
def test_parameter_count_matches_table_2_and_shares_stem_and_head_with_odenet():
    network, odenet = prnet(), odenet_chen()
    assert count(network) == pytest.approx(0.21e6, rel=0.10)
    assert count(network.stem) == count(odenet.stem) and count(network.head) == count(odenet.head)
    assert network(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    svhn = prnet(in_channels=3, image_size=32)
    assert count(svhn) == pytest.approx(0.21e6, rel=0.10) and svhn(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stem_output_size_matches_the_stem():
    for image_size, downsamples in ((28, 2), (32, 2), (8, 1)):
        h0 = prnet(image_size=image_size, num_downsamples=downsamples, width=8).stem(
            torch.zeros(1, 1, image_size, image_size)
        )
        assert tuple(h0.shape[-2:]) == stem_output_size(image_size, downsamples)


def test_pde_block_keeps_the_shape_and_starts_the_query_set_on_the_grid_at_t_end():
    block = PDEBlock(CoordinateConvField(8), (5, 4), t_end=2.0)
    assert block(torch.randn(3, 8, 5, 4)).shape == (3, 8, 5, 4)
    torch.testing.assert_close(block.query[2], torch.full((5, 4), 2.0))
    torch.testing.assert_close(block.query[0, 0], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(block.query[1, :, 0], torch.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match=r"spatial size \(5, 4\)"):
        block(torch.randn(3, 8, 6, 6))


@pytest.mark.parametrize(
    "activation, output_norm", [("softplus", False), ("tanh", False), ("relu", False), ("softplus", True)]
)
def test_taylor_mode_derivatives_equal_nested_jvp(activation, output_norm):
    torch.manual_seed(0)
    block = PDEBlock(CoordinateConvField(16, activation=activation, output_norm=output_norm), (5, 4)).double()
    with torch.no_grad():  # move away from the symmetric initialization
        block.query.add_(0.1 * torch.randn_like(block.query))
        for parameter in block.field.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    h0 = torch.randn(3, 16, 5, 4, dtype=torch.float64)
    orders = {"x": 3, "y": 2}
    fast, reference = block.derivatives(h0, orders, method="taylor"), block.derivatives(h0, orders, method="jvp")
    torch.testing.assert_close(fast.u, reference.u)
    torch.testing.assert_close(fast.u, block(h0))
    torch.testing.assert_close(fast.u_t, reference.u_t)
    for axis in orders:
        assert len(fast.spatial[axis]) == orders[axis]
        for ours, theirs in zip(fast.spatial[axis], reference.spatial[axis]):
            torch.testing.assert_close(ours, theirs)
    assert fast.spatial["x"][2].abs().mean() > 1e-3  # third derivatives are not trivially zero


def test_taylor_mode_derivative_matches_a_finite_difference_of_the_query_set():
    torch.manual_seed(1)
    block = PDEBlock(CoordinateConvField(8), (4, 4)).double()
    h0 = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    derivatives = block.derivatives(h0, {"x": 1})
    step = 1e-6
    shifted = block.field(h0, (block.query + step * torch.eye(3, dtype=torch.float64)[0].view(3, 1, 1)).unsqueeze(0))
    torch.testing.assert_close(derivatives.spatial["x"][0], (shifted - derivatives.u) / step, atol=1e-5, rtol=1e-4)


def test_coordinate_grid_and_initial_condition_loss():
    block = PDEBlock(CoordinateConvField(8), (3, 3))
    torch.testing.assert_close(block.initial_grid, coordinate_grid(3, 3, 0.0))
    h0 = torch.randn(2, 8, 3, 3)
    expected = (block.field(h0, coordinate_grid(3, 3, 0.0).unsqueeze(0)) - h0).pow(2).mean()
    torch.testing.assert_close(block.initial_condition_loss(h0), expected)


# -- module -------------------------------------------------------------------------------------
def test_module_has_four_optimizers_with_schedulers_and_a_proximal_alpha_step(tmp_path):
    module = PRNetModule(**TINY, theta=dict(lr_scheduler="multistep", lr_milestones=[1]))
    optimizers, schedulers = module.configure_optimizers()
    assert [type(o).__name__ for o in optimizers] == ["Adam", "Adam", "Adam", "ProximalSGD"]
    assert len(schedulers) == 4 and type(schedulers[1]["scheduler"]).__name__ == "MultiStepLR"
    groups = module.parameter_groups()
    assert groups["query"][0] is module.block.query and groups["alpha"][0] is module.governing.alpha
    assert {id(p) for p in groups["task"]} == {id(p) for p in module.network.parameters()} - {id(module.block.query)}


def test_one_cycle_schedules_step_per_batch_and_per_epoch_ones_per_epoch(tmp_path):
    recorder = RecordLearningRates()
    module = PRNetModule(
        **TINY, lr=0.02, lr_scheduler="onecycle", theta=dict(lr=0.01, lr_scheduler="multistep", lr_milestones=[1])
    )
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert [rates[0] for rates in recorder.rates] == pytest.approx(one_cycle_rates(0.02, 6))
    assert [rates[1] for rates in recorder.rates] == pytest.approx([0.01] * 3 + [0.001] * 3)


class RecordAlphaGroup(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        group = trainer.optimizers[-1].param_groups[0]
        self.rates.append((group["lr"], group["momentum"]))


def test_a_one_cycle_ista_step_peaks_at_its_learning_rate_without_momentum(tmp_path):
    recorder = RecordAlphaGroup()
    module = PRNetModule(**TINY, alpha=dict(optimizer="proximal", lr=0.01, lr_scheduler="onecycle"))
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, TinyDigits())
    # the 1/L cap of the ISTA step is not the schedule's peak, and plain ISTA gets no heavy-ball momentum
    assert [rate for rate, _ in recorder.rates] == pytest.approx(one_cycle_rates(0.01, 6))
    assert [momentum for _, momentum in recorder.rates] == [0.0] * 6
    assert "momentum_buffer" not in trainer.optimizers[-1].state[module.governing.alpha]


def test_one_cycle_cycles_the_momentum_of_optimizers_that_have_one(tmp_path):
    recorder = RecordLearningRates()
    module = PRNetModule(**TINY, theta=dict(optimizer="sgd", momentum=0.9, lr_scheduler="onecycle"))
    make_trainer(tmp_path, max_steps=8, limit_val_batches=0, callbacks=[recorder]).fit(module, TinyDigits())
    momenta = {group["momentum"] for group in module.trainer.optimizers[1].param_groups}
    assert momenta and all(0.85 <= value <= 0.95 for value in momenta)


@pytest.mark.parametrize(
    "step, changed",
    [("task", {"stem", "field", "head"}), ("theta", {"field"}), ("query", {"query"}), ("alpha", {"alpha"})],
)
def test_each_sub_step_updates_only_its_own_parameters(tmp_path, step, changed):
    torch.manual_seed(0)
    module = PRNetModule(**TINY, step_order=[step], l1_weight=0.0, governing_weight=1.0)
    parts = {
        "stem": module.network.stem,
        "field": module.block.field,
        "head": module.network.head,
        "query": module.block.query,
        "alpha": module.governing.alpha,
    }
    before = {
        name: copy.deepcopy(list(p.parameters()) if isinstance(p, torch.nn.Module) else [p])
        for name, p in parts.items()
    }
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, TinyDigits())
    for name, part in parts.items():
        now = list(part.parameters()) if isinstance(part, torch.nn.Module) else [part]
        moved = any(not torch.equal(a, b) for a, b in zip(before[name], now))
        assert moved == (name in changed), f"{step} step: {name} moved={moved}"


def test_algorithm_1_logs_every_loss_term_and_the_equation_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = PRNetModule(**TINY)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1).fit(module, TinyDigits())
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for term in ("loss_task", "loss_initial", "loss_governing", "penalty_l1", "total"):
        assert f"train/{term}_step" in scalars, sorted(scalars)
    text = [t for t in events.Tags()["tensors"] if "governing/equation" in t]
    assert text, events.Tags()
    assert "governing/coefficients" in events.Tags()["images"]
    assert module.trainer.global_step == 4 * 3  # four optimizer steps per batch, three batches


def test_inference_carries_no_alpha_and_computes_no_derivatives(tmp_path, monkeypatch):
    module = PRNetModule(**TINY)

    def forbidden(*args, **kwargs):
        raise AssertionError("derivatives computed at inference")

    monkeypatch.setattr(module.block, "derivatives", forbidden)
    monkeypatch.setattr(module.block, "initial_condition_loss", forbidden)
    predictions = make_trainer(tmp_path).predict(module, DataLoader(TinyDigits().data, batch_size=8))
    assert torch.cat(predictions).shape == (24, 10)
    assert not any("alpha" in name for name in module.network.state_dict())
    assert count(module) - count(module.network) == module.governing.num_terms


def test_nonfinite_term_is_named_and_stops_the_run(tmp_path):
    module = PRNetModule(**TINY)
    with torch.no_grad():
        module.governing.alpha[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss_governing") as failure:
        make_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, TinyDigits())
    message = str(failure.value)
    # the learning rates of the parameters behind L_G, PR-Net's own clipping; no solver, no Trainer clipping
    assert "(--model.init_args.theta.lr 0.0001 --model.init_args.alpha.lr 0.001)" in message
    assert "(in the theta sub-step)" in message and "--model.init_args.gradient_clip_val 1.0" in message
    assert "step_size" not in message and "rtol" not in message and "--trainer.gradient_clip_val 1.0" not in message


EXPLODING_ALPHA = [
    "fit",
    f"--config={REPO_ROOT / 'configs/digits/prnet.yaml'}",
    "--model.init_args.network.width=8",
    "--model.init_args.alpha={optimizer: sgd, lr: 1000000.0}",  # diverges; the advice proposes 1e-3
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.cli  # four small fits through the CLI: about 40 s
def test_every_remedy_the_nan_advice_offers_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteLossError) as failure:
        build_cli(EXPLODING_ALPHA)
    message = str(failure.value)
    lower = re.search(r"with lower learning rates \(((?:--model\.init_args\.\S+ \S+ ?)+)\)", message)
    assert lower and "--model.init_args.alpha.lr 0.001" in lower.group(1), message
    remedies = [lower.group(1).split()]
    remedies += [
        option.split() for option in re.findall(r"--model\.init_args\.(?:gradient_clip_val|on_nonfinite) \S+", message)
    ]
    assert len(remedies) == 3, message
    for remedy in remedies:  # each, followed to the letter, gives a run that ends (the old advice's Trainer clipping
        try:  # was refused under manual optimization)
            cli = build_cli([*EXPLODING_ALPHA, *remedy])
        except NonFiniteLossError:
            assert remedy[0] == "--model.init_args.gradient_clip_val"  # clipping bounds the step, not the rate
        else:
            assert "test/acc_top1" in cli.trainer.callback_metrics


def test_nonfinite_term_skips_only_the_affected_steps_when_configured(tmp_path):
    module = PRNetModule(**TINY, on_nonfinite="skip")
    with torch.no_grad():
        module.governing.alpha[3] = float("nan")
    field_before = copy.deepcopy(module.block.field.state_dict())
    query_before = module.block.query.detach().clone()
    with pytest.warns(UserWarning, match="loss_governing"):
        make_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, TinyDigits())
    assert module.skipped_steps == 2 * 3  # theta and alpha steps, three batches
    assert not torch.equal(module.block.query, query_before)  # the query step still ran
    assert any(not torch.equal(v, module.block.field.state_dict()[k]) for k, v in field_before.items())  # task step ran


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step_order=["task", "dream"]), "`step_order` must be a non-empty list of distinct names"),
        (dict(step_order=["task", "task"]), "distinct"),
        (
            dict(alpha=dict(optimizer="lbfgs")),
            "`alpha.optimizer` must be one of ['adam', 'adamw', 'proximal', 'rmsprop', 'sgd']",
        ),
        (
            dict(theta=dict(optimizer="proximal")),
            "`theta.optimizer` must be one of ['adam', 'adamw', 'rmsprop', 'sgd']",
        ),
        (dict(theta=dict(lr=-1.0)), "`theta.lr` must be a finite number > 0"),
        (dict(query=dict(lr_scheduler="multistep")), "`query.lr_scheduler='multistep'` needs `query.lr_milestones`"),
        (dict(alpha=dict(momentum=1.0)), "`alpha.momentum` must be in [0, 1)"),
        (
            dict(theta=dict(learning_rate=0.1)),
            "unknown `theta` setting(s) 'learning_rate'; valid names are ['optimizer', 'lr',",
        ),
        (dict(query=dict(lr_sheduler="cosine")), "'lr_sheduler' (did you mean 'lr_scheduler'?)"),
        (dict(on_nonfinite="ignore"), "`on_nonfinite` must be one of ['raise', 'skip']"),
        (dict(max_derivative_order=(3, 3, 3)), "one integer per axis ['x', 'y']"),
        (dict(network=dict(TINY_NETWORK, activation="swish")), "`activation` must be one of"),
        (dict(image_size=3, network=dict(TINY_NETWORK, num_downsamples=2)), "too small"),
        (dict(governing_samples=0), "`governing_samples` must be an integer >= 1"),
        (dict(alpha=dict(weight_decay=0.5)), "`alpha.weight_decay` does not apply to `alpha: {optimizer: proximal}`"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as error:
        PRNetModule(**{**TINY, **kwargs})
    assert message in str(error.value)


def test_governing_loss_uses_only_governing_samples_but_the_task_loss_the_whole_batch(tmp_path):
    module = PRNetModule(**TINY, step_order=["theta"], governing_samples=3)
    sizes, original = [], module.block.derivatives

    def spy(h0, *args, **kwargs):
        sizes.append(h0.shape[0])
        return original(h0, *args, **kwargs)

    module.block.derivatives = spy
    head_inputs = []
    module.network.head.register_forward_hook(lambda m, inputs, output: head_inputs.append(inputs[0].shape[0]))
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, TinyDigits())
    assert sizes == [3] and head_inputs == [8]


def test_gradient_clipping_bounds_every_sub_step(tmp_path):
    module = PRNetModule(**TINY, step_order=["task"], optimizer="sgd", lr=1.0, momentum=0.0, gradient_clip_val=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameter_groups()["task"]])
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, TinyDigits())
    after = torch.cat([p.detach().flatten() for p in module.parameter_groups()["task"]])
    assert 0 < (after - before).norm() <= 1e-3 * (1 + 1e-4)


def test_step_order_names_are_the_papers_lines_5_to_8():
    assert PRNET_STEPS == ("task", "theta", "query", "alpha")


def test_algorithm_1_alone_names_no_network():
    with pytest.raises(
        TypeError,
        match=r"PRNetAlgorithmModule sets no `architecture` \(a name registered with @register_architecture\)",
    ):
        PRNetAlgorithmModule()


# -- optimizer specs ------------------------------------------------------------------------------
def test_optimizer_specs_merge_over_the_defaults_and_are_stored_complete():
    module = PRNetModule(**TINY, theta=dict(lr=0.003, lr_scheduler="multistep", lr_milestones=(2, 4)))
    assert module.hparams.theta == {
        **PRNET_OPTIMIZERS["theta"],
        "lr": 0.003,
        "lr_scheduler": "multistep",
        "lr_milestones": [2, 4],
    }
    assert module.hparams.query == PRNET_OPTIMIZERS["query"] and module.hparams.alpha["optimizer"] == "proximal"
    assert PRNET_OPTIMIZERS["theta"]["lr"] == 1e-3  # the defaults are not modified
    optimizers, schedulers = module.configure_optimizers()
    assert optimizers[1].param_groups[0]["lr"] == 0.003 and schedulers[1]["scheduler"].milestones == {2: 1, 4: 1}


def test_an_optimizer_spec_that_is_not_a_mapping_is_refused():
    with pytest.raises(
        TypeError, match=r"`theta` must be a mapping of optimizer settings such as \{'optimizer': 'adam'"
    ):
        PRNetModule(**TINY, theta=0.001)


def test_checkpoint_holds_primitive_optimizer_specs_and_rebuilds_the_same_optimizers(tmp_path):
    module = PRNetModule(**TINY, theta=dict(optimizer="sgd", lr=0.05), alpha=dict(lr=0.02))
    trainer = make_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, TinyDigits())
    trainer.save_checkpoint(tmp_path / "prnet.ckpt")
    hparams = torch.load(tmp_path / "prnet.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["theta"] == {**PRNET_OPTIMIZERS["theta"], "optimizer": "sgd", "lr": 0.05}
    assert hparams["alpha"] == {**PRNET_OPTIMIZERS["alpha"], "lr": 0.02}
    restored = PRNetModule.load_from_checkpoint(tmp_path / "prnet.ckpt")
    assert [(type(o).__name__, o.defaults["lr"]) for o in restored.configure_optimizers()[0]] == [
        ("Adam", 1e-3),
        ("SGD", 0.05),
        ("Adam", 1e-3),
        ("ProximalSGD", 0.02),
    ]


def test_nested_optimizer_settings_from_the_command_line():
    config = str(REPO_ROOT / "configs/digits/prnet.yaml")
    cli = build_cli(
        ["--config", config, "--model.init_args.theta.lr=0.003", "--model.init_args.alpha.optimizer=adam"], run=False
    )
    assert cli.model.hparams.theta == {**PRNET_OPTIMIZERS["theta"], "lr": 0.003}
    assert cli.model.hparams.alpha == {**PRNET_OPTIMIZERS["alpha"], "optimizer": "adam"}  # the YAML's lr 0.01 kept


def test_a_flat_optimizer_argument_of_an_old_config_points_to_the_nested_one(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO_ROOT / "configs/digits/prnet.yaml"), "--model.init_args.theta_lr=0.01"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --model: lightning_pdenets.models.PRNetModule has no argument 'theta_lr'. Did you mean theta.lr? "
        "(`--model.init_args.theta.lr VALUE`, or `theta: {lr: VALUE}` in YAML)"
    )


def test_a_learning_rate_given_for_a_resumed_run_replaces_the_checkpoints(tmp_path):
    command = [
        "fit",
        "--config",
        str(REPO_ROOT / "configs/digits/prnet.yaml"),
        "--model.init_args.network.width=8",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
    ]
    build_cli([*command, "--trainer.max_epochs=1"])
    resumed = build_cli([*command, "--trainer.max_epochs=2", "--ckpt_path=last", "--model.init_args.theta.lr=0.0005"])
    assert resumed.trainer.global_step == 4 * 2 * 2
    assert resumed.model.hparams.theta["lr"] == 0.0005
    rates = [optimizer.param_groups[0]["lr"] for optimizer in resumed.trainer.optimizers]
    assert rates == pytest.approx([0.003, 0.0005, 0.001, 0.01])  # theta's replaced, the others the checkpoint's


def test_a_checkpoint_with_flat_optimizer_arguments_names_its_release_and_is_upgraded(tmp_path):
    module = PRNetModule(**TINY, theta=dict(lr=0.003), alpha=dict(optimizer="adam"))
    # 0.1.x also stored the architecture's arguments flat (width, num_downsamples, ...), not as `network`
    flat = {key: value for key, value in module.hparams.items() if key not in ("theta", "query", "alpha", "network")}
    flat.update(module.hparams.network)
    for group in ("theta", "query", "alpha"):
        flat.update({f"{group}_{setting}": value for setting, value in module.hparams[group].items()})
    old = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": flat, "pytorch-lightning_version": pl.__version__}, old
    )

    with pytest.raises(LegacyCheckpointError) as error:
        PRNetModule.load_from_checkpoint(old)
    message = str(error.value)
    assert "written by lightning_pdenets 0.1.x, whose PR-Net models took flat optimizer arguments (theta_lr" in message
    assert "models took flat architecture arguments (width, num_downsamples, depth, ...)" in message
    assert f"python -m lightning_pdenets.migration {old} " in message
    assert " --model lightning_pdenets.models.prnet.PRNetModule" in message  # saved without the CLI: no class path

    new = tmp_path / "new.ckpt"
    upgrade_main([str(old), str(new), "--model", "lightning_pdenets.models.PRNetModule"])
    upgraded = torch.load(new, weights_only=True)
    assert upgraded[VERSION_KEY] and not any(
        key.startswith(("theta_", "query_", "alpha_")) for key in upgraded["hyper_parameters"]
    )
    assert (
        upgraded["hyper_parameters"]["network"] == module.hparams.network
        and "width" not in upgraded["hyper_parameters"]
    )
    restored = PRNetModule.load_from_checkpoint(new)
    assert dict(restored.hparams) == dict(module.hparams)
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in restored.state_dict().items())


# -- resume ---------------------------------------------------------------------------------------
def _state(module: PRNetModule) -> dict:
    trainer = module.trainer
    return {
        "model": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
    }


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    settings = dict(
        **TINY, l1_weight=1e-3, theta=dict(lr_scheduler="multistep", lr_milestones=[1]), alpha=dict(momentum=0.5)
    )

    def run(max_epochs: int, ckpt_path=None, directory="a") -> PRNetModule:
        pl.seed_everything(0)
        module = PRNetModule(**settings)
        trainer = make_trainer(tmp_path / directory, max_epochs=max_epochs, limit_val_batches=0)
        trainer.fit(module, TinyDigits(), ckpt_path=ckpt_path)
        return module, trainer

    uninterrupted, _ = run(2, directory="full")
    _, first = run(1, directory="half")
    checkpoint = tmp_path / "half.ckpt"
    first.save_checkpoint(checkpoint)
    resumed, _ = run(2, ckpt_path=str(checkpoint), directory="resumed")
    expected, actual = _state(uninterrupted), _state(resumed)
    _assert_same(expected, actual)
    assert resumed.trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-4)  # the scheduler stepped once
    assert (resumed.governing.alpha != 0).any()
    assert not torch.equal(resumed.block.query, coordinate_grid(3, 3, 1.0))


# -- DDP --------------------------------------------------------------------------------------------
class SaveRankState(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            f"{self.directory}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_ranks_hold_identical_theta_query_set_and_alpha(tmp_path):
    torch.manual_seed(0)
    module = PRNetModule(**TINY, l1_weight=0.0, alpha=dict(optimizer="adam", lr=1e-2))
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=4 * 3,
        limit_val_batches=0,
        callbacks=[SaveRankState(str(tmp_path))],
    )
    trainer.fit(module, TinyDigits(batch_size=4))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in (
        "network.feature.query",
        "governing.alpha",
        "network.feature.field.conv2.weight",
        "network.stem.0.weight",
    ):
        assert not torch.equal(rank0[key], initial[key]), f"{key} did not train"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
