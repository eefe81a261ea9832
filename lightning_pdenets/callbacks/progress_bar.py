"""Lightning's tqdm progress bar, with its epoch, total and ETA also after a mid-epoch resume."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from lightning_pdenets.validation import check_bool, check_positive_int

__all__ = ["ResumeAwareProgressBar"]


class ResumeAwareProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` that reads ``Epoch 3: 74%|… 1274/1719 [ETA]`` after
    ``--ckpt_path`` resumes a run in the middle of an epoch.

    Lightning skips the ``on_train_epoch_start`` hooks of the epoch it restarts in, and that hook is where
    ``TQDMProgressBar`` gives the bar its epoch number and total, so a resumed bar read ``Training: 1274/?``
    with neither until the next epoch. This bar does that setup at the first batch after a restart inside an
    epoch, starting from the batches already trained on, so the rate and ETA count only new batches; the next
    epoch's bar starts from zero again. Everywhere else it is ``TQDMProgressBar``; ``pdenets`` uses it as the
    default bar.
    """

    # TQDMProgressBar's own arguments, declared again so that the generated docs page shows the signature
    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        check_positive_int(refresh_rate, "refresh_rate", minimum=0)  # 0 turns the bar off, as in TQDMProgressBar
        check_positive_int(process_position, "process_position", minimum=0)
        check_bool(leave, "leave")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._restarted_in_epoch = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._restarted_in_epoch = trainer.fit_loop.restarted_mid_epoch or trainer.fit_loop.restarted_on_epoch_end

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # tqdm's reset() keeps `initial`: a resumed epoch's would make the next epoch's rate negative
        self.train_progress_bar.initial = 0
        super().on_train_epoch_start(trainer, *args)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self._restarted_in_epoch:
            return
        # the first batch after the restart: its index is the number of batches this epoch has already trained on
        self._restarted_in_epoch = False
        self.on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.initial = bar.n = batch_idx
        if not bar.disable:
            bar.refresh()
