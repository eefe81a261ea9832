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
import torch
from typing_extensions import override

from lightning_pdenets.validation import check_bool, check_positive_int

try:
    from lightning.pytorch.callbacks import EMAWeightAveraging
except ImportError:  # Lightning < 2.6 (setup.cfg allows 2.4): the package imports, EMAWeights refuses to be built

    class EMAWeightAveraging(pl.Callback):  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                f"EMAWeights (callbacks/ema.yaml) needs Lightning >= 2.6, whose EMAWeightAveraging it "
                f"extends; this is Lightning {pl.__version__}. Upgrade: pip install 'lightning>=2.6,<2.7'."
            )


__all__ = ["EMAWeights"]


class EMAWeights(EMAWeightAveraging):
    """Exponential moving average of the weights; the averaged weights are validated, saved and tested.

    Preset: ``callbacks/ema.yaml``. The arguments are those of Lightning's ``EMAWeightAveraging``.

    Args:
        device: Where the averaged copy lives (default: the model's device).
        use_buffers: Average the buffers too (e.g. batch-norm statistics), not only the parameters.
        decay: Weight of the average at each update; 0.999 averages over about 1,000 updates.
        update_every_n_steps: Update after every n-th optimizer step.
        update_starting_at_step: First optimizer step that updates (None: from the first).
        update_starting_at_epoch: Also update at the end of each epoch from this one on (None: never).
        **kwargs: Passed to :class:`torch.optim.swa_utils.AveragedModel`.
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"`decay` must be a number in [0, 1], got {decay!r}.")
        # Lightning accepts 0 (never update: the untouched initial copy then replaces the trained weights at the
        # end of fit) and a string (a TypeError at the first step); refuse both here.
        check_positive_int(update_every_n_steps, "update_every_n_steps")
        check_positive_int(update_starting_at_step, "update_starting_at_step", minimum=0, allow_none=True)
        check_positive_int(update_starting_at_epoch, "update_starting_at_epoch", minimum=0, allow_none=True)
        check_bool(use_buffers, "use_buffers")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
            **kwargs,
        )
        self.decay = decay

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._average_model = None  # the model holds the average now; evaluations read checkpoints' state_dict

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return  # evaluating: the checkpoint's state_dict, already loaded, holds the averaged weights
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
