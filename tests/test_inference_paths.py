"""Inference-only fast paths (issue 27 item 6): they give the outputs of the training-time code within rounding.

* ``ClassifierModule.inference_chunk_size``: eval mode without autograd evaluates ``forward`` in chunks;
* ``CoordinateConvField.inference``: PR-Net's field with the coordinate channels' convolution hoisted out of the
  batch and softplus as relu(z) + log(1 + exp(-|z|)), taken by ``PDEBlock.forward`` when autograd is off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_pdenets.blocks.pde import CoordinateConvField, PDEBlock, _fast_activation
from lightning_pdenets.models import ODENetModule, PRNetModule, ResNetModule

TINY_CHEN = dict(network=dict(width=8, num_downsamples=1), image_size=8)


@pytest.mark.parametrize("activation", ["softplus", "tanh", "relu"])
@pytest.mark.parametrize("output_norm", [False, True])
def test_field_inference_equals_forward(activation: str, output_norm: bool) -> None:
    torch.manual_seed(0)
    block = PDEBlock(CoordinateConvField(8, 3, activation, output_norm), (5, 6), t_end=0.7)
    with torch.no_grad():
        block.query.add_(0.1 * torch.randn_like(block.query))  # a learned set, off the grid
    h0 = 3 * torch.randn(7, 8, 5, 6)
    reference = block.field(h0, block.query.unsqueeze(0))  # the training path (autograd on)
    with torch.no_grad():
        fast = block(h0)
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-5, atol=1e-5)


def test_fast_softplus_matches_softplus_in_float64() -> None:
    z = torch.cat([torch.linspace(-40.0, 40.0, 2001), torch.tensor([0.0, 19.99, 20.0, 20.01, -88.0, 88.0])])
    exact = torch.nn.functional.softplus(z.double())
    torch.testing.assert_close(_fast_activation(nn.Softplus(), z).double(), exact, rtol=1e-6, atol=1e-7)
    other = nn.Softplus(beta=2.0)  # only the default softplus is rewritten; the others are called as they are
    assert torch.equal(_fast_activation(other, z), other(z))


def test_block_keeps_the_training_path_with_autograd() -> None:
    torch.manual_seed(0)
    block = PDEBlock(CoordinateConvField(8), (4, 4))
    h0 = torch.randn(3, 8, 4, 4)
    assert torch.equal(block(h0), block.field(h0, block.query.unsqueeze(0)))  # bitwise: training is unchanged


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cls", [ResNetModule, PRNetModule])
def test_chunked_evaluation_gives_the_logits_of_one_batch(cls: type) -> None:
    torch.manual_seed(0)
    module = cls(**TINY_CHEN).eval()
    x = torch.randn(37, 1, 8, 8)  # not a multiple of the chunk size
    module.inference_chunk_size = 8
    calls = []
    hook = module.network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        one_batch = module.network(x)
        calls.clear()
        chunked = module(x)
    hook.remove()
    assert calls == [8, 8, 8, 8, 5]
    torch.testing.assert_close(chunked, one_batch, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), one_batch, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cls", [ResNetModule, PRNetModule])
def test_no_chunks_in_training_mode_or_with_autograd(cls: type) -> None:
    torch.manual_seed(0)
    module = cls(**TINY_CHEN)
    module.inference_chunk_size = 4
    calls = []
    module.network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(10, 1, 8, 8)
    with torch.no_grad():
        module.train()(x)  # training mode: BatchNorm-like layers would see batch statistics
    module.eval()(x)  # autograd on: gradients (e.g. attacks) through one graph, as before
    assert calls == [10, 10]


@pytest.mark.parametrize("cls", [ResNetModule, PRNetModule])
def test_several_threads_share_the_chunks_out_and_give_the_one_thread_logits(cls: type) -> None:
    torch.manual_seed(0)
    module = cls(**TINY_CHEN).eval()
    module.inference_chunk_size = 4
    x = torch.randn(18, 1, 8, 8)  # five chunks: 4, 4, 4, 4, 2
    calls, grad_modes = [], []
    module.network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    module.network.register_forward_hook(lambda m, args, out: grad_modes.append(torch.is_grad_enabled()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one_thread = module(x)
        calls.clear()
        torch.set_num_threads(2)
        with torch.no_grad():
            two_threads = module(x)
        assert torch.get_num_threads() == 2  # restored after the workers
        with torch.inference_mode():
            inference = module(x)
    finally:
        torch.set_num_threads(threads)
    assert sorted(calls[:5]) == [2, 4, 4, 4, 4]  # the workers' calls, in any order
    assert torch.equal(two_threads, one_thread)  # each chunk computed as at one thread
    assert not any(grad_modes)  # grad mode is thread-local: every worker ran without autograd
    assert inference.is_inference() and torch.equal(inference, one_thread)


def test_the_thread_count_is_restored_when_a_chunk_fails() -> None:
    module = ResNetModule(**TINY_CHEN).eval()
    module.inference_chunk_size = 4

    def fail(m, args):
        raise RuntimeError("broken chunk")

    module.network.register_forward_pre_hook(fail)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad(), pytest.raises(RuntimeError, match="broken chunk"):
            module(torch.randn(10, 1, 8, 8))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_no_chunks_off_the_cpu() -> None:
    """One CPU thread (OMP_NUM_THREADS=1, as torchrun sets it) must not split a GPU batch into chunks."""
    module = ResNetModule(**TINY_CHEN).eval().to("meta")  # a non-CPU device that needs no GPU
    module.inference_chunk_size = 4
    calls = []
    module.network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        logits = module(torch.randn(10, 1, 8, 8, device="meta"))
    assert calls == [10]
    assert logits.shape == (10, 10)


def test_adaptive_solver_models_are_not_chunked() -> None:
    assert ODENetModule.inference_chunk_size is None  # dopri5's steps depend on the whole batch
    assert ResNetModule.inference_chunk_size and PRNetModule.inference_chunk_size


def test_a_field_subclass_with_its_own_forward_is_evaluated_by_it() -> None:
    class Doubled(CoordinateConvField):
        def forward(self, h0: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(h0, coordinates)

    torch.manual_seed(0)
    block = PDEBlock(Doubled(8), (4, 4))
    h0 = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(h0), block.field(h0, block.query.unsqueeze(0)))
