"""Lightning's ``EMAWeightAveraging``, with the averaged weights also evaluated by a test after ``fit``.

Lightning 2.6's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` validates with the averaged weights
and saves them as the checkpoint's ``state_dict`` (the raw ones go to ``current_model_state``). But it keeps its
averaged copy after ``fit``, so a ``trainer.test(ckpt_path=...)`` or ``validate`` by the same trainer (what
``pdenets fit`` does after training) restores ``current_model_state``, the raw weights, and a ``validate`` then
swaps in the end-of-training average instead of the checkpoint's. :class:`EMAWeights` drops the copy when ``fit``
ends (the model then holds the average, Lightning's ``on_train_end``), so every evaluation outside ``fit`` uses
the checkpoint's ``state_dict``: the averaged weights. Inside ``fit`` (and when resuming one) it is Lightning's
callback unchanged.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging

__all__ = ["EMAWeights"]


class EMAWeights(EMAWeightAveraging):
    """Exponential moving average of the weights; the averaged weights are validated, saved and tested.

    The arguments are those of Lightning's ``EMAWeightAveraging`` (``decay`` 0.999 averages over about 1,000
    optimizer steps; ``update_every_n_steps``, ``update_starting_at_step``, ``update_starting_at_epoch``,
    ``device``, ``use_buffers``). Preset: ``callbacks/ema.yaml``.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._average_model = None  # the model holds the average now; evaluations read checkpoints' state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            return  # evaluating: the checkpoint's state_dict, already loaded, holds the averaged weights
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
