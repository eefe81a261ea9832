"""Make ``advertorch`` 0.2.3 importable on current PyTorch.

advertorch 0.2.3 (its latest release) imports ``zero_gradients`` from
``torch.autograd.gradcheck`` in ``advertorch/attacks/fast_adaptive_boundary.py``; PyTorch removed
that helper in 1.9, so ``import advertorch`` fails with ``ImportError``. The shim puts back the
original two-line helper (set ``x.grad`` to zero, recursing into sequences) before advertorch is
imported, and only when PyTorch lacks it. Nothing else in advertorch or torch is changed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch

__all__ = ["import_advertorch_attacks", "zero_gradients"]


def zero_gradients(x: Any) -> None:
    """Zero ``x.grad`` in place for a tensor or (recursively) for an iterable of tensors.

    The helper PyTorch shipped as ``torch.autograd.gradcheck.zero_gradients`` until 1.8.
    """
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, Iterable):
        for element in x:
            zero_gradients(element)


def import_advertorch_attacks() -> ModuleType:
    """Return ``advertorch.attacks``, installing :func:`zero_gradients` into torch first if missing.

    Raises:
        ImportError: when advertorch is not installed (with the command that installs it).
    """
    # ``torch.autograd.gradcheck`` as an attribute is the function; the module is only in importlib.
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck_module, "zero_gradients"):
        gradcheck_module.zero_gradients = zero_gradients  # type: ignore[attr-defined]  # torch removed it; put back
    try:
        return importlib.import_module("advertorch.attacks")
    except ModuleNotFoundError as error:
        if error.name != "advertorch":
            raise
        raise ImportError(
            "the adversarial evaluation needs advertorch; install it with `pip install advertorch==0.2.3`."
        ) from error
