"""Named pretrained models: the repository's trained checkpoints, each with its config, test accuracy and SHA-256.

From Python::

    from lightning_pdenets import pretrained
    pretrained.list_models()                   # ['odenet_mnist', 'prnet_mnist', ..., 'quickstart_digits']
    model = pretrained.load("prnet_mnist")     # a PRNetModule in eval mode
    pretrained.info("prnet_mnist").test_accuracy   # 0.9963, as recorded in BENCHMARKS.md

From the command line, ``pretrained:NAME`` stands for the verified file wherever ``--ckpt_path`` takes one::

    pdenets test --config configs/mnist/prnet.yaml --ckpt_path pretrained:prnet_mnist --data.data_dir DATA

Every load reads the file once, checks its SHA-256 against :data:`PRETRAINED` and only then unpickles it
with ``weights_only=True`` (tensors and plain containers, no code), so a changed file is refused before
anything of it is used.

Where the files come from: today every checkpoint is committed to the repository (``bench/checkpoints/``),
so a clone (``pip install -e .``) finds them next to the package. A wheel installed with ``pip install .``
holds the package alone; there the files are looked up under ``$LIGHTNING_PDENETS_PRETRAINED_ROOT`` (a
clone's root), and a missing file is refused with an error naming it and the remedies. Each entry has a
``url`` field, ``None`` for now: a file that outgrows the repository gets a download URL there (and its
SHA-256 stays the check), and :func:`checkpoint_path` then downloads it once into torch.hub's cache
(``torch.hub.get_dir()/checkpoints/lightning_pdenets``) with :func:`torch.hub.download_url_to_file`.
Neither :func:`load` nor ``pretrained:NAME`` change when a URL is added.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lightning_pdenets._discovery import import_class
from lightning_pdenets.checkpoints import archive_damage, check_map_location, checkpoint_class_path
from lightning_pdenets.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError
from lightning_pdenets.migration import check_layout

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

__all__ = [
    "PRETRAINED",
    "PRETRAINED_PREFIX",
    "ROOT_VARIABLE",
    "PretrainedModel",
    "checkpoint_path",
    "info",
    "list_models",
    "load",
    "resolve_ckpt_path",
]

PRETRAINED_PREFIX = "pretrained:"
"""``--ckpt_path pretrained:NAME`` names a pretrained model instead of a file."""

ROOT_VARIABLE = "LIGHTNING_PDENETS_PRETRAINED_ROOT"
"""Environment variable naming the folder the manifest's relative ``file`` paths start from (default: the
repository that holds this package)."""

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
"""The folder above the package: the repository root of a clone or an editable install."""


@dataclass(frozen=True)
class PretrainedModel:
    """One named pretrained model.

    Attributes:
        name: The name :func:`load` and ``pretrained:NAME`` take.
        file: The checkpoint, relative to the repository root.
        sha256: SHA-256 of the checkpoint file (hex).
        config: The config that trained it, relative to the repository root (``pdenets fit --config CONFIG``).
        model: Import path of its LightningModule class.
        dataset: The data it was trained and tested on.
        test_accuracy: Top-1 test accuracy recorded when it was trained (``source`` says where).
        source: Where ``test_accuracy`` is recorded.
        description: One line on what it is.
        url: Download URL of the file, for files that are not in the repository (``None``: in the repository).
        fit_arguments: Command-line arguments added to ``config`` in the run that trained it (e.g. a seed).
    """

    name: str
    file: str
    sha256: str
    config: str
    model: str
    dataset: str
    test_accuracy: float
    source: str
    description: str
    url: str | None = None
    fit_arguments: tuple[str, ...] = ()


_PAPER_SCALE = 'BENCHMARKS.md, "MNIST at paper scale"'

PRETRAINED: dict[str, PretrainedModel] = {
    entry.name: entry
    for entry in (
        PretrainedModel(
            name="resnet_mnist",
            file="bench/checkpoints/mnist/resnet.ckpt",
            sha256="e10b2413c5e69661730dea062702bc813be51d88916ad1623171b64354b1d645",
            config="configs/mnist/resnet.yaml",
            model="lightning_pdenets.models.ResNetModule",
            dataset="MNIST",
            test_accuracy=0.9963,
            source=_PAPER_SCALE,
            description="ResNet of Chen et al. (2018), 576,778 parameters, 12 epochs (Kim et al. Table 2: 0.9966).",
        ),
        PretrainedModel(
            name="rknet_mnist",
            file="bench/checkpoints/mnist/rknet.ckpt",
            sha256="473bf20b82b113400e2d5bca9730ef65be36d648a9988d98a075c7037ecde720",
            config="configs/mnist/rknet.yaml",
            model="lightning_pdenets.models.RKNetModule",
            dataset="MNIST",
            test_accuracy=0.9961,
            source=_PAPER_SCALE,
            description="RK-Net (RK4 through the solver, backpropagated), 208,266 parameters (Kim et al.: 0.9970).",
        ),
        PretrainedModel(
            name="odenet_mnist",
            file="bench/checkpoints/mnist/odenet.ckpt",
            sha256="e64c76011754d72d69a36bf457ccf0b6b8502b31ca84ebd628c40fd18ba0f4ee",
            config="configs/mnist/odenet.yaml",
            model="lightning_pdenets.models.ODENetModule",
            dataset="MNIST",
            test_accuracy=0.9963,
            source=_PAPER_SCALE,
            description="ODE-Net (dopri5, adjoint), 208,266 parameters, 26 NFE per test batch (Kim et al.: 0.9964).",
        ),
        PretrainedModel(
            name="prnet_mnist",
            file="bench/checkpoints/mnist/prnet.ckpt",
            sha256="40830054bdc9f7fa58c163a1f04f1166cb6d1fce52cae113da03400dcb7d1449",
            config="configs/mnist/prnet.yaml",
            model="lightning_pdenets.models.PRNetModule",
            dataset="MNIST",
            test_accuracy=0.9963,
            source=_PAPER_SCALE,
            description="PR-Net (Kim et al.), seed 0, 210,578 parameters, no solver at inference (paper: 0.9972).",
        ),
        PretrainedModel(
            name="prnet_mnist_seed1",
            file="bench/checkpoints/mnist/prnet_seed1.ckpt",
            sha256="dca53409530f7d3912558c8ed67f473e80619f58d1b44e2bebc905ca729af540",
            config="configs/mnist/prnet.yaml",
            model="lightning_pdenets.models.PRNetModule",
            dataset="MNIST",
            test_accuracy=0.9962,
            source=_PAPER_SCALE,
            fit_arguments=("--seed_everything", "1"),
            description="PR-Net, the same config with seed 1.",
        ),
        PretrainedModel(
            name="quickstart_digits",
            file="bench/checkpoints/digits/quickstart.ckpt",
            sha256="f03d9a810007b441ef15da105fdc2bd545722559e4d37d79447ece3a6f1b329d",
            config="configs/quickstart.yaml",
            model="lightning_pdenets.models.RKNetModule",
            dataset="scikit-learn digits (bundled, offline)",
            test_accuracy=0.9778,
            source='BENCHMARKS.md, "Pretrained models"',
            description="The offline quickstart's RK-Net (width 64, rk4 with step 0.25), best validation epoch "
            "(the 5th of 15) on 8x8 digits: 264 of the 270 test images.",
        ),
    )
}
"""Every named pretrained model, by name."""


def list_models() -> list[str]:
    """The names of the pretrained models, sorted."""
    return sorted(PRETRAINED)


def info(name: str) -> PretrainedModel:
    """The manifest entry of ``name``.

    Raises:
        ConfigurationError: (a ``ValueError``) for an unknown name, listing the valid ones.
    """
    if not isinstance(name, str) or name not in PRETRAINED:
        raise ConfigurationError(
            f"there is no pretrained model {name!r}; valid names: {', '.join(list_models())} "
            f"(lightning_pdenets.pretrained.list_models())."
        )
    return PRETRAINED[name]


def checkpoint_path(name: str, root: str | Path | None = None) -> Path:
    """The verified checkpoint file of ``name``: present and with the recorded SHA-256.

    Args:
        name: A pretrained model's name (:func:`list_models`).
        root: Folder the manifest's relative paths start from; default ``$LIGHTNING_PDENETS_PRETRAINED_ROOT``,
            else the repository holding this package.

    Returns:
        The file's path. A file not found under ``root`` whose entry has a ``url`` is downloaded once into
        torch.hub's cache; no entry has one yet.

    Raises:
        ConfigurationError: for an unknown name.
        TypeError: for a ``root`` that is not a path.
        CheckpointNotFoundError: when the file is missing and no URL is registered.
        CorruptCheckpointError: when the file's SHA-256 is not the recorded one.
    """
    path, _ = _read_verified(info(name), root)
    return path


def load(name: str, map_location: Any = "cpu", root: str | Path | None = None) -> Any:
    """The pretrained model ``name`` as its LightningModule, in eval mode.

    The file is read once, its SHA-256 checked, and the bytes that were checked are loaded with
    ``weights_only=True``. A URL added to the manifest later changes nothing here (see the module docstring).

    Args:
        name: A pretrained model's name (:func:`list_models`).
        map_location: Where the weights go, as for :func:`torch.load`: ``'cpu'``, ``'cuda'``, ``'cuda:N'``, a
            ``torch.device``, a dict from saved locations to devices (strings), or a callable.
        root: See :func:`checkpoint_path`.

    Returns:
        The LightningModule (``info(name).model``) with the checkpoint's hyperparameters and weights.

    Raises:
        ConfigurationError: for an unknown name.
        ValueError: for a ``map_location`` that names no device, or one this machine does not have.
        TypeError: for a ``map_location`` or ``root`` of another type.
        CheckpointNotFoundError: when the file is missing and no URL is registered.
        CorruptCheckpointError: when the file's SHA-256 is not the recorded one, or a record of its zip archive
            fails its CRC-32 check.
    """
    entry = info(name)
    check_map_location(map_location)
    path, data = _read_verified(entry, root)
    damage = archive_damage(io.BytesIO(data))
    if damage is not None:  # the recorded file itself was damaged before its SHA-256 was taken
        raise CorruptCheckpointError(
            f"pretrained model {name!r}: {str(path)!r} has the recorded SHA-256, but {damage}, so the recorded file "
            f"itself is damaged and its weights cannot be trusted. Nothing of it was loaded. Please report it; "
            f"meanwhile retrain the model with `pdenets fit --config {entry.config}"
            f"{''.join(f' {a}' for a in entry.fit_arguments)}` and load that run's checkpoint instead."
        )
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    check_layout(checkpoint, path, model=entry.model)
    class_path = checkpoint_class_path(checkpoint) or entry.model
    cls = import_class(class_path)
    if cls is None:
        raise CorruptCheckpointError(
            f"pretrained model {name!r}: {str(path)!r} names the model class {class_path!r}, which does not import."
        )
    model = cast("type[LightningModule]", cls).load_from_checkpoint(
        io.BytesIO(data), map_location=map_location, weights_only=True
    )
    return model.eval()


def resolve_ckpt_path(ckpt_path: Any) -> Any:
    """``pretrained:NAME`` as the verified file's path (a string); any other value unchanged."""
    if isinstance(ckpt_path, str) and ckpt_path.startswith(PRETRAINED_PREFIX):
        return str(checkpoint_path(ckpt_path[len(PRETRAINED_PREFIX) :]))
    return ckpt_path


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _root(root: str | Path | None) -> Path:
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(
                f"root must be a folder path (str or os.PathLike), got {type(root).__name__} {root!r}: pass the "
                f"folder the manifest's relative paths start from (a clone's root), or leave it None for "
                f"${ROOT_VARIABLE} or the repository holding this package."
            )
        return Path(root)
    return Path(os.environ.get(ROOT_VARIABLE) or REPOSITORY_ROOT)


