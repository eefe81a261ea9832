"""Wall-clock time to classify one batch of test images (the PR-Net paper's inference-time metric)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_pdenets.evaluation import evaluation_pass, split_batch
from lightning_pdenets.metric_logging import log_replicated
from lightning_pdenets.validation import check_positive_int

__all__ = ["InferenceTimer"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InferenceTimer(Callback):
    """Time the forward pass on ``batch_size`` test images (1,000 as in Kim et al., Table 3) at test end.

    Test images are collected from the test batches (cycled if the test set is smaller), the model
    runs ``num_warmup`` untimed passes (cuDNN autotuning, allocator warm-up), then ``num_repeats``
    timed passes, each bracketed by a device synchronization. Logs ``inference/seconds_per_batch``
    (the median of the repeats) and ``inference/images_per_second``.

    Args:
        batch_size: Images classified in one timed forward pass.
        num_warmup: Untimed passes before timing.
        num_repeats: Timed passes; the median is reported.
    """

    def __init__(self, batch_size: int = 1000, num_warmup: int = 2, num_repeats: int = 5) -> None:
        super().__init__()
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("num_warmup", num_warmup, 0),
            ("num_repeats", num_repeats, 1),
        ):
            check_positive_int(value, name, minimum)
        self.batch_size = batch_size
        self.num_warmup = num_warmup
        self.num_repeats = num_repeats
        self._images: list[torch.Tensor] = []
        self._collected = 0
        self.last_times: list[float] = []

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._collected = [], 0

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._collected >= self.batch_size:
            return
        images, _ = split_batch(batch, need_targets=False)
        images = images[: self.batch_size - self._collected].detach()
        self._images.append(images)
        self._collected += images.shape[0]

    def timing_batch(self) -> torch.Tensor | None:
        """The ``batch_size`` collected test images (cycled when fewer were seen), or ``None``."""
        if not self._images:
            return None
        images = torch.cat(self._images)
        repeats = -(-self.batch_size // images.shape[0])
        return images.repeat(repeats, *([1] * (images.dim() - 1)))[: self.batch_size]

    def time_model(self, model: torch.nn.Module, images: torch.Tensor) -> list[float]:
        """Seconds of each of ``num_repeats`` forward passes on ``images`` after ``num_warmup`` ones.

        The model runs in eval mode under ``no_grad`` (its modes are restored afterwards); the passes are never
        counted as the model's NFE.
        """
        times: list[float] = []
        with evaluation_pass(model):
            for _ in range(self.num_warmup):
                model(images)
            for _ in range(self.num_repeats):
                _synchronize(images.device)
                start = time.perf_counter()
                model(images)
                _synchronize(images.device)
                times.append(time.perf_counter() - start)
        return times

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = self.timing_batch()
        self._images = []
        seconds = math.nan
        if images is not None:
            self.last_times = self.time_model(pl_module, images.to(pl_module.device))
            seconds = sorted(self.last_times)[len(self.last_times) // 2]
        # under DDP every rank times its own copy, and the mean over the ranks that had test images is logged;
        # every rank enters the reduction, also one that saw no test batch
        total = torch.tensor(
            [0.0 if math.isnan(seconds) else seconds, float(not math.isnan(seconds))],
            dtype=torch.float64,
            device=pl_module.device,
        )
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        seconds_sum, timed_ranks = total.tolist()
        if timed_ranks:
            seconds = seconds_sum / timed_ranks
            log_replicated(
                pl_module,
                {"inference/seconds_per_batch": seconds, "inference/images_per_second": self.batch_size / seconds},
            )
