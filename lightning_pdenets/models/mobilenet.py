"""LightningModules of the isometric MobileNetV3 family (Kim et al., Tables 3 and 5), with fine-tuning.

Each module trains from scratch (Tiny ImageNet) or, given ``pretrained_checkpoint``, starts from a
checkpoint of the same architecture, drops its classifier for a fresh one with ``num_classes``
outputs, and fine-tunes either everything (``finetune: full``) or the head first and the rest
from ``unfreeze_backbone_at_epoch`` on (``finetune: head_first``, Lightning's ``BackboneFinetuning``).
"""

from __future__ import annotations

import os
from typing import Any, cast

from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_pdenets.architectures.odenet import ODENET_SOLVER
from lightning_pdenets.checkpoints import load_checkpoint
from lightning_pdenets.models.base import ClassifierModule
from lightning_pdenets.models.prnet import PRNetAlgorithmModule
from lightning_pdenets.models.solver import ODESolverMixin
from lightning_pdenets.validation import check_positive, check_positive_int

__all__ = [
    "FINETUNE_MODES",
    "HeadFirstFinetuning",
    "IsometricMobileNetModule",
    "ODEMobileNetModule",
    "PRNetMobileNetModule",
    "load_pretrained_backbone",
]

FINETUNE_MODES = ("full", "head_first")