def _cached_download(entry: PretrainedModel, url: str) -> Path:
    """The file of ``entry`` at ``url`` in torch.hub's cache, downloaded (hash-checked) if not there yet."""
    folder = Path(torch.hub.get_dir()) / "checkpoints" / "lightning_pdenets"
    target = folder / f"{entry.name}-{entry.sha256[:8]}{Path(entry.file).suffix}"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=entry.sha256, progress=True)
    return target


def _read_verified(entry: PretrainedModel, root: str | Path | None) -> tuple[Path, bytes]:
    """The file of ``entry`` and its bytes, after checking that they have the recorded SHA-256."""
    base = _root(root)
    path = base / entry.file
    if not path.is_file() and entry.url is not None:
        path = _cached_download(entry, entry.url)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"pretrained model {entry.name!r}: its checkpoint {str(path)!r} does not exist. The pretrained files are "
            f"committed to the lightning_pdenets repository ({entry.file}) and are not part of the installed package; "
            f"no download URL is registered for this model yet. Use a clone of the repository (`pip install -e .`), "
            f"or set {ROOT_VARIABLE} to a clone's root, or restore the file with `git checkout -- {entry.file}`."
        )
    data = path.read_bytes()
    actual = sha256_of(data)
    if actual != entry.sha256:
        raise CorruptCheckpointError(
            f"pretrained model {entry.name!r}: {str(path)!r} has SHA-256 {actual}, but {entry.sha256} is recorded "
            f"(lightning_pdenets/pretrained.py), so the file was changed or replaced and is not the model whose test "
            f"accuracy ({entry.test_accuracy}) is recorded. Nothing of it was loaded. Restore it with "
            f"`git checkout -- {entry.file}`; to use a retrained file, pass its path to --ckpt_path or load it with "
            f"the model's load_from_checkpoint instead."
        )
    return path, data
