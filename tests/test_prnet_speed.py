"""Algorithm 1 without wasted gradients (issue 27 item 6b): each sub-step's backward computes only the gradients of
the parameters its optimizer steps, and training stays bitwise what a backward over every parameter gave."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdenets.models.prnet import PRNetModule
from tests.trainers import quiet_trainer

TINY = dict(network=dict(width=8, num_downsamples=1), image_size=8)


class FullBackward(PRNetModule):
    """The sub-steps as before: one backward over every parameter, then the sub-step's optimizer."""

    def _optimize(self, optimizer: Any, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not self._all_finite(terms):
            return
        self.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()


def fit(module: pl.LightningModule, batches: int = 3) -> pl.LightningModule:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8 * batches, 1, 8, 8, generator=generator),
        torch.randint(0, 10, (8 * batches,), generator=generator),
    )
    quiet_trainer(max_epochs=1).fit(module, DataLoader(data, batch_size=8))
    return module


def test_training_is_bitwise_that_of_a_backward_over_every_parameter() -> None:
    pl.seed_everything(0, verbose=False)
    reference = fit(FullBackward(**TINY))
    pl.seed_everything(0, verbose=False)
    pruned = fit(PRNetModule(**TINY))
    for (name, expected), actual in zip(reference.state_dict().items(), pruned.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_query_step_computes_no_weight_gradients() -> None:
    pl.seed_everything(0, verbose=False)
    module = PRNetModule(**TINY, step_order=["query"])
    query = module.block.query.detach().clone()
    fit(module, batches=1)
    assert not torch.equal(module.block.query, query)  # H was stepped
    assert all(p.grad is None for p in module.block.field.parameters())  # theta's gradients were never computed
    assert all(p.grad is None for p in module.network.head.parameters())