class HeadFirstFinetuning(BackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` with the backbone's BatchNorm layers frozen too until unfreezing.

    With the default ``train_bn=True`` the backbone's BatchNorm weights would train from epoch 0, so
    the "frozen" backbone would change; at unfreezing every backbone parameter, BatchNorm included,
    joins the optimizer as one group.
    """

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone, train_bn=False)


class IsometricMobileNetModule(ClassifierModule):
    """Isometric MobileNetV3 (Sandler et al. 2019) as in Kim et al. Table 3 ("M.Net V3", 4 mobile blocks).

    ``network``: ``width_multiplier`` (Table 3: 1 or 2), ``channels``, ``num_blocks``, ``expanded_channels``,
    ``kernel_size``, ``patch_size``, ``head_expansion``, ``dropout``
    (:func:`lightning_pdenets.architectures.mobilenetv3_isometric`).

    Args:
        pretrained_checkpoint: Lightning checkpoint of the same architecture (e.g. trained on Tiny
            ImageNet) to start from; its classifier is replaced by one with ``num_classes`` outputs.
            To reload a fine-tuned model without the source file, pass
            ``load_from_checkpoint(path, pretrained_checkpoint=None)``. Loaded with
            ``torch.load(weights_only=True)``: a file that needs unpickling is refused.
        finetune: ``full`` trains every layer from the start; ``head_first`` freezes the backbone
            and unfreezes it at ``unfreeze_backbone_at_epoch`` (Lightning's ``BackboneFinetuning``).
        unfreeze_backbone_at_epoch: Epoch at which ``head_first`` unfreezes the backbone.
        backbone_lr_ratio: Backbone learning rate at unfreezing, relative to the head's; it then grows
            ×1.5 per epoch until it matches (``BackboneFinetuning``'s schedule).
        trust_pretrained_checkpoint: Unpickle ``pretrained_checkpoint`` even when it holds Python objects
            other than tensors, which can run any code; only for a file from a source you trust.
        **kwargs: ``network``, the data facts and the optimization settings of :class:`ClassifierModule`.
    """

    architecture = "mobilenetv3_isometric"

    def __init__(
        self,
        pretrained_checkpoint: str | None = None,
        finetune: str = "full",
        unfreeze_backbone_at_epoch: int = 5,
        backbone_lr_ratio: float = 0.1,
        trust_pretrained_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        check_finetune_settings(finetune, unfreeze_backbone_at_epoch, backbone_lr_ratio)
        super().__init__(**kwargs)
        if pretrained_checkpoint is not None:
            self.load_pretrained(pretrained_checkpoint, trusted=trust_pretrained_checkpoint)
        elif finetune == "head_first":
            rank_zero_warn(
                "finetune='head_first' without `pretrained_checkpoint`: the frozen backbone is randomly initialized. "
                "Set `pretrained_checkpoint` to the source model's .ckpt file."
            )

    @property
    def backbone(self) -> nn.Module:
        """Everything but the classifier (what ``BackboneFinetuning`` freezes and unfreezes)."""
        return cast(nn.Module, self.network.backbone)

    # -- fine-tuning ----------------------------------------------------------------------------
    def load_pretrained(self, path: str, trusted: bool = False) -> None:
        """Load all weights but the classifier from the Lightning checkpoint ``path`` (unpickled if ``trusted``)."""
        load_pretrained_backbone(self.network, path, self.architecture_arguments(), type(self).__name__, trusted)

    @override
    def configure_callbacks(self) -> list[Callback]:
        if self.hparams.finetune != "head_first":
            return []
        return [
            HeadFirstFinetuning(
                unfreeze_backbone_at_epoch=self.hparams.unfreeze_backbone_at_epoch,
                backbone_initial_ratio_lr=self.hparams.backbone_lr_ratio,
            )
        ]


def load_pretrained_backbone(
    network: nn.Module, path: str, architecture: dict[str, Any], model_name: str, trusted: bool = False
) -> None:
    """Copy every weight but ``classifier.*`` from the Lightning checkpoint at ``path`` into ``network``.

    Args:
        network: The target network (its classifier already sized for the new classes).
        path: A ``.ckpt`` file of a model with the same architecture.
        architecture: The target's architecture arguments, compared with the checkpoint's hyperparameters.
        model_name: Named in error messages.
        trusted: Unpickle the file even when a weights-only load refuses it (which can run code).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        UntrustedCheckpointError: when the file needs unpickling and ``trusted`` is false.
        ValueError: when the checkpoint holds a different architecture (names the differences).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`pretrained_checkpoint` {os.path.abspath(path)!r} does not exist; point it to the .ckpt file of the "
            f"source model (e.g. logs/tinyimagenet/mobilenetv3_w1/version_0/checkpoints/best-*.ckpt)."
        )
    checkpoint = load_checkpoint(path, trusted, how_to_trust="--model.init_args.trust_pretrained_checkpoint true")
    stored = checkpoint.get("hyper_parameters", {})
    source = {**stored, **(stored.get("network") or {})}  # this release's `network` dict, or an earlier flat layout
    differing = {
        k: (source[k], v)
        for k, v in architecture.items()
        if k in source and k not in ("num_classes", "solver") and source[k] != v
    }
    if differing:
        details = ", ".join(f"{k}: checkpoint {a!r} vs this model {b!r}" for k, (a, b) in differing.items())
        raise ValueError(
            f"checkpoint {path!r} was trained with a different architecture ({details}); "
            f"set these arguments as in the source model's config."
        )
    state = checkpoint.get("state_dict", checkpoint)
    weights = {
        key[len("network.") :]: value
        for key, value in state.items()
        if key.startswith("network.") and not key.startswith("network.classifier.")
    }
    try:
        missing, unexpected = network.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path!r} does not fit this architecture: {error}") from error
    missing = [key for key in missing if not key.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r} does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            f"use the model class and architecture arguments of the source run."
        )


def check_finetune_settings(finetune: str, unfreeze_backbone_at_epoch: int, backbone_lr_ratio: float) -> None:
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"`finetune` must be one of {list(FINETUNE_MODES)}, got {finetune!r}.")
    check_positive_int(unfreeze_backbone_at_epoch, "unfreeze_backbone_at_epoch", minimum=0)
    check_positive(backbone_lr_ratio, "backbone_lr_ratio")


class ODEMobileNetModule(ODESolverMixin, IsometricMobileNetModule):
    """ODE-Net on the isometric MobileNetV3 (Kim et al. Table 3: 3 mobile blocks + 1 ODE block).

    ``network`` and fine-tuning: as :class:`IsometricMobileNetModule`'s, and the ODE block's ``activation``
    (:func:`lightning_pdenets.architectures.odenet_mobilenet`); ``solver``: over Chen et al.'s dopri5
    with the adjoint method (fields of :class:`lightning_pdenets.solvers.SolverConfig`).
    """

    architecture = "odenet_mobilenet"
    solver_defaults = ODENET_SOLVER


class PRNetMobileNetModule(PRNetAlgorithmModule):
    """PR-Net on the isometric MobileNetV3 (Kim et al. Table 3: 3 mobile blocks + 1 PDE block).

    Trained with PR-Net's Algorithm 1 (:class:`lightning_pdenets.models.PRNetAlgorithmModule`): here the
    "stem" producing h(0) is the patch stem with the first ``num_blocks - 1`` mobile blocks, and the
    "head" is MobileNetV3's head with the classifier.

    ``network``: as :class:`IsometricMobileNetModule`'s, and the PDE block's ``activation`` and ``t_end``
    (:func:`lightning_pdenets.architectures.prnet_mobilenet`); ``image_size`` (64 for Tiny ImageNet), taken
    from the datamodule, fixes the query set H.

    Args:
        pretrained_checkpoint: Checkpoint of a PR-Net of the same architecture to fine-tune (all layers,
            with Algorithm 1); its classifier is replaced by one with ``num_classes`` outputs.
        trust_pretrained_checkpoint: as in :class:`IsometricMobileNetModule`.
        **kwargs: Algorithm 1's settings (``max_power``, ``theta``, ``alpha``, ..., see
            :class:`PRNetAlgorithmModule`), ``network``, the data facts and the task optimizer's settings.
    """

    architecture = "prnet_mobilenet"

    def __init__(
        self,
        pretrained_checkpoint: str | None = None,
        trust_pretrained_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if pretrained_checkpoint is not None:
            load_pretrained_backbone(
                self.network,
                pretrained_checkpoint,
                self.architecture_arguments(),
                type(self).__name__,
                trust_pretrained_checkpoint,
            )
